"""Input checks and faults of issue 17: every public entry point checks all its arguments
before it changes any state (parameters, device, RNG, files); data outside the support of
any observed site is refused before training; legitimate NumPy values are accepted; failed
writes, interrupted writes and odd files get clear messages and leave no litter.

Each test failed on the code before issue 17 (see docs/reliability.md for what it did).
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae import VAE, VAEConfig
from pyrovae.checkpoint import CheckpointError, read_checkpoint, remove_stale_temporaries
from pyrovae.likelihoods import LIKELIHOODS, make_likelihood
from pyrovae.models.base import LocalParamsModule
from pyrovae.models.latent_variable import LatentVariableModel
from pyrovae.training import NonFiniteTrainingError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TINY = VAEConfig(num_features=4, latent_dim=1, hidden_sizes=(3,))
OPTIONS = dict(epochs=1, batch_size=16, progress=False, compile="none")


def binary(rows: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.bernoulli(
        torch.full((rows, 4), 0.5), generator=torch.Generator().manual_seed(seed)
    )


def build(config: VAEConfig = TINY) -> VAE:
    return VAE(config, seed=0)


def state_of(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: value.detach().clone() for name, value in module.state_dict().items()}


def assert_unchanged(module, before: dict, rng: torch.Tensor) -> None:
    """Same parameters (values, device), same torch RNG, no fit recorded."""
    state = module.state_dict()
    assert state.keys() == before.keys()
    for name, value in before.items():
        assert state[name].device == value.device, name
        assert torch.equal(state[name], value), name
    assert torch.equal(torch.get_rng_state(), rng)
    assert getattr(module, "history_", None) is None
    assert getattr(module, "optimizer_", None) is None


def refused(module, call, error=ValueError, match=None):
    """``call()`` raises ``error`` and leaves ``module`` and torch's RNG as they were."""
    before, rng = state_of(module), torch.get_rng_state()
    numpy_state = np.random.get_state()[1].copy()
    with pytest.raises(error, match=match) as caught:
        call()
    assert_unchanged(module, before, rng)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    return caught.value


# --------------------------------------------------------------------------- state of refused calls


def test_infinite_learning_rate_is_refused_before_any_parameter_changes():
    vae = build()
    refused(
        vae,
        lambda: vae.fit(binary(), learning_rate=float("inf"), **OPTIONS),
        match=r"learning_rate must be a finite number, got inf",
    )
    assert all(bool(torch.isfinite(p).all()) for p in vae.parameters())


def test_meta_device_is_refused_before_the_model_moves(tmp_path):
    vae = build()
    refused(vae, lambda: vae.fit(binary(), device="meta", **OPTIONS), match=r"device .*'meta'")
    assert all(p.device.type == "cpu" for p in vae.parameters())
    with pytest.raises(ValueError, match="unsupported device 'meta'"):
        VAE.load(vae.save(tmp_path / "model.pt"), device="meta")


@pytest.mark.parametrize("seed", [2**32, -1, 1.5, True, "3"])
def test_a_bad_seed_is_refused_before_any_generator_is_reseeded(seed):
    vae, x = build(), binary()
    message = r"seed must be a non-negative integer below 2\*\*32"
    refused(vae, lambda: vae.fit(x, seed=seed, **OPTIONS), match=message)
    refused(vae, lambda: vae.elbo(x, seed=seed), match=message)
    refused(vae, lambda: vae.evaluate(x, num_samples=4, ks=(1,), seed=seed), match=message)
    refused(vae, lambda: vae.sample(3, seed=seed), match=message)
    with pytest.raises(ValueError, match=message):
        VAE(TINY, seed=seed)


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"objective": "renyi", "renyi_alpha": float("nan")}, "renyi_alpha"),
        ({"objective": "renyi", "renyi_alpha": float("inf")}, "renyi_alpha"),
        ({"objective": "annealed_meanfield_elbo", "beta": float("inf")}, "beta"),
        ({"objective": "annealed_meanfield_elbo", "free_bits": float("inf")}, "free_bits"),
        ({"objective": "annealed_meanfield_elbo", "free_bits": float("nan")}, "free_bits"),
        ({"clip_norm": float("inf")}, "clip_norm"),
        ({"min_learning_rate": float("nan")}, "min_learning_rate"),
        ({"rollback_factor": float("nan")}, "rollback_factor"),
    ],
)
def test_nan_or_infinite_options_are_refused_by_name(options, name):
    vae = build()
    refused(
        vae,
        lambda: vae.fit(binary(), **{**OPTIONS, **options}),
        match=rf"{name} must be a finite number",
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"progress": None}, "progress must be True or False"),
        ({"objective": ["iwae"]}, "objective must be a string"),
        ({"device": "not-a-device"}, "device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"),
        ({"learning_rate": "0.01"}, "learning_rate must be a finite number"),
    ],
)
def test_options_of_the_wrong_type_are_refused_by_name(options, message):
    vae = build()
    refused(vae, lambda: vae.fit(binary(), **{**OPTIONS, **options}), match=message)


