"""Fitting by stochastic variational inference: minibatch SVI with a Pyro ELBO and Adam.

The objective's ``__call__(model, guide)`` gives a :class:`torch.nn.Module` (Pyro's
``ELBOModule``) whose forward pass is the differentiable loss, so one ordinary
:class:`torch.optim.Adam` updates all parameters of model and guide together. Nothing is
registered in Pyro's global parameter store.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
import time
import warnings

import pyro
import torch
from tqdm.auto import tqdm

from pyrovae.checkpoint import check_output_paths
from pyrovae.compiled import CompiledStep
from pyrovae.config import TrainConfig
from pyrovae.data import binarize
from pyrovae.distributed import DataParallelContext, active_context
from pyrovae.history import HISTORY_COLUMNS, History, write_history_csv  # noqa: F401
from pyrovae.objectives import ANALYTIC_KL_OBJECTIVES, make_objective
from pyrovae.randomness import capture_rng_state, restore_rng_state
from pyrovae.schedules import PlateauSchedule

ELBO_OBJECTIVES = ("trace_elbo", "trace_meanfield_elbo", "traceenum_elbo", "stl")
"""Objectives whose training value is the ELBO itself (STL changes the gradient only)."""
EAGER_ONLY_OBJECTIVES = ("traceenum_elbo",)
"""Objectives without a traced equivalent: ``compile='auto'`` takes eager Pyro at once."""
SMALL_MODEL_PARAMETERS = 1_000_000
"""Models with fewer parameters get one torch thread by default: more threads only cost
synchronisation for their small matrix products, and on a busy machine they wait."""
_TORCH_DEFAULT_THREADS = torch.get_num_threads()


def default_threads(num_parameters: int) -> tuple[int, str]:
    """torch threads for a model of ``num_parameters``, and why: 1 for a small model (under
    :data:`SMALL_MODEL_PARAMETERS`), else the cores not busy (usable cores minus the
    one-minute load average), at most torch's own default."""
    if num_parameters < SMALL_MODEL_PARAMETERS:
        return 1, f"auto: 1 for a model of {num_parameters:,} parameters, under a million"
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = os.getloadavg()[0]
    except (OSError, AttributeError):
        busy = 0.0
    free = max(1, min(usable or 1, _TORCH_DEFAULT_THREADS, round((usable or 1) - busy)))
    return free, f"auto: the {free} of {usable} cores not busy (load {busy:.1f})"


_chosen_threads: int | None = None


def set_threads(count: int) -> None:
    """``torch.set_num_threads(count)``, remembered as chosen: ``fit`` then keeps it."""
    global _chosen_threads
    torch.set_num_threads(count)
    _chosen_threads = count


@contextlib.contextmanager
def thread_default(vae, progress: bool):
    """Inside ``fit``: :func:`default_threads` unless the user chose (OMP_NUM_THREADS,
    :func:`set_threads`, or ``torch.set_num_threads`` to another value than torch's
    default); restored after."""
    current = torch.get_num_threads()
    chosen = current == _chosen_threads or current != _TORCH_DEFAULT_THREADS
    if os.environ.get("OMP_NUM_THREADS") or chosen:
        yield
        return
    count, reason = default_threads(sum(p.numel() for p in vae.parameters()))
    if progress:
        tqdm.write(f"threads: {count} ({reason}; torch.set_num_threads(n) to choose)")
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(current)


