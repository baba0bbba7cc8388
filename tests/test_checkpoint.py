"""Model files: exact round trips, atomic writes, and refusal (with a clear CheckpointError) of
unsafe, corrupt, foreign, newer or inconsistent files, without ever executing their code.
"""

import os
import pickle
import shlex
import stat
import warnings

import numpy as np
import pytest
import torch

from pyrovae import VAE, TrainConfig, VAEConfig
from pyrovae.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, read_checkpoint
from pyrovae.data import binarize, load_digits

CONFIG = VAEConfig(num_features=64, latent_dim=3, hidden_sizes=(16,), image_shape=(8, 8))


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.fixture(scope="module")
def fixed_batch(digits) -> torch.Tensor:
    return binarize(digits.valid[:20], generator=torch.Generator().manual_seed(1))


@pytest.fixture
def trained(digits) -> VAE:
    torch.manual_seed(0)
    vae = VAE(CONFIG)
    vae.fit(
        digits.train[:256],
        digits.valid[:64],
        binarize="dynamic",
        epochs=2,
        batch_size=64,
        learning_rate=2e-3,
        seed=3,
        progress=False,
    )
    return vae


@pytest.fixture
def saved(trained, tmp_path):
    path = tmp_path / "model.pt"
    trained.save(path)
    return path


def raw_payload(path) -> dict:
    """The payload dict of a model file (header and checksum checked and stripped)."""
    return read_checkpoint(path)


# --------------------------------------------------------------------------- round trip


def test_round_trip_reproduces_model_exactly(trained, saved, fixed_batch):
    loaded = VAE.load(saved)
    assert loaded.config == trained.config == CONFIG
    assert loaded.train_config_ == trained.train_config_
    assert isinstance(loaded.train_config_, TrainConfig) and loaded.train_config_.seed == 3
    assert loaded.history_.records == trained.history_.records
    assert len(loaded.history_) == 2

    original_state, loaded_state = trained.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for name, value in original_state.items():
        assert torch.equal(loaded_state[name], value), name
        assert loaded_state[name].device.type == "cpu"

    for analytic_kl in (False, True):
        expected = trained.elbo(fixed_batch, num_samples=4, analytic_kl=analytic_kl, seed=7)
        actual = loaded.elbo(fixed_batch, num_samples=4, analytic_kl=analytic_kl, seed=7)
        assert torch.equal(actual, expected)
    assert torch.equal(loaded.sample(5, seed=2)[1], trained.sample(5, seed=2)[1])


def test_metadata_round_trip(trained, tmp_path):
    path = trained.save(tmp_path / "with-metadata.pt", metadata={"dataset": "digits", "k": [1, 5]})
    loaded = VAE.load(path)
    assert loaded.metadata_ == {"dataset": "digits", "k": [1, 5]}
    # Saving the loaded model again keeps its metadata.
    loaded.save(tmp_path / "again.pt")
    assert VAE.load(tmp_path / "again.pt").metadata_ == {"dataset": "digits", "k": [1, 5]}
    assert VAE.load(trained.save(tmp_path / "none.pt")).metadata_ == {}