@pytest.mark.parametrize("sizes", [(0,), (5, -1)])
def test_degenerate_top_hidden_sizes_are_refused(sizes):
    with pytest.raises(ValueError, match="each top hidden size must be a positive integer"):
        VAEConfig(num_features=4, latent_dim=2, top_latent_dim=1, top_hidden_sizes=sizes)


def test_float64_data_beyond_float32_are_refused_before_training():
    config = VAEConfig(num_features=4, latent_dim=1, hidden_sizes=(3,), likelihood="normal")
    vae = build(config)
    data = np.zeros((32, 4))
    data[20, 3] = 1e300  # finite in float64, inf in the model's float32
    error = refused(vae, lambda: vae.fit(data, **OPTIONS))
    assert "beyond the range of float32" in str(error) and "row 20, column 3" in str(error)
    with pytest.raises(ValueError, match="beyond the range of float32"):
        vae.elbo(data)


def test_a_checkpoint_path_that_cannot_be_written_is_refused_before_training(tmp_path):
    vae, x = build(), binary()
    refused(
        vae,
        lambda: vae.fit(x, checkpoint_path=tmp_path, **OPTIONS),
        match=r"is a directory, not a file",
    )
    blocker = tmp_path / "file"
    blocker.write_text("")
    refused(
        vae,
        lambda: vae.fit(x, checkpoint_path=blocker / "model.pt", **OPTIONS),
        match=r"is not a directory",
    )
    same = tmp_path / "model.pt"
    refused(
        vae,
        lambda: vae.fit(x, x[:8], checkpoint_path=same, best_path=same, **OPTIONS),
        match=r"checkpoint_path and best_path name the same file .*model\.pt",
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    refused(vae, lambda: vae.fit(x, resume="no", **OPTIONS), match="resume must be True or False")


# --------------------------------------------------------------------------- supports


class PoissonModel(LocalParamsModule):
    """Poisson factorisation: x_n ~ Poisson(softplus(W z_n)), z_n ~ N(0, I)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((2, 4), 0.1))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))
            rate = nn.functional.softplus(z @ self.weight) + 1e-3
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)


class PoissonGuide(LocalParamsModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(4, 4)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            loc, raw = self.net(x).split(2, -1)
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


def counts(rows: int = 256) -> torch.Tensor:
    return torch.poisson(torch.full((rows, 4), 2.0), generator=torch.Generator().manual_seed(1))


def test_a_users_model_refuses_counts_outside_the_poisson_support_in_any_minibatch():
    """Pyro validates the support on the first step only: a negative, non-integer count
    in a later minibatch used to train silently (the Poisson log-density of -1.5 is finite)."""
    fitted = LatentVariableModel(PoissonModel(), PoissonGuide())
    x = counts()
    # A row outside the first minibatch of fit's data order (seed 0), which Pyro validates.
    first_batch = torch.randperm(256, generator=torch.Generator().manual_seed(0))[:32].tolist()
    row = max(set(range(256)) - set(first_batch))
    x[row, 2] = -1.5
    pattern = (
        r"training data: the value of the model's observed site 'x' lies outside the support "
        r"of its Poisson distribution \(IntegerGreaterThan\(lower_bound=0\)\): 1 entries, "
        rf"first at index \({row}, 2\) with value -1\.5"
    )
    options = {**OPTIONS, "batch_size": 32, "seed": 0}
    refused(fitted, lambda: fitted.fit(x, **options), match=pattern)
    valid = counts(64)
    valid[63, 0] = 0.5
    refused(fitted, lambda: fitted.fit(counts(), valid, **OPTIONS), match=r"validation data.*0\.5")
    refused(fitted, lambda: fitted.elbo(x), match="outside the support")
    refused(fitted, lambda: fitted.evaluate(x, num_samples=4, ks=(1,)), match="outside the support")
    assert list(pyro.get_param_store().keys()) == []
    fitted.fit(counts(), **OPTIONS)  # in-support counts train


@pytest.mark.parametrize("name", sorted(LIKELIHOODS))
def test_every_likelihood_checks_every_row_against_pyros_support(name):
    """The fast elementwise check agrees with the distribution's own support, and a value
    outside it in the last row (far past the first minibatch) is refused before training."""
    likelihood = make_likelihood(name, 3, 15)
    probe = torch.tensor([-2, -1, -0.5, 0, 1e-3, 0.5, 1, 1.5, 2, 3, 254, 255, 255.5, 256, 1e30])
    base = likelihood(torch.zeros(1, 3)).support
    while isinstance(base, torch.distributions.constraints.independent):
        base = base.base_constraint
    assert torch.equal(~likelihood.out_of_support(probe), base.check(probe)), name
    outside = probe[likelihood.out_of_support(probe)]
    if not len(outside):  # real-valued: only non-finite values, refused as such
        return
    config = VAEConfig(num_features=4, latent_dim=1, hidden_sizes=(3,), likelihood=name)
    vae = build(config)
    inside = probe[~likelihood.out_of_support(probe)]
    x = inside[torch.arange(128 * 4) % len(inside)].reshape(128, 4)
    x[127, 1] = outside[0]
    refused(
        vae,
        lambda: vae.fit(x, **OPTIONS),
        match=rf"data outside the support of the '{name}' likelihood .*index \(127, 1\)",
    )


# --------------------------------------------------------------------------- NumPy values


def test_numpy_scalars_and_arrays_are_accepted_wherever_python_values_are(tmp_path):
    config = VAEConfig(num_features=np.int64(4), latent_dim=np.int32(1), hidden_sizes=np.array([3]))

    assert config == TINY and type(config.num_features) is int
    vae, x = VAE(config, seed=np.int64(0)), binary()
    history = vae.fit(
        x.numpy(),
        epochs=np.int64(1),
        batch_size=np.int64(16),
        learning_rate=np.float32(1e-2),
        seed=np.uint32(3),
        progress=np.bool_(False),
        compile="none",
        checkpoint_path=tmp_path / "model.pt",
    )
    assert len(history) == 1
    saved = read_checkpoint(tmp_path / "model.pt")["train_config"]  # plain data only
    assert type(saved["epochs"]) is int and type(saved["learning_rate"]) is float
    result = vae.evaluate(x, num_samples=np.int64(10), ks=np.array([1, 5]), seed=np.int64(0))
    expected = vae.evaluate(x, num_samples=10, ks=(1, 5), seed=0)
    assert result.ks == (1, 5)
    for column, values in expected.per_datapoint.items():
        np.testing.assert_array_equal(result.per_datapoint[column], values, err_msg=column)
    numpy_elbo = vae.elbo(x, num_samples=np.int64(2), seed=np.int64(1), max_pairs=np.int64(64))
    assert torch.equal(numpy_elbo, vae.elbo(x, num_samples=2, seed=1, max_pairs=64))
    assert vae.sample(np.int64(3), seed=np.int64(2))[0].shape == (3, 4)


# --------------------------------------------------------------------------- messages


@pytest.mark.filterwarnings("ignore:Encountered NaN:UserWarning")
def test_a_non_finite_first_epoch_does_not_claim_an_intact_checkpoint(tmp_path):
    vae, path = build(), tmp_path / "model.pt"
    calls = []

    def nan_from_the_second_call(module, args, output):
        calls.append(1)
        return output * float("nan") if len(calls) >= 2 else None

    vae.model.decoder.register_forward_hook(nan_from_the_second_call)
    with pytest.raises(NonFiniteTrainingError, match=r"at epoch 1, step \d of 4") as caught:
        vae.fit(binary(), checkpoint_path=path, **{**OPTIONS, "epochs": 2})
    message = str(caught.value)
    assert "is intact" not in message
    assert f"No checkpoint was written before the failure ({path} untouched)" in message
    assert not path.exists()


def test_odd_files_are_named_for_what_they_are(tmp_path):
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match=r"pipe\.pt is a FIFO \(named pipe\), not a regular"):
        VAE.load(fifo)  # refused without opening it (opening would block)
    if Path("/dev/zero").exists():
        with pytest.raises(CheckpointError, match=r"/dev/zero is a character device"):
            VAE.load("/dev/zero")  # refused without reading it (reading never ends)
    with pytest.raises(CheckpointError, match=r"is a directory, not a model file"):
        VAE.load(tmp_path)
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        VAE.load(tmp_path / "missing.pt")


def test_a_full_disk_is_reported_as_such_and_keeps_the_previous_file(tmp_path, monkeypatch):
    """Writes to /dev/full fail with the kernel's ENOSPC; torch.save writing to such a file
    reported 'enforce fail ... unexpected pos' instead."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full on this system")
    path = tmp_path / "model.pt"
    build().save(path)
    previous = path.read_bytes()
    real_fdopen = os.fdopen

    def full_disk(descriptor, *args, **kwargs):
        os.close(descriptor)
        return real_fdopen(os.open("/dev/full", os.O_WRONLY), *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", full_disk)
    with pytest.raises(OSError) as caught:
        VAE(TINY, seed=1).save(path)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert f"cannot write model file {path}: No space left on device" in str(caught.value)
    assert "the previous file is unchanged" in str(caught.value)
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


LIMITED_WRITER = """
import resource, signal, sys
from pyrovae import VAE
vae = VAE(num_features=64, latent_dim=8, hidden_sizes=(256,), seed=0)  # about 0.4 MB
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # then writes past the limit fail with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (20000, resource.RLIM_INFINITY))
try:
    vae.save(sys.argv[1])
except Exception as error:
    print(type(error).__name__, getattr(error, "errno", None), error)
"""


def test_a_write_cut_short_by_the_kernel_is_reported_as_such(tmp_path):
    """A real short write (the file-size limit, like a disk filling up mid-file) made
    torch.save fail with 'enforce fail at inline_container.cc ... unexpected pos'; the
    model is now serialized in memory and written by pyrovae, which reports the OS error."""
    path = tmp_path / "model.pt"
    VAE(num_features=4, latent_dim=1, hidden_sizes=(3,), seed=0).save(path)
    previous = path.read_bytes()
    result = subprocess.run(
        [sys.executable, "-c", LIMITED_WRITER, str(path)],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    expected = (
        f"OSError {errno.EFBIG} [Errno {errno.EFBIG}] cannot write model file {path}: "
        "File too large; the previous file is unchanged"
    )
    assert result.stdout.strip() == expected, result.stdout + result.stderr[-2000:]
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]


# --------------------------------------------------------------------------- litter


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporary_files_are_removed_by_the_next_write(tmp_path):
    path = tmp_path / "model.pt"
    dead, now = _dead_pid(), time.time()
    names = {
        "dead writer": f".model.pt.writer-{dead}.abcd1234.tmp",
        "old, no pid": ".model.pt.k2j4h5g6.tmp",
        "old, live writer": f".model.pt.writer-{os.getpid()}.oldoldol.tmp",
        "fresh, live writer": f".model.pt.writer-{os.getpid()}.freshfre.tmp",
        "fresh, no pid": ".model.pt.fresh123.tmp",
        "another file's": f".other.pt.writer-{dead}.abcd1234.tmp",
        "not a temporary": f".model.pt.writer-{dead}.abcd1234.tmp.keep",
    }
    for label, name in names.items():
        (tmp_path / name).write_bytes(b"partial")
        if label.startswith("old"):
            os.utime(tmp_path / name, (now - 3600, now - 3600))
    build().save(path)
    left = {p.name for p in tmp_path.iterdir()}
    removed = {label for label, name in names.items() if name not in left}
    assert removed == {"dead writer", "old, no pid", "old, live writer"}
    assert "model.pt" in left
    assert remove_stale_temporaries(path) == []  # nothing stale remains


KILLED_WRITER = """
import os, sys, time
from pyrovae import VAE
vae = VAE(num_features=4, latent_dim=1, hidden_sizes=(3,), seed=0)
def stall(descriptor):  # the bytes are written; the process dies before the rename
    print("writing", flush=True)
    time.sleep(120)
os.fsync = stall
vae.save(sys.argv[1])
"""


def test_a_write_killed_midway_leaves_litter_that_the_next_write_removes(tmp_path):
    path = tmp_path / "model.pt"
    build().save(path)
    previous = path.read_bytes()
    writer = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(path)],
        cwd=PROJECT_ROOT,
        stdout=subprocess.PIPE,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        assert writer.stdout.readline().strip() == b"writing"
        os.kill(writer.pid, signal.SIGKILL)
        assert writer.wait(timeout=60) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
        writer.communicate()
    litter = [p.name for p in tmp_path.iterdir() if p.name != "model.pt"]
    assert len(litter) == 1 and litter[0].startswith(".model.pt.") and litter[0].endswith(".tmp")
    assert path.read_bytes() == previous  # the kill left the previous file intact
    VAE(TINY, seed=2).save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    assert all(bool(torch.isfinite(p).all()) for p in VAE.load(path).parameters())