def resolve_device(name: str = "auto") -> torch.device:
    """``"auto"`` gives CUDA when available, else CPU; other names are checked and returned."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:  # a name torch does not know
        raise ValueError(
            f"unknown device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'"
        ) from error
    if device.type not in ("cpu", "cuda"):  # e.g. 'meta' would discard every parameter value
        raise ValueError(f"unsupported device {name!r}: use 'auto', 'cpu', 'cuda' or 'cuda:N'")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {name!r} requested but this machine has {torch.cuda.device_count()} CUDA "
            "device(s)"
        )
    return device


class NonFiniteTrainingError(FloatingPointError):
    """A training step produced a NaN or infinite loss or gradient norm."""

    def __init__(
        self, epoch: int, step: int, num_steps: int, loss: float, grad_norm: float, advice: str = ""
    ):
        self.epoch, self.step, self.num_steps = epoch, step, num_steps
        self.loss, self.grad_norm = loss, grad_norm
        super().__init__(
            f"non-finite training step at epoch {epoch}, step {step} of {num_steps} "
            f"(loss per data point {loss}, gradient norm {grad_norm}). {advice}".rstrip()
        )


def fit(
    vae,
    train,
    validation,
    config: TrainConfig,
    checkpoint_path=None,
    resume: bool = False,
    best_path=None,
) -> History:
    """Fit ``vae`` (a :class:`pyrovae.models.latent_variable.LatentVariableModel`, e.g. a
    :class:`pyrovae.VAE`) and return its :class:`History`.

    Threads: unless ``OMP_NUM_THREADS`` is set or torch's thread count was chosen
    (``torch.set_num_threads`` to another value than its default, or :func:`set_threads`),
    the fit runs with :func:`default_threads` (one thread for a model of under a million
    parameters; a line says so when ``progress``) and restores the count afterwards.

    All inputs are validated, and a checkpoint to resume from is read and checked, before
    any parameter, RNG or optimizer state changes.

    When :mod:`torch.distributed` is initialized with several processes (e.g. under
    ``torchrun``), the fit is data-parallel over them (see :mod:`pyrovae.distributed`):
    every rank passes the same full data and settings, each takes its shard of every
    minibatch, gradients are averaged each step, and only rank 0 writes the checkpoint.

    Parameters
    ----------
    checkpoint_path : str or Path, optional
        Write an atomic checkpoint here every ``config.checkpoint_every`` epochs and at the
        end: parameters, optimizer state, history, and the state of every RNG stream and of
        the data order, so that a resumed run continues bitwise as if never interrupted.
    resume : bool
        Continue from the checkpoint at ``checkpoint_path`` (same model and settings; a
        larger ``epochs`` extends the run).
    best_path : str or Path, optional
        Also write the model (a loadable file without optimizer or resume state) here
        after every epoch whose validation ELBO is the best so far. Needs validation data.
    """
    with thread_default(vae, config.progress):
        return _fit(vae, train, validation, config, checkpoint_path, resume, best_path)


def _fit(vae, train, validation, config, checkpoint_path, resume, best_path) -> History:
    parallel = active_context()
    device = resolve_device(config.device)
    if parallel is not None:
        device = parallel.device(device)
    vae.check_objective(config)
    train = vae.training_inputs(train, config, "training data")
    if validation is not None:
        validation = vae.training_inputs(validation, config, "validation data")
    vae.check_training_structure(config, *train)
    vae.prepare_parameters(*train)
    if next(vae.parameters(), None) is None:
        raise ValueError(
            "the model and guide have no parameters to fit: add pyro.param / nn.Parameter "
            "statements, or evaluate the pair directly with evaluate()"
        )
    if config.batch_size > train[0].shape[0]:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {train[0].shape[0]} training data points"
        )
    if parallel is not None:
        _check_shardable(train[0].shape[0], config.batch_size, parallel.world_size)
    if validation is None and (config.lr_schedule != "constant" or best_path is not None):
        raise ValueError(
            "lr_schedule='plateau' and best_path follow the validation ELBO: pass validation data"
        )
    if resume not in (True, False):  # e.g. resume="no", which is true
        raise ValueError(f"resume must be True or False, got {resume!r}")
    check_output_paths(checkpoint_path=checkpoint_path, best_path=best_path)
    saved = _read_resume_checkpoint(vae, config, checkpoint_path, parallel) if resume else None
    written = None if saved is None else int(saved["training_state"]["epoch"])

    pyro.set_rng_seed(config.seed if parallel is None else parallel.seed_for_rank(config.seed))
    vae.to(device)
    if parallel is not None:
        parallel.broadcast_(vae)
    train = _on_device(train, device, vae.dtype)
    if validation is not None:
        validation = _on_device(validation, device, vae.dtype)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    objective, loss_module, vae.training_path_ = _loss_module(vae, config, train, parallel)
    if not isinstance(loss_module, CompiledStep) and parallel is not None:
        loss_module = _distributed_module(loss_module, device)
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.learning_rate)
    history = History()
    schedule = PlateauSchedule(config.lr_decay, config.lr_patience, config.min_learning_rate)
    first_epoch = (
        1
        if saved is None
        else _restore(vae, optimizer, history, generator, saved, parallel, schedule)
    )
    vae.optimizer_, vae.train_config_, vae.history_ = optimizer, config, history
    vae.saved_optimizer_state_ = vae.saved_training_state_ = None  # this fit's own from now on
    rollbacks, epoch = 0, first_epoch
    while epoch <= config.epochs and not schedule.converged:
        snapshot = (
            _snapshot(vae, optimizer, generator) if config.on_nonfinite == "rollback" else None
        )
        started = time.perf_counter()
        if hasattr(objective, "start_epoch"):
            objective.start_epoch(epoch)
        try:
            train_elbo = _train_epoch(
                loss_module, optimizer, train, config, generator, epoch, parallel
            )
        except NonFiniteTrainingError as error:
            if snapshot is None or rollbacks >= config.max_rollbacks:
                raise _explain(error, config, checkpoint_path, rollbacks, written, train) from None
            rollbacks += 1
            _roll_back(vae, optimizer, generator, snapshot, config.rollback_factor, error)
            continue
        record = {
            "epoch": epoch,
            **_train_value(config, train_elbo),
            "valid_elbo": _validation_elbo(vae, validation, config, parallel),
            "seconds": time.perf_counter() - started,
            "learning_rate": optimizer.param_groups[0]["lr"],
        }
        history.records.append(record)
        best = record["valid_elbo"] is not None and schedule.step(
            epoch, record["valid_elbo"], optimizer, adjust=config.lr_schedule == "plateau"
        )
        if config.progress and (parallel is None or parallel.is_main):
            tqdm.write(_describe(record, config.epochs))
        last = epoch == config.epochs or schedule.converged
        if best and best_path is not None and (parallel is None or parallel.is_main):
            vae.save(best_path, include_training_state=False)
        if checkpoint_path is not None and (epoch % config.checkpoint_every == 0 or last):
            _save_checkpoint(vae, checkpoint_path, epoch, generator, parallel, schedule)
            written = epoch
        epoch += 1
    if parallel is not None:
        parallel.barrier()  # the last checkpoint is written before any rank returns
    return history


def _on_device(inputs: tuple, device: torch.device, dtype: torch.dtype) -> tuple:
    """``inputs`` on ``device``, floating ones in the model's ``dtype`` (integer and boolean
    inputs, e.g. labels and masks, keep theirs)."""
    return tuple(
        t.to(device=device, dtype=dtype) if t.is_floating_point() else t.to(device) for t in inputs
    )


def _loss_module(vae, config: TrainConfig, train: tuple, parallel) -> tuple:
    """The objective, the loss module a step calls, and the path taken (``"eager"``,
    ``"graph"`` or ``"inductor"``).

    ``compile="auto"`` takes the graph path when the model and guide trace: the compiled
    step is traced on one minibatch, then checked on another against the eager objective
    (with Pyro's validation on, which the eager path runs on its first step): same loss and
    gradients up to rounding. Where tracing fails, the objective does not run eagerly, or the
    numbers differ (e.g. Python control flow on data values, frozen at trace time), it warns
    in one line and takes the eager path, as ``compile="none"`` does."""
    options = config.objective_options()
    structure = vae.structure(*train)
    structure.warn_if_sequential(config.num_particles, stacklevel=4)
    nesting = structure.max_plate_nesting
    options.update(data_plate=vae.data_plate, vectorize_particles=structure.vectorized)
    mode = config.compile
    if config.objective in EAGER_ONLY_OBJECTIVES:  # nothing to try: no traced equivalent
        if mode in ("graph", "inductor"):
            raise ValueError(
                f"compile={mode!r}: objective={config.objective!r} (Pyro's TraceEnum_ELBO, "
                "which sums the guide's discrete sites) runs in eager Pyro only; use "
                "compile='none' or 'auto'"
            )
        mode = "none"
    obstacle = vae.compile_obstacle()
    if obstacle is not None and mode in ("graph", "inductor"):
        raise ValueError(f"compile={mode!r}: {obstacle}")
    if obstacle is not None and mode == "auto":
        warnings.warn(
            f"compile='auto': {obstacle}; training with eager Pyro", RuntimeWarning, stacklevel=4
        )
        mode = "none"
    if mode == "auto":
        objective = make_objective(
            config.objective,
            config.num_particles,
            max_plate_nesting=nesting,
            traceable=True,
            **options,
        )
        objective = vae.training_objective(objective, train[0].shape[0])  # global sites
        eager = objective(vae.model, vae.guide)
        step = CompiledStep(eager, backend="graph")
        problem = _trace_problem(step, eager, train, config, parallel)
        if problem is None:
            return objective, step, "graph"
        warnings.warn(
            f"compile='auto': {problem}; training with eager Pyro instead (compile='none' "
            "skips this check)",
            RuntimeWarning,
            stacklevel=4,
        )
        mode = "none"
    compiled = mode != "none"
    objective = make_objective(
        config.objective,
        config.num_particles,
        max_plate_nesting=nesting,
        # Pyro's Trace_ELBO would sample enumerable discrete sites (no gradient for them):
        # its pyrovae equivalent sums them out, as every other objective here does.
        traceable=compiled or bool(structure.discrete_sites),
        **options,
    )
    objective = vae.training_objective(objective, train[0].shape[0])  # global sites
    loss_module = objective(vae.model, vae.guide)
    if compiled:
        return objective, CompiledStep(loss_module, backend=mode), mode
    return objective, loss_module, "eager"


def _trace_problem(step, eager, train: tuple, config: TrainConfig, parallel) -> str | None:
    """Why ``step`` cannot replace ``eager`` for this training run, or ``None`` when it can.

    Traces on the first minibatch-sized slice of the training data and compares on the last
    (another one), both binarized as training does, each from the same seed; all random
    streams and gradients are left as they were."""
    size = train[0].shape[0]
    rows = config.batch_size
    if parallel is not None:  # each rank steps on its shard of a minibatch
        shard = parallel.shard(rows)
        rows = max(1, shard.stop - shard.start)
    first = tuple(t[:rows].clone() for t in train)
    last = tuple(
        (t[size - rows :] if size >= 2 * rows else t.flip(0)[:rows]).clone() for t in train
    )
    if config.binarize == "dynamic":
        draws = torch.Generator(device=train[0].device).manual_seed(config.seed)
        first = (binarize(first[0], generator=draws), *first[1:])
        last = (binarize(last[0], generator=draws), *last[1:])
    parameters = [p for _, p in eager.named_parameters()]
    in_graph = parallel is None
    devices = [train[0].device] if train[0].device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            try:
                _compiled_gradients(step, parameters, first, config.clip_norm, in_graph)
            except Exception as error:  # noqa: BLE001 - any failure to trace means eager
                reason = _first_line(error)
                return f"the compiled step cannot run this model and guide ({reason})"
            torch.manual_seed(config.seed)
            loss, grads = _compiled_gradients(step, parameters, last, config.clip_norm, in_graph)
            torch.manual_seed(config.seed)
            try:
                with pyro.validation_enabled(True):
                    expected = eager(*last) / rows
                expected_grads = torch.autograd.grad(expected, parameters, allow_unused=True)
            except Exception as error:  # noqa: BLE001 - the eager path reports it on step 1
                return f"the traceable objective fails eagerly ({_first_line(error)})"
            expected_grads = [
                torch.zeros_like(p) if g is None else g
                for p, g in zip(parameters, expected_grads, strict=True)
            ]
            if in_graph and config.clip_norm is not None:
                norm = torch.nn.utils.get_total_norm(expected_grads)
                factor = torch.clamp(config.clip_norm / (norm + 1e-6), max=1.0)
                expected_grads = [g * factor for g in expected_grads]
            pairs = [(loss, expected.detach()), *zip(grads, expected_grads, strict=True)]
            if not all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in pairs):
                return (
                    "the traced graph's loss or gradients differ from the eager objective's "
                    "on another minibatch (control flow on data values?)"
                )
    finally:
        for parameter in parameters:
            parameter.grad = None
    return None


def _compiled_gradients(step, parameters: list, batch: tuple, clip_norm, in_graph: bool):
    """Loss and (copies of the) gradients of one compiled step, as training takes them."""
    if in_graph:
        loss, _ = step.loss_and_norm(*batch, clip_norm=clip_norm)
    else:
        loss = step(*batch)
    grads = [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in parameters]
    return loss, grads


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def _check_shardable(size: int, batch_size: int, world_size: int) -> None:
    """Every global minibatch must give each of the ``world_size`` processes a data point."""
    last = size % batch_size or batch_size
    if min(batch_size, last) < world_size:
        raise ValueError(
            f"with {world_size} processes every minibatch needs at least {world_size} data "
            f"points, but batch_size={batch_size} over {size} training points leaves a last "
            f"batch of {last}; choose a batch_size whose remainder is 0 or at least {world_size}"
        )


def _distributed_module(loss_module, device: torch.device):
    """The eager loss wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which
    averages the gradients over ranks during the backward pass (``static_graph``: the same
    parameters take part in every step, and unused ones are allowed)."""
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(loss_module, device_ids=device_ids, static_graph=True)


def _save_checkpoint(vae, path, epoch: int, generator, parallel, schedule) -> None:
    """Rank 0 writes; every rank contributes its RNG state (a collective under parallelism)."""
    state = _training_state(epoch, generator)
    state["schedule"] = schedule.state_dict()
    if parallel is not None:
        state["world_size"] = parallel.world_size
        state["rng_of_ranks"] = parallel.gather(state["rng"])
    if parallel is None or parallel.is_main:
        vae.save(path, training_state=state)


def _train_value(config: TrainConfig, value: float) -> dict:
    """The epoch's training value under its own name: ``train_elbo`` for the ELBO
    objectives, else ``objective`` and ``train_objective``."""
    if config.objective in ELBO_OBJECTIVES:
        return {"train_elbo": value}
    return {"objective": config.objective, "train_objective": value}


def _describe(record: dict, epochs: int) -> str:
    valid = "" if record["valid_elbo"] is None else f", valid ELBO {record['valid_elbo']:9.3f}"
    train = (
        f"train ELBO {record['train_elbo']:9.3f}"
        if "train_elbo" in record
        else f"train {record['objective']} {record['train_objective']:9.3f}"
    )
    return (
        f"epoch {record['epoch']:>4}/{epochs}: {train}{valid} "
        f"nats/point ({record['seconds']:.2f} s)"
    )


def _training_state(epoch: int, generator: torch.Generator) -> dict:
    return {"epoch": epoch, "rng": capture_rng_state(generator)}


def _read_resume_checkpoint(vae, config: TrainConfig, checkpoint_path, parallel=None) -> dict:
    from pyrovae.checkpoint import CheckpointError, read_checkpoint

    if checkpoint_path is None:
        raise ValueError("resume=True needs a checkpoint_path to resume from")
    payload = read_checkpoint(checkpoint_path)
    if payload.get("training_state") is None or payload.get("train_config") is None:
        raise CheckpointError(f"{checkpoint_path} holds no training state to resume from")
    vae.check_resumable(payload, checkpoint_path)
    config.resumable_from(TrainConfig.from_dict(payload["train_config"]))
    _check_world_size(payload["training_state"], parallel, checkpoint_path)
    done = int(payload["training_state"]["epoch"])
    if config.epochs < done:
        raise ValueError(
            f"cannot resume: {checkpoint_path} already holds {done} epochs, more than "
            f"epochs={config.epochs}; ask for at least {done}"
        )
    return payload


def _check_world_size(state: dict, parallel, path) -> None:
    """A run resumes on as many processes as wrote it: the data shards and each process's
    random stream belong to that number."""
    saved = int(state.get("world_size", 1))
    running = 1 if parallel is None else parallel.world_size
    if saved != running:
        launch = "without torchrun" if saved == 1 else f"with torchrun --nproc_per_node {saved}"
        raise ValueError(
            f"cannot resume: {path} was written by a run on {saved} process(es), this run has "
            f"{running}; resume {launch} (re-sharding a run onto another number of processes "
            "is not supported)"
        )


def _restore(vae, optimizer, history: History, generator, payload: dict, parallel, schedule) -> int:
    """Load a resume checkpoint into the live objects; return the next epoch to run."""
    vae.load_state_dict(payload["model_state"])
    optimizer.load_state_dict(payload["optimizer_state"])
    history.records.extend(dict(record) for record in payload["history"])
    state = payload["training_state"]
    rng = state["rng"] if parallel is None else state["rng_of_ranks"][parallel.rank]
    restore_rng_state(rng, generator)
    if "schedule" in state:
        schedule.load_state_dict(state["schedule"])
    return int(state["epoch"]) + 1


def _snapshot(vae, optimizer, generator) -> dict:
    return {
        "model": copy.deepcopy(vae.state_dict()),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "rng": capture_rng_state(generator),
    }


def _roll_back(vae, optimizer, generator, snapshot: dict, factor: float, error) -> None:
    vae.load_state_dict(snapshot["model"])
    optimizer.load_state_dict(snapshot["optimizer"])
    restore_rng_state(snapshot["rng"], generator)
    for group in optimizer.param_groups:
        group["lr"] *= factor
    warnings.warn(
        f"{error} -- rolled back to the start of epoch {error.epoch} and lowered the learning "
        f"rate to {optimizer.param_groups[0]['lr']:.3g}",
        RuntimeWarning,
        stacklevel=3,
    )


LARGE_DATA = 1e3
"""Training data beyond this magnitude are named as the likely cause of a non-finite step."""


def _explain(
    error: NonFiniteTrainingError,
    config,
    checkpoint_path,
    rollbacks: int,
    written: int | None,
    train: tuple = (),
):
    """The error with advice; ``written``: epoch of the last checkpoint this run wrote (or
    resumed from), ``None`` when there is none. Training data of a magnitude beyond
    :data:`LARGE_DATA` are named as the cause instead of advice on the learning rate."""
    largest = max(
        (float(t.abs().max()) for t in train if t.is_floating_point() and t.numel()), default=0
    )
    if checkpoint_path is None:
        kept = ""
    elif written is None:
        kept = f"No checkpoint was written before the failure ({checkpoint_path} untouched). "
    else:
        kept = f"The last checkpoint {checkpoint_path} is intact (epoch {written}). "
    if largest > LARGE_DATA:
        advice = (
            f"The training data reach |x| = {largest:.3g}, far from the unit scale the "
            "networks start at: rescale them (e.g. to unit variance) rather than lowering the "
            "learning rate."
        )
    elif config.on_nonfinite == "rollback":
        advice = f"Gave up after {rollbacks} rollbacks; lower learning_rate or set clip_norm."
    else:
        advice = (
            "Set on_nonfinite='rollback' (CLI: --on-nonfinite rollback) to restore the epoch's "
            "starting state and lower the learning rate, or lower learning_rate / set clip_norm."
        )
    return NonFiniteTrainingError(
        error.epoch, error.step, error.num_steps, error.loss, error.grad_norm, kept + advice
    )


def _gradient_norm(parameters: list[torch.Tensor], clip_norm: float | None) -> torch.Tensor:
    """Global 2-norm of the gradients (before clipping), clipping them when asked."""
    if clip_norm is not None:
        return torch.nn.utils.clip_grad_norm_(parameters, clip_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def _train_epoch(
    loss_module,
    optimizer,
    train: tuple,
    config: TrainConfig,
    generator,
    epoch: int,
    parallel: DataParallelContext | None = None,
):
    size, device = train[0].shape[0], train[0].device
    order = torch.randperm(size, device=device, generator=generator)
    batches = order.split(config.batch_size)
    losses = torch.zeros(len(batches), device=device, dtype=torch.float64)
    grad_norms = torch.zeros(len(batches), device=device)
    check_each_step = device.type == "cpu"  # free on the CPU; on a GPU, once per epoch
    show = config.progress and (parallel is None or parallel.is_main)
    show = show and sys.stderr.isatty()  # a bar in a log file is only redraw noise
    bar = tqdm(batches, desc=f"epoch {epoch}/{config.epochs}", disable=not show, leave=False)
    for step, index in enumerate(bar):
        losses[step], grad_norms[step] = train_step(
            loss_module,
            optimizer,
            _minibatch(train, index, config, generator, parallel),
            config.clip_norm,
            validate=epoch == 1 and step == 0,
            guard=check_each_step,
            parallel=parallel,
            global_batch_size=len(index),
        )
        if check_each_step:
            _check_finite(losses, grad_norms, epoch, upto=step + 1)
    _check_finite(losses, grad_norms, epoch)
    sizes = torch.tensor([len(index) for index in batches], device=device)
    return -float((losses * sizes).sum()) / size


def _minibatch(train: tuple, index, config: TrainConfig, generator, parallel) -> tuple:
    """This process's part of the minibatch ``index``, dynamically binarized when asked.

    Binarization draws for the whole minibatch on every rank, so that the data-order
    generator advances alike on all of them and each data point gets the same draw as in a
    single-process run."""
    if parallel is not None and config.binarize != "dynamic":
        index = index[parallel.shard(len(index))]
    batch = tuple(t[index] for t in train)
    if config.binarize == "dynamic":
        batch = (binarize(batch[0], generator=generator), *batch[1:])
        if parallel is not None:
            batch = tuple(t[parallel.shard(len(index))] for t in batch)
    return batch


def train_step(
    loss_module,
    optimizer,
    batch: torch.Tensor | tuple[torch.Tensor, ...],
    clip_norm: float | None = None,
    validate: bool = False,
    guard: bool = True,
    parallel: DataParallelContext | None = None,
    global_batch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One stochastic-gradient step on one batch.

    Parameters
    ----------
    loss_module : torch.nn.Module or CompiledStep
        ``objective(model, guide)``, or its compiled form.
    optimizer : torch.optim.Optimizer
    batch : torch.Tensor or tuple of torch.Tensor
        Data points of this step (the model's arguments, e.g. ``(x, y)``), on the
        parameters' device.
    clip_norm : float, optional
        Clip the gradients' global 2-norm to this value.
    validate : bool
        Run Pyro's validation checks during this step (eager objectives only).
    guard : bool
        Skip the optimizer update when the loss or gradient norm is NaN or infinite (reads
        two numbers on the host: free on a CPU, a synchronisation on a GPU).
    parallel : DataParallelContext, optional
        Data-parallel run: ``batch`` is this rank's shard of a minibatch of
        ``global_batch_size`` points, and ``loss_module`` is wrapped in
        ``DistributedDataParallel`` (eager) or a :class:`CompiledStep`. Loss and gradients
        become those of the whole minibatch, the same on every rank.

    Returns
    -------
    loss, grad_norm : torch.Tensor
        Minus the objective per data point (nats) and the gradients' 2-norm before clipping,
        as detached 0-d tensors on the device.
    """
    batch = batch if isinstance(batch, tuple) else (batch,)
    parameters = _parameters(optimizer)
    if parallel is None and _norm_in_graph(loss_module, parameters):
        loss, grad_norm = loss_module.loss_and_norm(*batch, clip_norm=clip_norm)
    else:
        if parallel is None:
            loss = _loss_and_gradients(loss_module, batch, validate)
        else:
            loss = _parallel_loss_and_gradients(
                loss_module, optimizer, batch, validate, parallel, global_batch_size
            )
        grad_norm = _gradient_norm(parameters, clip_norm)
    if not guard or bool(torch.isfinite(loss) & torch.isfinite(grad_norm)):
        optimizer.step()
    return loss, grad_norm


def _parameters(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _norm_in_graph(loss_module, parameters: list[torch.Tensor]) -> bool:
    """Whether a compiled step computes (and clips) the gradients' norm inside its graph,
    equal to :func:`_gradient_norm`: its parameters are the optimizer's, in the same order.
    (Not under data parallelism: the norm is taken after the gradients are averaged.)"""
    return isinstance(loss_module, CompiledStep) and loss_module.same_parameters(parameters)


def _loss_and_gradients(
    loss_module, batch: tuple, validate: bool, normalizer: float | None = None
) -> torch.Tensor:
    """Loss of one batch divided by ``normalizer`` (default: the batch size, giving the loss
    per data point; a compiled step always divides by the batch size); sets the parameters'
    ``.grad``."""
    if isinstance(loss_module, CompiledStep):
        return loss_module(*batch)
    normalizer = batch[0].shape[0] if normalizer is None else normalizer
    for parameter in loss_module.parameters():
        parameter.grad = None
    with pyro.validation_enabled(validate):
        loss = loss_module(*batch) / normalizer
    loss.backward()
    return loss.detach()


def _parallel_loss_and_gradients(
    loss_module, optimizer, batch: tuple, validate: bool, parallel, global_batch_size: int
) -> torch.Tensor:
    """Loss per data point of the global minibatch and its gradients, on every rank.

    Each rank's shard loss is scaled as if the data plate held the whole minibatch
    (``world_size / global_batch_size`` times the shard's summed loss), so that the average
    over ranks, which ``DistributedDataParallel`` takes of the gradients, is the minibatch
    mean. A compiled step returns its shard's mean instead and averages explicitly."""
    local = batch[0].shape[0]
    if isinstance(loss_module, CompiledStep):
        loss = loss_module(*batch).reshape(1)
        grads = [p.grad for p in _parameters(optimizer) if p.grad is not None]
        parallel.sum_([*grads, loss], scale=local / global_batch_size)
        return loss[0]
    loss = _loss_and_gradients(
        loss_module, batch, validate, normalizer=global_batch_size / parallel.world_size
    ).reshape(1)
    parallel.sum_([loss], scale=1 / parallel.world_size)
    return loss[0]


def _check_finite(
    losses: torch.Tensor, grad_norms: torch.Tensor, epoch: int, upto: int | None = None
) -> None:
    """Raise for the first step whose loss or gradient norm is not finite; with ``upto``,
    look only at step ``upto`` (1-based), the one just taken."""
    start = 0 if upto is None else upto - 1
    bad = ~(torch.isfinite(losses[start:upto]) & torch.isfinite(grad_norms[start:upto]))
    if bool(bad.any()):
        step = start + int(bad.nonzero()[0])
        raise NonFiniteTrainingError(
            epoch, step + 1, len(losses), float(losses[step]), float(grad_norms[step])
        )


def _validation_elbo(
    vae, validation: tuple | None, config: TrainConfig, parallel=None
) -> float | None:
    """Mean ELBO per validation point (nats); each rank scores its shard of the points."""
    if validation is None:
        return None
    x, *rest = validation
    if config.binarize == "dynamic":
        generator = torch.Generator(device=x.device).manual_seed(config.seed + 1)
        x = binarize(x, generator=generator)
    analytic = config.objective in ANALYTIC_KL_OBJECTIVES
    inputs = (x, *rest)
    if parallel is None:
        return float(vae.elbo_of(inputs, num_samples=1, analytic_kl=analytic).mean())
    shard = parallel.shard(x.shape[0])
    total = torch.zeros(1, dtype=torch.float64, device=x.device)
    if shard.stop > shard.start:  # fewer validation points than ranks leaves some idle
        part = tuple(t[shard] for t in inputs)
        total += vae.elbo_of(part, num_samples=1, analytic_kl=analytic).sum()
    parallel.sum_([total])
    return float(total) / x.shape[0]