def test_round_trip_keeps_adam_state_and_resumes(trained, saved):
    loaded = VAE.load(saved)
    original = trained.optimizer_.state_dict()
    state = loaded.saved_optimizer_state_
    assert loaded.optimizer_ is None  # the optimizer itself is rebuilt by the next fit
    assert state["param_groups"][0]["lr"] == pytest.approx(2e-3)
    assert state["param_groups"][0]["params"] == original["param_groups"][0]["params"]
    assert state["state"].keys() == original["state"].keys()
    assert len(state["state"]) == len(list(trained.parameters()))
    for index, moments in original["state"].items():
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(state["state"][index][key], moments[key]), (index, key)
    steps = float(state["state"][0]["step"])
    assert steps == 2 * (256 // 64)  # two epochs of four batches
    # The saved state fits a fresh Adam over the loaded model's parameters, shapes included.
    adam = torch.optim.Adam(loaded.parameters(), lr=2e-3)
    adam.load_state_dict(state)
    for parameter in loaded.parameters():
        assert adam.state[parameter]["exp_avg"].shape == parameter.shape


def test_untrained_model_round_trip(tmp_path, fixed_batch):
    vae = VAE(num_features=64, latent_dim=2, hidden_sizes=(8,), likelihood="normal-per-feature")
    path = vae.save(tmp_path / "nested" / "dir" / "untrained.pt")
    assert path == tmp_path / "nested" / "dir" / "untrained.pt" and path.is_file()
    loaded = VAE.load(str(path))
    assert loaded.config == vae.config
    assert loaded.history_ is None and loaded.train_config_ is None
    assert loaded.saved_optimizer_state_ is None
    assert torch.equal(
        loaded.elbo(fixed_batch, num_samples=2, seed=0),
        vae.elbo(fixed_batch, num_samples=2, seed=0),
    )
    payload = raw_payload(path)
    assert payload["format"] == FORMAT and payload["format_version"] == FORMAT_VERSION


# --------------------------------------------------------------------------- atomic writes


def test_save_leaves_no_temporary_files_and_replaces_existing(trained, tmp_path, fixed_batch):
    path = tmp_path / "model.pt"
    other = VAE(CONFIG)
    other.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    trained.save(path)  # over the existing file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    loaded = VAE.load(path)
    assert torch.equal(
        loaded.elbo(fixed_batch, num_samples=2, seed=1),
        trained.elbo(fixed_batch, num_samples=2, seed=1),
    )
    assert not torch.equal(
        loaded.elbo(fixed_batch, num_samples=2, seed=1),
        other.elbo(fixed_batch, num_samples=2, seed=1),
    )


def test_failed_save_keeps_previous_file_and_cleans_up(trained, tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    VAE(CONFIG).save(path)
    previous = path.read_bytes()
    real_save = torch.save

    def crash_half_way(obj, handle, *args, **kwargs):
        real_save(obj, handle, *args, **kwargs)
        handle.truncate(100)  # a partial file, then the failure
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_half_way)
    with pytest.raises(OSError, match="No space left"):
        trained.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
    VAE.load(path)  # still a valid model file


def test_saved_file_has_ordinary_permissions(trained, tmp_path):
    umask = os.umask(0)
    os.umask(umask)
    path = trained.save(tmp_path / "model.pt")
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask


# --------------------------------------------------------------------------- untrusted files


class _RunsShellCommand:
    """Unpickling this object runs a shell command (the classic pickle exploit)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("writer", ["torch.save", "raw pickle"])
def test_files_that_would_execute_code_are_refused(writer, tmp_path):
    marker = tmp_path / "pwned"
    exploit = _RunsShellCommand(f"touch {shlex.quote(str(marker))}")
    path = tmp_path / "evil.pt"
    if writer == "torch.save":
        torch.save({"format": FORMAT, "format_version": 1, "config": exploit}, path)
    else:
        with open(path, "wb") as handle:
            pickle.dump(exploit, handle)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch warns about the pickle protocol
        with pytest.raises(CheckpointError, match=r"refusing to load .*evil\.pt.*execute code"):
            VAE.load(path)
        with pytest.raises(CheckpointError):
            read_checkpoint(path)
    assert not marker.exists()

    # The file really is dangerous: an unsafe load runs the command.
    if writer == "torch.save":
        torch.load(path, weights_only=False)
    else:
        with open(path, "rb") as handle:
            pickle.load(handle)  # deliberately unsafe, on our own test file
    assert marker.exists()


# --------------------------------------------------------------------------- corrupt files


def test_truncated_file_is_refused(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"model\.pt is truncated or corrupt"):
        VAE.load(saved)


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.pt is truncated or corrupt"):
        VAE.load(path)


def test_random_bytes_are_refused(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(CheckpointError, match=r"noise\.pt"):
            VAE.load(path)


def test_random_bytes_are_reported_as_corrupt_not_as_unsafe(tmp_path):
    path = tmp_path / "noise.pt"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(CheckpointError, match=r"truncated or corrupt|not a pyrovae model"):
            VAE.load(path)


def test_missing_file_is_refused(tmp_path):
    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        VAE.load(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError, match="is a directory, not a model file"):
        VAE.load(tmp_path)  # a directory is not a model file either


def test_newer_format_version_is_refused_with_upgrade_hint(saved, tmp_path):
    payload = raw_payload(saved)
    payload["format_version"] = FORMAT_VERSION + 1
    newer = tmp_path / "newer.pt"
    torch.save(payload, newer)
    with pytest.raises(CheckpointError, match=rf"format version {FORMAT_VERSION + 1}.*upgrade"):
        VAE.load(newer)
    payload["format_version"] = FORMAT_VERSION  # the same file at the current version loads
    torch.save(payload, newer)
    VAE.load(newer)


@pytest.mark.parametrize(
    "content",
    [
        {"weights": torch.zeros(3)},
        torch.zeros(3),
        [1, 2, 3],
        {"format": "other-library", "config": {}},
    ],
    ids=["dict", "tensor", "list", "other-format"],
)
def test_valid_torch_file_that_is_not_a_pyrovae_model_is_refused(content, tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save(content, path)
    with pytest.raises(CheckpointError, match=r"foreign\.pt is not a pyrovae model file"):
        VAE.load(path)


def test_config_that_does_not_match_state_dict_is_refused(saved, tmp_path):
    payload = raw_payload(saved)
    payload["config"] = {**payload["config"], "latent_dim": 5}
    path = tmp_path / "mismatch.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"mismatch\.pt does not hold a compatible VAE"):
        VAE.load(path)


@pytest.mark.parametrize(
    "change",
    [
        lambda p: p.pop("model_state"),
        lambda p: p.pop("config"),
        lambda p: p["config"].update(hidden_sizez=(16,)),
        lambda p: p["config"].update(likelihood="poisson"),
        lambda p: p["model_state"].pop(next(iter(p["model_state"]))),
    ],
    ids=["no-state", "no-config", "unknown-config-key", "unknown-likelihood", "missing-tensor"],
)
def test_incomplete_or_invalid_model_payload_is_refused(change, saved, tmp_path):
    payload = raw_payload(saved)
    change(payload)
    path = tmp_path / "broken.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match=r"broken\.pt does not hold a compatible VAE"):
        VAE.load(path)


@pytest.mark.parametrize(
    "change",
    [lambda p: p["train_config"].update(learning_rat=1.0), lambda p: p.update(history=5)],
    ids=["train-config", "history"],
)
def test_invalid_train_config_or_history_is_refused(change, saved, tmp_path):
    payload = raw_payload(saved)
    change(payload)
    path = tmp_path / "broken.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        VAE.load(path)


def test_non_integer_format_version_is_refused(saved, tmp_path):
    payload = raw_payload(saved)
    payload["format_version"] = "2"
    path = tmp_path / "odd.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError):
        VAE.load(path)


def test_loading_onto_unavailable_cuda_is_not_reported_as_corruption(saved):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="CUDA") as caught:
        VAE.load(saved, device="cuda")
    assert "corrupt" not in str(caught.value)


# --------------------------------------------------------------------------- issue 17


def test_model_files_start_with_a_checksummed_header(saved):
    data = saved.read_bytes()
    header, _, body = data.partition(b"\n")
    version, length, digest = header.decode().removeprefix("pyrovae-model ").split(" ")
    assert int(version) == FORMAT_VERSION and int(length) == len(body)
    assert body.startswith(b"PK\x03\x04")  # the torch.save archive follows the header
    import hashlib

    expected = hashlib.sha256(f"pyrovae-model {version} {length}\n".encode() + body)
    assert digest == f"sha256={expected.hexdigest()}"


def test_non_finite_parameters_are_refused_unless_allowed(trained, tmp_path):
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.fill_(float("nan"))
    path = trained.save(tmp_path / "diverged.pt")
    pattern = (
        r"model file .*diverged\.pt holds non-finite values \(\d+ of \d+ in parameter '.+' and "
        r"\d+ more tensor\(s\)\), e\.g\. from a diverged run; pass allow_nonfinite=True"
    )
    with pytest.raises(CheckpointError, match=pattern):
        VAE.load(path)
    with pytest.raises(CheckpointError, match=pattern):
        VAE(CONFIG).load_state(path)
    loaded = VAE.load(path, allow_nonfinite=True)
    assert all(bool(torch.isnan(p).all()) for p in loaded.parameters())
    assert all(bool(torch.isnan(p).all()) for p in VAE(CONFIG).load_state(path, True).parameters())


def test_non_finite_optimizer_moments_are_refused(saved, tmp_path):
    from pyrovae.checkpoint import write_checkpoint

    payload = read_checkpoint(saved)
    payload["optimizer_state"]["state"][3]["exp_avg_sq"][0] = float("inf")
    path = write_checkpoint(payload, tmp_path / "moments.pt")
    with pytest.raises(CheckpointError, match=r"1 of \d+ in optimizer exp_avg_sq of parameter 3"):
        VAE.load(path)


def test_resuming_from_non_finite_parameters_is_refused_before_any_change(digits, tmp_path):
    path = tmp_path / "model.pt"
    options = dict(binarize="dynamic", batch_size=64, seed=3, progress=False, compile="none")
    torch.manual_seed(0)
    VAE(CONFIG).fit(digits.train[:128], checkpoint_path=path, epochs=1, **options)
    payload = read_checkpoint(path)
    first = next(iter(payload["model_state"]))
    payload["model_state"][first][...] = float("nan")
    from pyrovae.checkpoint import write_checkpoint

    write_checkpoint(payload, path)
    vae = VAE(CONFIG, seed=1)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    with pytest.raises(CheckpointError, match="non-finite values"):
        vae.fit(digits.train[:128], checkpoint_path=path, resume=True, epochs=2, **options)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in before.items())
    assert vae.history_ is None


def test_legacy_payloads_of_the_wrong_shape_are_corrupt_not_a_crash(saved, tmp_path):
    """Format 1 files have no checksum: a damaged pickle can give any Python structure.
    Entries of the wrong type are refused as corrupt instead of failing later with an
    AttributeError or TypeError."""
    payload = raw_payload(saved)
    for key, value in [
        ("model_state", [1, 2]),
        ("history", [1]),
        ("optimizer_state", {"state": 3}),
        ("metadata", "x"),
        ("model_state", {5: torch.zeros(1)}),
    ]:
        path = tmp_path / "odd.pt"
        torch.save({**payload, key: value}, path)
        with pytest.raises(CheckpointError, match=r"odd\.pt is corrupt or invalid"):
            VAE.load(path)


def test_data_a_model_file_cannot_hold_is_refused_before_writing(trained, tmp_path):
    """torch.load(weights_only=True) refuses NumPy values and other objects: such a file
    could be written but never read back; the previous file is kept instead."""
    path = trained.save(tmp_path / "model.pt")
    previous = path.read_bytes()
    for metadata, where in [
        ({"score": np.float64(1.5)}, r"payload\['metadata'\]\['score'\] is a numpy\.float64"),
        ({"runs": [1, np.int64(2)]}, r"payload\['metadata'\]\['runs'\]\[1\] is a numpy\.int64"),
        ({"data": tmp_path}, r"payload\['metadata'\]\['data'\] is a pathlib\.PosixPath"),
    ]:
        with pytest.raises(TypeError, match=where + r"; model files hold plain data only"):
            trained.save(path, metadata=metadata)
        assert path.read_bytes() == previous
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]