# --------------------------------------------------------------------------- issue 24: raw errors

EVALUATE = dict(num_samples=4, ks=(1,))


def normal_model(x):
    """A user's model of 4 features (its weight created on first use)."""
    weight = pyro.param("weight", torch.zeros(1, 4))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
        pyro.sample("x", dist.Normal(z @ weight, 1.0).to_event(1), obs=x)


def normal_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0).to_event(1))


def users_model() -> LatentVariableModel:
    model = LatentVariableModel(normal_model, normal_guide)
    model.elbo(torch.zeros(2, 4))  # creates the parameters, as a first fit would
    return model


@pytest.mark.parametrize(
    ("kind", "match"),
    [("sparse", r"data.* is a sparse_coo tensor; pass a dense one"), ("meta", r"'meta' device")],
)
def test_sparse_and_meta_tensors_are_refused_as_data(kind, match):
    """Before: NotImplementedError "Could not run 'aten::ne.Scalar' with arguments from the
    'SparseCPU' backend ..." and "Tensor.item() cannot be called on meta tensors"."""
    from pyrovae.evaluation.importance import evaluate

    def data(rows: int = 64):
        x = binary(rows)
        return x.to_sparse() if kind == "sparse" else torch.empty(x.shape, device="meta")

    vae, users = build(), users_model()
    refused(vae, lambda: vae.fit(data(), **OPTIONS), TypeError, match)
    refused(vae, lambda: vae.elbo(data()), TypeError, match)
    refused(vae, lambda: vae.evaluate(data(), **EVALUATE), TypeError, match)
    refused(vae, lambda: evaluate(vae.model, vae.guide, data(), **EVALUATE), TypeError, match)
    refused(users, lambda: users.evaluate(data(), **EVALUATE), TypeError, match)


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.full((3, 4), float("nan")), r"data argument 0 contains NaN .*3 entries|12 entries"),
        (torch.empty(0, 4), r"data argument 0 is empty: it has no data points"),
    ],
)
def test_nan_or_empty_data_are_refused_by_evaluate_before_it_seeds(x, match):
    """Before: a multi-line Pyro support error for NaN, ``ZeroDivisionError: size cannot be
    zero`` for no rows; and the seed was set first."""
    from pyrovae.evaluation.importance import evaluate

    vae = build()
    refused(vae, lambda: evaluate(vae.model, vae.guide, x, seed=3, **EVALUATE), match=match)


