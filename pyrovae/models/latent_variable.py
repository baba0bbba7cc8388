"""A Pyro model and an amortized guide, fitted by SVI and evaluated per data point.

:class:`LatentVariableModel` is what the built-in :class:`pyrovae.VAE` is made of, and what a
user's own Pyro model gets: the same :meth:`fit` (objectives, checkpoints, resuming,
non-finite guard, compiled steps), the same per-datapoint :meth:`elbo` and importance-sampled
:meth:`evaluate`.

Data convention: the model and guide are called as ``model(*inputs)``, every input a tensor
whose first axis indexes the data points of the plate ``data_plate``.

Model and guide may be modules or Pyro functions (``pyro.param``, ``pyro.module``,
``PyroModule`` s on Pyro's global store, bound methods): functions are wrapped by
:class:`pyrovae.models.functions.PyroFunction`, so that every parameter they use is owned,
trained, saved and loaded here, never in Pyro's global parameter store.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pyro
import pyro.util
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule
from pyro.params.param_store import ParamStoreDict
from torch import nn
from torch.distributions import transform_to

from pyrovae.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from pyrovae.config import TrainConfig
from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.structure import ModelStructure, check_structure
from pyrovae.evaluation.traces import particle_terms
from pyrovae.models.functions import (
    ParamRegistry,
    PyroFunction,
    as_pyro_modules,
    parameter_mismatch,
    pyro_parameters,
)
from pyrovae.models.hybrid import is_hybrid
from pyrovae.models.modes import evaluates, evaluation_mode
from pyrovae.training import History, fit, thread_default
from pyrovae.validation import (
    as_data_tensor,
    check_observed_support,
    finite_inputs,
    sampling_options,
)


class LatentVariableModel(nn.Module):
    """Fit and evaluate a Pyro ``model`` with an amortized ``guide``.

    Fitted values are read by their Pyro names: :meth:`param`, :meth:`named_pyro_params`,
    and Pyro's own ``pyro.param(name)`` inside ``with fitted.param_store():``.

    Parameters
    ----------
    model, guide : torch.nn.Module or callable
        A Pyro model and guide with the same latent sites, all inside the plate
        ``data_plate``: :class:`pyrovae.models.base.LocalParamsModule` subclasses (a guide
        built by :class:`pyrovae.models.autoguide.AmortizedGuide`, the built-in VAE's), or
        any Pyro program (function, bound method, ``PyroModule``, ``nn.Module`` calling
        ``pyro.module``): its ``pyro.param`` / ``pyro.module`` parameters are owned by
        :attr:`pyro_params` and trained with the rest.
    data_plate : str
        Name of the plate over data points.

    Attributes
    ----------
    max_plate_nesting : int or None
        Plate depth of the model for the objectives; ``None`` (here) guesses it from one
        run of model and guide, so models with plates nested in the data plate train.
    history_, train_config_, optimizer_ :
        Record, settings and optimizer of the last :meth:`fit`.
    metadata_ : dict
        Free-form JSON-like information saved with the parameters.
    probe_inputs_ : tuple of torch.Tensor or None
        The first (at most two) data points of the last :meth:`prepare_parameters` (the
        training data's); saved with function-style programs so that :meth:`load` can
        create their parameters and check them against the file before returning.
    """

    max_plate_nesting: int | None = None

    def __init__(self, model: nn.Module, guide: nn.Module, data_plate: str = "data"):
        super().__init__()
        self.model, self.guide = as_pyro_modules(model, guide)
        self.data_plate = data_plate
        self.history_: History | None = None
        self.train_config_: TrainConfig | None = None
        self.optimizer_: torch.optim.Optimizer | None = None
        self.saved_optimizer_state_: dict | None = None
        self.saved_training_state_: dict | None = None
        self.metadata_: dict = {}
        self.probe_inputs_: tuple[torch.Tensor, ...] | None = None

    @property
    def pyro_params(self) -> ParamRegistry | None:
        """Parameters named by ``pyro.param`` / ``pyro.module`` statements of function-style
        programs (created on their first call), or ``None`` when model and guide are both
        :class:`~pyrovae.models.base.LocalParamsModule` s."""
        for program in (self.model, self.guide):
            if isinstance(program, PyroFunction):
                return program.registry
        return None

    @property
    def device(self) -> torch.device:
        """Device of the parameters (the CPU for a model without any)."""
        parameter = next(self.parameters(), None)
        return torch.device("cpu") if parameter is None else parameter.device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the parameters (torch's default for a model without any)."""
        parameter = next(self.parameters(), None)
        return torch.get_default_dtype() if parameter is None else parameter.dtype

    # -- parameters --------------------------------------------------------------------
    def structure(self, *inputs: torch.Tensor) -> ModelStructure:
        """The checked structure of model and guide (see
        :func:`pyrovae.evaluation.structure.check_structure`), found once per kind of input
        by running them on the first data points, on private random streams (every seeded
        draw that follows is unchanged).

        Raises
        ------
        ValueError
            A model and guide that an estimator here would get wrong (a global or discrete
            latent site, shapes or masks that disagree, ...), naming the site and the fix.
        """
        key = tuple((t.dtype, tuple(t.shape[1:])) for t in inputs)
        cache = self.__dict__.setdefault("_structures", {})
        if key not in cache:
            cache[key] = check_structure(
                *self.per_point_programs(*inputs),
                *inputs,
                data_plate=self.data_plate,
                max_plate_nesting=self.max_plate_nesting,
            )
        return cache[key]

    def plate_nesting(self, *inputs: torch.Tensor) -> int:
        """:attr:`max_plate_nesting`, or, when it is ``None``, the depth found by
        :meth:`structure`."""
        if self.max_plate_nesting is not None:
            return self.max_plate_nesting
        return self.structure(*inputs).max_plate_nesting

    def compile_obstacle(self) -> str | None:
        """Why a compiled step (``compile="graph"``/``"inductor"``) cannot train this model,
        or ``None``: it substitutes the parameters of the module tree, so modules that a
        function reaches from outside it (``pyro.module`` / ``PyroModule`` s captured from
        the enclosing scope) would keep their own tensors and get no gradient."""
        registry = self.pyro_params
        if registry is None:
            return None
        if registry.global_store_:
            names = ", ".join(sorted(registry.global_store_)[:3])
            return (
                f"PyroModule parameters on Pyro's global parameter store ({names}, ...) are "
                "re-read from the store at every access, which a compiled step cannot "
                "substitute. Train with compile='none', or build the PyroModule under "
                "pyro.settings.context(module_local_params=True)"
            )
        if not registry.adopted_:
            return None
        names = ", ".join(sorted(registry.adopted_)[:3])
        return (
            f"the model or guide uses parameters of modules outside it ({names}, ...) through "
            "pyro.module / PyroModule; the compiled step cannot substitute them. Train with "
            "compile='none', or make the modules attributes of an nn.Module whose methods "
            "are the model and guide"
        )

    def prepare_parameters(self, *inputs: torch.Tensor) -> None:
        """Create the lazily initialised parameters of function-style programs by one call
        of guide and model on the first data point(s), then check that every parameter the
        programs use is one of :meth:`parameters` (so a fit can never train part of the
        model). Random state is left as it was.

        Raises
        ------
        ValueError
            When a tensor that requires gradients takes part in the log densities but is
            not one of :meth:`parameters`: a ``param`` statement naming a tensor this module
            does not own, a tensor captured from the enclosing scope, or a ``PyroModule``
            attribute read outside a call of the module (no ``param`` statement at all).
        """
        probe = tuple(t[: min(2, t.shape[0])] for t in inputs)
        with torch.random.fork_rng(devices=_cuda_devices(probe)):
            state = pyro.util.get_rng_state()
            try:
                used = self._parameters_used(probe)
            finally:
                pyro.util.set_rng_state(state)
        owned = {id(p) for p in self.parameters()}
        used = {name: tensor for name, tensor in used.items() if id(tensor) not in owned}
        stray = [name for name in used if not name.startswith("<")]
        if stray:
            raise ValueError(
                f"parameter(s) {', '.join(map(repr, stray))} of the model or guide are not "
                "owned by this LatentVariableModel and would not be trained: declare them as "
                "module attributes (nn.Parameter / PyroParam), or write the program as a "
                "function with pyro.param / pyro.module and pass the function"
            )
        hidden = [tuple(t.shape) for name, t in used.items() if name.startswith("<")]
        if hidden:
            raise ValueError(
                f"tensor(s) of shape {', '.join(map(str, hidden))} require gradients and take "
                "part in log p(x, z) or log q(z | x), but no param statement names them, so no "
                "optimizer would train them: call a PyroModule (module(...)) instead of reading "
                "its attributes from outside, register a plain nn.Module with pyro.module, or "
                "detach tensors that are meant to stay fixed"
            )
        self.probe_inputs_ = tuple(t.detach().clone() for t in probe)

    def _parameters_used(self, probe: tuple) -> dict[str, torch.Tensor]:
        """Trainable tensor behind every ``param`` site of one guide + model call, and
        (named ``"<leaf i>"``) every other tensor requiring gradients that the log joint
        log p(x, z) - log q(z | x) depends on."""
        from pyrovae.models.base import unconstrained_parameter

        with poutine.trace(param_only=True) as params:
            guide_trace = poutine.trace(self.guide).get_trace(*probe)
            replayed = poutine.replay(self.model, trace=guide_trace)
            model_trace = poutine.trace(replayed).get_trace(*probe)
        used = {}
        for name, site in params.trace.nodes.items():
            tensor = unconstrained_parameter(site["value"])
            if tensor is not None and tensor.requires_grad:
                used[name] = tensor
        named = {id(t) for t in used.values()}
        joint = model_trace.log_prob_sum() - guide_trace.log_prob_sum()
        for i, leaf in enumerate(_autograd_leaves(joint)):
            if id(leaf) not in named:
                used[f"<leaf {i}>"] = leaf
        return used

    # -- fitted values by Pyro name ----------------------------------------------------
    def _pyro_param_table(self) -> dict[str, tuple[torch.Tensor, constraints.Constraint]]:
        """Pyro name -> (unconstrained tensor, constraint) of every parameter the model and
        guide name; a name the two programs give different tensors appears as
        ``"model:name"`` and ``"guide:name"``."""
        found: dict[str, dict[str, tuple]] = {}
        for role, program in (("model", self.model), ("guide", self.guide)):
            if isinstance(program, PyroFunction):  # its module, if a PyroModule; else by call
                program = program.owner_module()
            if isinstance(program, PyroModule):
                for name, tensor, constraint in pyro_parameters(program):
                    found.setdefault(name, {})[role] = (tensor, constraint)
        registry = self.pyro_params
        if registry is not None:
            for name in registry.names():
                constraint = registry.constraints_.get(name, constraints.real)
                found.setdefault(name, {})["registry"] = (registry.parameter(name), constraint)
            for name, entry in registry.seen_.items():
                found.setdefault(name, {}).setdefault("registry", entry)
        table = {}
        for name, by_role in found.items():
            tensors = {id(tensor) for tensor, _ in by_role.values()}
            if len(tensors) == 1:
                table[name] = next(iter(by_role.values()))
            else:
                table.update({f"{role}:{name}": entry for role, entry in by_role.items()})
        return table

    def named_pyro_params(self) -> dict[str, torch.Tensor]:
        """Constrained value of every parameter by its Pyro name (see :meth:`param`)."""
        return {name: self.param(name) for name in self._pyro_param_table()}

    def param(self, name: str) -> torch.Tensor:
        """The fitted, constrained value of the parameter Pyro calls ``name``: what
        ``pyro.param(name)`` returns inside the model or guide.

        Names are Pyro's: a ``pyro.param("sigma", ..., constraint=positive)`` statement's
        ``"sigma"``, a ``pyro.module("decoder", net)`` statement's ``"decoder$$$weight"``,
        a ``PyroModule`` attribute's ``"decoder.weight"`` (a ``PyroParam`` by its constrained
        name), a plain module inside one ``"trunk$$$net.0.weight"``. The value is
        differentiable, as Pyro's: a parameter without constraint is the live
        ``nn.Parameter`` itself, a constrained one ``transform_to(constraint)`` of it (with
        ``.unconstrained()``); ``.detach()`` gives a plain tensor.

        Raises
        ------
        KeyError
            An unknown name (the message lists the known ones), or a parameter of a
            function-style program not created yet (call the model once, e.g.
            :meth:`elbo`, or fit it).
        """
        table = self._pyro_param_table()
        if name not in table:
            raise KeyError(self._unknown_param(name, table))
        tensor, constraint = table[name]
        value = transform_to(constraint)(tensor)
        if value is not tensor:
            value.unconstrained = lambda: tensor
        return value

    def _unknown_param(self, name: str, table: dict) -> str:
        registry = self.pyro_params
        if registry is not None and name in registry.pending_:
            return (
                f"parameter {name!r} was loaded but not created yet (its constraint is set by "
                "its pyro.param statement): call the model once, e.g. fitted.elbo(x)"
            )
        qualified = [repr(known) for known in table if known.endswith(f":{name}")]
        if qualified:
            return f"{name!r} names different tensors in the model and guide: ask for " + (
                " or ".join(qualified)
            )
        known = ", ".join(map(repr, sorted(table))) or "none"
        return f"no parameter named {name!r}; known Pyro names: {known}"

    @contextlib.contextmanager
    def param_store(self) -> Iterator[ParamStoreDict]:
        """Pyro's global parameter store holding this model's fitted parameters, for the
        duration of a ``with`` block: inside it, Pyro's own ``pyro.param(name)`` returns the
        fitted constrained value (computed from the same live unconstrained tensor, as Pyro
        does), as do ``pyro.get_param_store()[name]`` and its ``items()``.

        The store's previous content is restored on exit (also after an exception): nothing
        created inside the block leaks into it, and nothing of this model stays there.

        Example
        -------
        >>> with fitted.param_store():                                    # doctest: +SKIP
        ...     sigma = pyro.param("sigma")          # the fitted value, constraint applied
        """
        table = self._pyro_param_table()
        state = {
            "params": {name: tensor for name, (tensor, _) in table.items()},
            "constraints": {name: constraint for name, (_, constraint) in table.items()},
        }
        with pyro.get_param_store().scope(state):
            yield pyro.get_param_store()

    # -- data --------------------------------------------------------------------------
    def inputs(self, *args, name: str = "data") -> tuple[torch.Tensor, ...]:
        """Validated model inputs: numeric, finite, non-empty, with one row per data point,
        on the parameters' device; floating inputs in the parameters' dtype, integer and
        boolean inputs (labels, masks) in their own."""
        tensors = tuple(
            as_data_tensor(arg, f"{name} argument {i}", keep_dtype=True)
            for i, arg in enumerate(args)
        )
        if not tensors:
            raise ValueError(f"{name}: pass the data tensor(s) the model takes")
        rows = {t.shape[0] if t.dim() else None for t in tensors}
        if len(rows) != 1 or None in rows or 0 in rows:
            shapes = ", ".join(str(tuple(t.shape)) for t in tensors)
            raise ValueError(
                f"{name}: every input needs the same non-zero number of rows, got shapes {shapes}"
            )
        tensors = finite_inputs(tensors, self.dtype, self.device, name)
        check_observed_support(self.model, tensors, self.data_plate, name)  # all data points
        return tensors

    def training_inputs(self, data, config: TrainConfig, name: str) -> tuple[torch.Tensor, ...]:
        """Inputs for :func:`pyrovae.training.fit`; ``data`` is a tensor or a tuple of them."""
        if config.binarize != "none":
            raise ValueError("binarize applies to the built-in VAE; binarize the data yourself")
        return self.inputs(*(data if isinstance(data, tuple) else (data,)), name=name)

    # -- fitting -----------------------------------------------------------------------
    def check_objective(self, config: TrainConfig) -> None:
        """Raise if ``config``'s objective cannot fit this model (before anything changes).

        Any objective can try a user's model; :class:`pyrovae.VAE` refuses analytic-KL
        objectives for families without a closed-form KL."""

    def check_training_structure(self, config: TrainConfig, *inputs: torch.Tensor) -> None:
        """Refuse, before the first step, a model and guide that ``config``'s objective would
        get wrong: :meth:`structure`'s checks, and a tensor scale (a weight per data point)
        with an objective that takes a log-sum-exp over draws (IWAE, Rényi, DReG)."""
        from pyrovae.objectives import OBJECTIVES, ParticleObjective

        structure = self.structure(*inputs)
        cls = OBJECTIVES[config.objective]
        if issubclass(cls, ParticleObjective) and not cls.linear:
            structure.require_common_scale(f"objective={config.objective!r}")
        if is_hybrid(self.guide):  # global latent sites (pyrovae.models.hybrid)
            from pyrovae.objectives.global_latents import refuse_nonlinear

            refuse_nonlinear(config.objective, not issubclass(cls, ParticleObjective) or cls.linear)

    # -- global latent sites (pyrovae.models.hybrid) -------------------------------------
    def per_point_programs(self, *inputs: torch.Tensor) -> tuple:
        """The model and guide whose per-datapoint bounds :meth:`elbo` and :meth:`evaluate`
        report: the model and guide themselves; with a
        :class:`~pyrovae.models.hybrid.HybridGuide`, the model *conditioned* on the global
        sites at the global guide's median (hidden) and the local guide, so that the bounds
        are of log p(x_n | theta_hat)."""
        if not is_hybrid(self.guide):
            return self.model, self.guide
        values = self.guide.plug_in(*inputs[: min(2, inputs[0].shape[0])])
        return self.guide.conditioned(self.model, values), self.guide.local_guide

    def training_objective(self, objective, num_data: int):
        """The objective ``fit`` trains with: ``objective`` itself, or, with a
        :class:`~pyrovae.models.hybrid.HybridGuide`, its
        :class:`~pyrovae.objectives.global_latents.GlobalLatentELBO` over ``num_data``
        training points (each global KL counted once per data set)."""
        if not is_hybrid(self.guide):
            return objective
        from pyrovae.objectives.global_latents import GlobalLatentELBO, as_particle_objective

        local = as_particle_objective(objective, self.data_plate)
        return GlobalLatentELBO(local, num_data=num_data)

    def fit(
        self,
        train,
        validation=None,
        checkpoint_path=None,
        resume=False,
        best_path=None,
        **train_options,
    ):
        """Fit by stochastic variational inference; see :class:`pyrovae.config.TrainConfig`
        for ``train_options`` and :func:`pyrovae.training.fit` for checkpointing and resuming.

        ``train`` and ``validation`` are the model's input tensor, or a tuple of them.

        Returns
        -------
        pyrovae.history.History
            Per-epoch train and validation ELBO (nats per data point, higher is better).
        """
        config = TrainConfig.from_dict(train_options)
        return fit(
            self,
            train,
            validation,
            config,
            checkpoint_path=checkpoint_path,
            resume=resume,
            best_path=best_path,
        )

    # -- evaluation --------------------------------------------------------------------
    @evaluates("self")
    def elbo_of(
        self,
        inputs: tuple,
        num_samples: int = 1,
        analytic_kl: bool = False,
        seed: int | None = None,
        max_pairs: int = 2**20,
    ) -> torch.Tensor:
        """Per-datapoint ELBO (nats, float64, shape (N,)) of already validated inputs."""
        checked = sampling_options(dict(num_samples=num_samples, seed=seed, max_pairs=max_pairs))
        num_samples, seed, max_pairs = (checked[k] for k in ("num_samples", "seed", "max_pairs"))
        structure = self.structure(*inputs)
        if seed is not None:
            pyro.set_rng_seed(seed)
        terms = particle_terms(
            *self.per_point_programs(*inputs),
            *inputs,
            num_particles=num_samples,
            data_plate=self.data_plate,
            max_pairs=max_pairs,
            max_plate_nesting=structure.max_plate_nesting,
            vectorized=structure.vectorized,
            site_scales=True,
        )
        per_draw = terms.log_p_obs - terms.kl if analytic_kl else terms.log_weights
        return per_draw.double().mean(0)

    @evaluates("self")
    def evaluate_of(self, inputs: tuple, **options):
        """:func:`pyrovae.evaluation.importance.evaluate` of already validated inputs."""
        options = sampling_options(options)  # NumPy values accepted, checked before drawing
        if is_hybrid(self.guide):  # global latent sites: conditional on a stated plug-in value
            from pyrovae.evaluation.global_latents import evaluate_conditional

            return evaluate_conditional(
                self.model, self.guide, *inputs, data_plate=self.data_plate, **options
            )
        return evaluate(self.model, self.guide, *inputs, data_plate=self.data_plate, **options)

    @evaluates("self")
    def elbo(
        self,
        *args,
        num_samples: int = 1,
        analytic_kl: bool = False,
        seed: int | None = None,
        max_pairs: int = 2**20,
    ) -> torch.Tensor:
        """Per-datapoint evidence lower bound, in nats (higher is better), shape (N,); the
        KL term in closed form with ``analytic_kl`` where the guide and prior allow it. Runs
        with :func:`pyrovae.training.thread_default` torch threads unless you chose."""
        with thread_default(self, progress=False):
            return self.elbo_of(self.inputs(*args), num_samples, analytic_kl, seed, max_pairs)

    @evaluates("self")
    def evaluate(
        self,
        *args,
        num_samples: int = 1000,
        ks=(1, 5, 50),
        seed: int | None = None,
        max_pairs: int = 2**20,
        latent_diagnostics: bool = True,
        progress: bool = False,
        memory_budget: int | None = None,
        drop_large_ks: bool = False,
        float64_fallback: bool = True,
    ):
        """Importance-sampled log-likelihood, ELBOs and IWAE_k bounds per data point (see
        :func:`pyrovae.evaluation.importance.evaluate`). Runs with
        :func:`pyrovae.training.thread_default` torch threads unless you chose (one for a
        model under a million parameters: more only contend on a busy machine)."""
        with thread_default(self, progress):
            return self.evaluate_of(
                self.inputs(*args),
                num_samples=num_samples,
                ks=ks,
                seed=seed,
                max_pairs=max_pairs,
                latent_diagnostics=latent_diagnostics,
                progress=progress,
                memory_budget=memory_budget,
                drop_large_ks=drop_large_ks,
                float64_fallback=float64_fallback,
            )

    @evaluates("self")
    def discrete_posterior(
        self, *args, site: str, num_samples: int = 100, seed: int | None = None, max_pairs=2**16
    ) -> torch.Tensor:
        """p(site = c | x_n), shape (N, C), of an enumerated discrete site (a class label, a
        mixture component) by self-normalized importance sampling with ``num_samples``
        draws of the guide per point; see :func:`pyrovae.evaluation.discrete.discrete_posterior`.
        Its ``argmax(-1)`` classifies the points by the fitted model."""
        from pyrovae.evaluation.discrete import discrete_posterior

        checked = sampling_options(dict(num_samples=num_samples, seed=seed, max_pairs=max_pairs))
        with thread_default(self, progress=False):
            return discrete_posterior(
                self.model,
                self.guide,
                *self.inputs(*args),
                site=site,
                data_plate=self.data_plate,
                **checked,
            )

    # -- files -------------------------------------------------------------------------
    def payload(
        self,
        metadata: dict | None = None,
        training_state: dict | None = None,
        include_training_state: bool = True,
    ) -> dict:
        """Everything :meth:`save` writes (plain data and tensors).

        The optimizer and resume state are those of the last :meth:`fit`, or those read by
        :meth:`load` when no fit ran since; ``include_training_state=False`` leaves both out
        (a smaller file that cannot be resumed)."""
        from pyrovae import __version__

        optimizer_state = self.saved_optimizer_state_
        if self.optimizer_ is not None:
            optimizer_state = self.optimizer_.state_dict()
        if training_state is None:
            training_state = self.saved_training_state_
        if not include_training_state:
            optimizer_state = training_state = None
        return {
            "training_state": training_state,
            "metadata": dict(metadata or self.metadata_),
            "library_version": __version__,
            "config": None,
            "model_state": self.state_dict(),
            "train_config": None if self.train_config_ is None else self.train_config_.to_dict(),
            "optimizer_state": optimizer_state,
            "history": None if self.history_ is None else list(self.history_.records),
            "probe_inputs": self._saved_probe(),
        }

    def _saved_probe(self) -> list[torch.Tensor] | None:
        """The probe inputs, for function-style programs (whose parameters are created by a
        call): tensors only, as the file allows."""
        if self.pyro_params is None or self.probe_inputs_ is None:
            return None
        return [t.detach() for t in self.probe_inputs_]

    def save(
        self,
        path: str | Path,
        metadata: dict | None = None,
        training_state: dict | None = None,
        include_training_state: bool = True,
    ) -> Path:
        """Write parameters, optimizer state and history to one file (atomically); a
        ``training_state`` (from :func:`pyrovae.training.fit`, or kept from :meth:`load`)
        makes it resumable. The file holds tensors and plain data only: loading it never
        runs code (``torch.load(weights_only=True)``), and the model's code is not in it.
        With function-style programs it also holds the first (at most two) training data
        points, on which :meth:`load` creates and checks their parameters."""
        payload = self.payload(metadata, training_state, include_training_state)
        return write_checkpoint(payload, path)

    @classmethod
    def load(
        cls,
        path: str | Path,
        model,
        guide,
        data_plate: str = "data",
        device: str | torch.device = "cpu",
        allow_nonfinite: bool = False,
    ) -> LatentVariableModel:
        """A model saved by :meth:`save`, rebuilt around your ``model`` and ``guide`` code.

        The file holds no code: pass the same model and guide (functions, modules or an
        :class:`~pyrovae.models.autoguide.AmortizedGuide` built as before) and their
        parameters, history, optimizer and resume state are restored by name.

        The code's parameters must be the file's: one that the code renames, adds, drops or
        reshapes raises :class:`~pyrovae.checkpoint.CheckpointError` naming each, before
        this returns. Function-style programs create their parameters on their first call;
        the file holds their first (at most two) training data points, on which the
        programs run once here (random state and Pyro's parameter store left unchanged) to
        create them. Files written before the probe inputs were saved still load; their
        function-style parameters are restored by name on first use, and a mismatch raises
        :class:`~pyrovae.checkpoint.CheckpointError` at the end of the first call of model
        and guide (and at every call after).

        Example
        -------
        >>> fitted.save("model.pt")                                       # doctest: +SKIP
        >>> again = LatentVariableModel.load("model.pt", model, AmortizedGuide(model, x[:4]))
        """
        from pyrovae.training import resolve_device

        model = cls(model, guide, data_plate).to(resolve_device(device))
        return model.load_state(path, allow_nonfinite=allow_nonfinite)

    def check_resumable(self, payload: dict, path) -> None:
        """Raise ``ValueError`` naming every parameter of ``payload`` that this model's code
        renames, adds, drops or reshapes.

        Parameters of function-style programs that have not run yet (a file without probe
        inputs) are checked at their first use instead (:meth:`ParamRegistry.expect`)."""
        registry = self.pyro_params
        saved = _pyro_names({n: tuple(t.shape) for n, t in payload["model_state"].items()})
        mine = _pyro_names({n: tuple(t.shape) for n, t in self.state_dict().items()})
        if registry is not None and not registry.used_:
            later = {n[1:]: shape for n, shape in saved.items() if n.startswith("@")}
            saved = {n: shape for n, shape in saved.items() if not n.startswith("@")}
            mine = {n: shape for n, shape in mine.items() if not n.startswith("@")}
            registry.expect(later, path)
        problem = parameter_mismatch(_shown(saved), _shown(mine))
        if problem is not None:
            raise ValueError(
                f"the parameters in {path} do not match the model and guide code: {problem}"
            )

    def create_saved_parameters(self, payload: dict) -> None:
        """Create the parameters of function-style programs by one call on the probe inputs
        a file holds (see :meth:`prepare_parameters`), so that they can be checked against
        the file's before it is loaded; nothing to do without them."""
        probe = payload.get("probe_inputs")
        registry = self.pyro_params
        if probe is None or registry is None or registry.used_:
            return
        if not isinstance(probe, list | tuple) or not all(
            isinstance(t, torch.Tensor) and t.dim() > 0 and len(t) for t in probe
        ):
            raise TypeError("the probe inputs are not a list of tensors with data rows")
        try:
            with evaluation_mode(self, warn=False):  # no batch statistics updated, no dropout
                self.prepare_parameters(*probe)
        except Exception as error:
            raise ValueError(
                f"the model and guide fail on the first data points saved in the file "
                f"({type(error).__name__}: {error})"
            ) from error

    def load_state(self, path: str | Path, allow_nonfinite: bool = False) -> LatentVariableModel:
        """Load parameters, history and settings saved by :meth:`save` into this model
        (NaN or infinite parameters are refused unless ``allow_nonfinite``); see
        :meth:`load` for the check of the parameters' names and shapes."""
        payload = read_checkpoint(path, device=self.device, allow_nonfinite=allow_nonfinite)
        try:
            self.create_saved_parameters(payload)
            self.check_resumable(payload, path)
            self.load_state_dict(payload["model_state"])
            self.restore_records(payload)
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            raise CheckpointError(f"{path} does not hold a compatible model: {error}") from error
        return self

    def restore_records(self, payload: dict) -> None:
        """Training settings, history, optimizer state and metadata from a saved payload."""
        if payload.get("train_config") is not None:
            self.train_config_ = TrainConfig.from_dict(payload["train_config"])
        if payload.get("history") is not None:
            self.history_ = History([dict(record) for record in payload["history"]])
        optimizer_state = payload.get("optimizer_state")
        if optimizer_state is not None and not isinstance(optimizer_state, dict):
            raise TypeError(f"optimizer state is a {type(optimizer_state).__name__}")
        self.saved_optimizer_state_ = optimizer_state
        training_state = payload.get("training_state")
        if training_state is not None and not isinstance(training_state, dict):
            raise TypeError(f"training state is a {type(training_state).__name__}")
        self.saved_training_state_ = training_state
        self.metadata_ = dict(payload.get("metadata") or {})


def _pyro_names(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """State-dict names with a registry's parameters as ``"@"`` + their Pyro name."""
    named = {}
    for key, shape in shapes.items():
        role, _, rest = key.partition(".")
        if role in ("model", "guide") and rest.startswith("registry."):
            key = "@" + ParamRegistry.pyro_name(rest[len("registry.") :])
        named[key] = shape
    return named


def _shown(shapes: dict[str, tuple]) -> dict[str, tuple]:
    return {name.removeprefix("@"): shape for name, shape in shapes.items()}


def _cuda_devices(tensors: tuple) -> list[int]:
    return sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})


def _autograd_leaves(output: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors (requiring gradients) that ``output`` was computed from."""
    leaves, seen, stack = [], set(), [output.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):
            leaves.append(node.variable)
        stack.extend(parent for parent, _ in node.next_functions)
    return leaves