@pytest.mark.parametrize(
    ("shape", "match"),
    [
        ((8, 4, 2), r"observed site 'x' has a Normal distribution of batch shape \(8,\) and "),
        ((8, 5), r"event shape \(4,\), which its value of shape \(8, 5\) does not fit"),
    ],
)
def test_data_of_the_wrong_shape_for_a_users_model_are_refused_in_one_line(shape, match):
    """Before: ``RuntimeError: mat1 and mat2 shapes cannot be multiplied`` with Pyro's trace
    shapes appended, raised from the guide."""
    model = users_model()
    error = refused(model, lambda: model.evaluate(torch.zeros(shape), **EVALUATE), match=match)
    assert "\n" not in str(error)
    refused(model, lambda: model.elbo(torch.zeros(shape)), match=match)


def test_a_users_model_failing_on_the_data_says_so_in_one_line():
    def model(x):  # autoregressive: x itself enters the location
        weight = pyro.param("weight", torch.zeros(4, 4))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([1]).to_event(1))
            pyro.sample("x", dist.Normal(z + x @ weight, 1.0).to_event(1), obs=x)

    users = LatentVariableModel(model, normal_guide)
    users.elbo(torch.zeros(2, 4))
    error = refused(
        users,
        lambda: users.elbo(torch.zeros(6, 5)),
        match=r"the model fails on data of shape \(6, 5\) \(mat1 and mat2 shapes cannot be",
    )
    assert "\n" not in str(error)


def test_decode_refuses_codes_of_the_wrong_latent_width():
    """Before: ``RuntimeError: mat1 and mat2 shapes cannot be multiplied (3x5 and 1x3)``."""
    vae = build()
    width = r"z must have shape \(num_points, 1\)"
    refused(vae, lambda: vae.decode(torch.zeros(3, 5)), match=width)
    refused(vae, lambda: vae.decode(torch.full((3, 1), float("nan"))), match="z contains NaN")
    assert vae.decode(np.zeros((3, 1))).shape == (3, 4)
    conditional = VAE(num_features=4, latent_dim=1, hidden_sizes=(3,), condition_dim=2, seed=0)
    refused(
        conditional,
        lambda: conditional.decode(torch.zeros(3, 1), condition=torch.zeros(3, 5)),
        match=r"condition must have shape \(3, 2\) \(one row per point\) or \(2,\)",
    )
    assert conditional.decode(torch.zeros(3, 1), condition=torch.zeros(2)).shape == (3, 4)


def test_an_unknown_device_name_is_refused_by_load(tmp_path):
    """Before: torch's RuntimeError listing every device type it knows."""
    path = build().save(tmp_path / "model.pt")
    with pytest.raises(ValueError, match=r"unknown device 'banana': use 'auto', 'cpu'"):
        VAE.load(path, device="banana")


@pytest.mark.parametrize("sizes", [None, "256", 256, {256}])
def test_hidden_sizes_that_are_not_a_sequence_are_refused_by_name(sizes):
    """Before: ``'NoneType' object is not iterable``, or '256' taken as sizes 2, 5, 6."""
    with pytest.raises(ValueError, match=r"hidden_sizes must be a sequence of integers"):
        VAE(num_features=4, hidden_sizes=sizes)
    assert VAE(num_features=4, hidden_sizes=np.array([3]), seed=0).config.hidden_sizes == (3,)
    assert VAE(num_features=4, hidden_sizes=[], seed=0).config.hidden_sizes == ()


def test_an_elbo_that_overflows_is_refused_not_returned_as_nan():
    """Before: ``VAE(likelihood='normal').elbo`` of data at 1e38 (finite in float32)
    returned NaN without a word."""
    vae = VAE(num_features=4, latent_dim=1, hidden_sizes=(3,), likelihood="normal", seed=0)
    x = torch.full((2, 4), 1e38)
    refused(vae, lambda: vae.elbo(x), match=r"the ELBO is nan for 2 of 2 data points .*1e\+38")
    assert bool(torch.isfinite(vae.elbo(torch.ones(2, 4))).all())


def test_max_pairs_none_is_refused_before_the_rng_moves():
    """Before: ``vae.evaluate(x, max_pairs=None)`` drew the block seed from torch's RNG,
    then refused; ``vae.elbo(x, max_pairs=None)`` failed with a TypeError."""
    vae, users, x = build(), users_model(), binary(8)
    match = "max_pairs must be a positive integer, got None"
    refused(vae, lambda: vae.evaluate(x, max_pairs=None, **EVALUATE), match=match)
    refused(vae, lambda: vae.elbo(x, max_pairs=None), match=match)
    x = torch.zeros(8, 4)
    refused(users, lambda: users.evaluate(x, max_pairs=None, **EVALUATE), match=match)


def test_a_data_scale_far_from_unity_is_named_when_training_fails():
    """Before: ``fit(digits * 1e6)`` advised a rollback and a lower learning rate."""
    vae = VAE(num_features=4, latent_dim=1, hidden_sizes=(3,), likelihood="normal", seed=0)
    with pytest.raises(NonFiniteTrainingError) as caught:
        vae.fit(binary() * 1e30, **OPTIONS)
    message = str(caught.value)
    assert "The training data reach |x| = 1e+30" in message
    assert "rescale them" in message and "on_nonfinite" not in message
    vae = VAE(num_features=4, latent_dim=1, hidden_sizes=(3,), likelihood="normal", seed=0)
    with pytest.raises(NonFiniteTrainingError, match="on_nonfinite='rollback'") as caught:
        vae.fit(binary(), learning_rate=1e30, **OPTIONS)
    assert "rescale" not in str(caught.value)


def test_load_names_a_latent_variable_model_file_for_what_it_is(tmp_path):
    """Before: ``does not hold a compatible VAE: 'NoneType' object is not iterable``."""
    path = users_model().save(tmp_path / "users.pt")
    with pytest.raises(CheckpointError, match=r"LatentVariableModel.load\(path, model, guide\)"):
        VAE.load(path)


def malformed_optimizer_states(state: dict):
    """(what is wrong, optimizer state) pairs, each from a real Adam state."""
    import copy

    def changed(change):
        broken = copy.deepcopy(state)
        change(broken)
        return broken

    first = min(state["state"])
    yield "moment shape", changed(lambda s: s["state"][first].update(exp_avg=torch.zeros(7)))
    yield "parameter count", changed(lambda s: s["param_groups"][0]["params"].pop())
    yield (
        "two groups",
        changed(lambda s: s["param_groups"].append({**s["param_groups"][0], "params": [99]})),
    )
    yield "no indices", changed(lambda s: s["param_groups"][0].update(params="all"))
    yield "no learning rate", changed(lambda s: s["param_groups"][0].update(lr=float("nan")))
    yield "stray moments", changed(lambda s: s["state"].update({99: {}}))


def test_a_malformed_optimizer_state_is_refused_by_load_and_resume(tmp_path):
    """Before: any of these loaded silently (and a resume failed after reseeding, or
    trained with moments of the wrong shape)."""
    from pyrovae.checkpoint import write_checkpoint

    source = tmp_path / "run.pt"
    build().fit(binary(), checkpoint_path=source, **OPTIONS)
    payload = read_checkpoint(source)
    for _problem, state in malformed_optimizer_states(payload["optimizer_state"]):
        path = write_checkpoint({**payload, "optimizer_state": state}, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=r"bad\.pt (is corrupt or invalid|does not)"):
            VAE.load(path)
        vae = build()
        refused(
            vae,
            lambda path=path, vae=vae: vae.fit(
                binary(), checkpoint_path=path, resume=True, **{**OPTIONS, "epochs": 2}
            ),
            CheckpointError,
            match=r"bad\.pt",
        )


def test_string_or_non_binary_arrays_in_a_binarized_mnist_archive_are_refused(tmp_path):
    """Before: strings such as '1' were converted silently and training exited 0; 2.5 was
    accepted as a binary pixel."""
    from pyrovae.data import load_binarized_mnist

    for values, match in [
        (np.full((3, 784), "1"), r"array 'train' holds strings of dtype <U1, not numbers"),
        (np.full((3, 784), 2.5), r"values other than 0 and 1 \(2352 entries, first at \(0, 0\)"),
    ]:
        np.savez(tmp_path / "binarized_mnist.npz", train=values, valid=values, test=values)
        with pytest.raises(ValueError, match=match):
            load_binarized_mnist(tmp_path, download=False)
    ones = np.ones((3, 784), np.uint8)
    np.savez(tmp_path / "binarized_mnist.npz", train=ones, valid=ones, test=ones)
    assert load_binarized_mnist(tmp_path, download=False).train.shape == (3, 784)
