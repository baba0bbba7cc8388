"""Fault injection on model files (issue 17): every region of a small model file is damaged
systematically (bit flips, changed bytes, zeroed blocks, truncation, appended bytes), sampled
deterministically, and each damaged file must either be refused with a CheckpointError naming
the file or load exactly the data that was written: never a silent change, never another
exception. The counts are printed (``-s``) and recorded in docs/reliability.md.

The file is a tiny model (4 features, 1 latent dimension, 2 hidden units) fitted for two
epochs with a checkpoint, so it holds every part a real one does (parameters, Adam moments,
history, configs, RNG and data-order state) in about 35 KB; corruptions are applied in place
with ``pwrite`` and undone, so the sweep of ~3,700 cases takes a few seconds.
"""

from __future__ import annotations

import collections
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from pyrovae import VAE, VAEConfig
from pyrovae.checkpoint import MAGIC, CheckpointError, read_checkpoint

TINY = VAEConfig(num_features=4, latent_dim=1, hidden_sizes=(2,))
TRAIN_OPTIONS = dict(
    epochs=2, batch_size=16, learning_rate=1e-2, seed=1, progress=False, compile="none"
)


def tiny_data() -> torch.Tensor:
    return torch.bernoulli(torch.full((32, 4), 0.5), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    """A resumable checkpoint of the tiny model (format 2: header, checksum, archive)."""
    path = tmp_path_factory.mktemp("tiny") / "model.pt"
    torch.manual_seed(0)
    x = tiny_data()
    VAE(TINY).fit(x, x[:8], checkpoint_path=path, **TRAIN_OPTIONS)
    return path


@pytest.fixture(scope="module")
def legacy_file(model_file, tmp_path_factory) -> Path:
    """The same payload in format 1: a bare torch.save archive without a checksum."""
    payload = read_checkpoint(model_file)
    payload["format_version"] = 1
    path = tmp_path_factory.mktemp("legacy") / "legacy.pt"
    torch.save(payload, path)
    return path


# --------------------------------------------------------------------------- corruptions


def corruptions(data: bytes, header: int, seed: int = 17):
    """Deterministic damage to every region of ``data`` (``header``: length of the header
    line, 0 for a file without one). Yields ``(kind, operation)`` with operations
    ``("set", offset, bytes)``, ``("truncate", length)`` and ``("append", bytes)``."""
    rng = np.random.default_rng(seed)
    size = len(data)
    for offset in range(header):  # every byte of the header: each bit, zero, 0xFF
        for bit in range(8):
            yield "header bit flip", ("set", offset, bytes([data[offset] ^ (1 << bit)]))
        for value in (0x00, 0xFF):
            if data[offset] != value:
                yield "header byte", ("set", offset, bytes([value]))
    body = np.arange(header, size)
    edges = [*range(header, min(header + 100, size)), *range(max(header, size - 200), size)]
    for offset in edges:  # first local zip header; central directory and its end record
        yield "bit flip (archive edges)", ("set", offset, bytes([data[offset] ^ (1 << offset % 8)]))
    for offset in sorted(rng.choice(body, size=min(1500, len(body)), replace=False)):
        bit = int(rng.integers(8))
        yield "bit flip", ("set", int(offset), bytes([data[offset] ^ (1 << bit)]))
    for offset in sorted(rng.choice(body, size=min(500, len(body)), replace=False)):
        value = int(rng.integers(255))
        value += value >= data[offset]  # any other byte value
        yield "changed byte", ("set", int(offset), bytes([value]))
    for block in (8, 64, 512, 4096):
        for offset in np.linspace(0, size - 1, 50).astype(int):
            zeros = bytes(min(block, size - offset))
            if data[offset : offset + block] != zeros:
                yield f"zeroed block of {block}", ("set", int(offset), zeros)
    lengths = {0, 1, max(header - 1, 0), header, header + 1, size - 1}
    lengths |= set(np.linspace(0, size - 1, 100).astype(int).tolist())
    for length in sorted(lengths):
        yield "truncation", ("truncate", int(length))
    for extra in (b"\0", b"x" * 100, data):
        yield "appended bytes", ("append", extra)


class InPlace:
    """Applies one corruption to a copy of the file and undoes it (fast: a few bytes each)."""

    def __init__(self, path: Path, data: bytes):
        path.write_bytes(data)
        self.path, self.data = path, data
        self.descriptor = os.open(path, os.O_RDWR)

    def apply(self, operation) -> None:
        if operation[0] == "set":
            os.pwrite(self.descriptor, operation[2], operation[1])
        elif operation[0] == "truncate":
            os.ftruncate(self.descriptor, operation[1])
        else:
            os.pwrite(self.descriptor, operation[1], len(self.data))

    def undo(self, operation) -> None:
        if operation[0] == "set":
            offset, length = operation[1], len(operation[2])
            os.pwrite(self.descriptor, self.data[offset : offset + length], offset)
        elif operation[0] == "truncate":
            os.pwrite(self.descriptor, self.data[operation[1] :], operation[1])
        else:
            os.ftruncate(self.descriptor, len(self.data))

    def close(self) -> None:
        os.close(self.descriptor)


def same(first, second) -> bool:
    """Equal plain data: tensors bit for bit (dtype, shape, bytes), containers element-wise."""
    if isinstance(first, torch.Tensor):
        return (
            isinstance(second, torch.Tensor)
            and first.dtype == second.dtype
            and first.shape == second.shape
            and first.cpu().numpy().tobytes() == second.cpu().numpy().tobytes()
        )
    if isinstance(first, dict):
        return (
            isinstance(second, dict)
            and list(first) == list(second)
            and all(same(first[k], second[k]) for k in first)
        )
    if isinstance(first, (list, tuple)):
        return (
            type(first) is type(second)
            and len(first) == len(second)
            and all(same(a, b) for a, b in zip(first, second, strict=True))
        )
    if isinstance(first, float) and isinstance(second, float) and first != first:
        return second != second  # NaN
    return type(first) is type(second) and first == second


def sweep(source: Path, work: Path, load=read_checkpoint, every: int = 1) -> dict:
    """Outcome counts of every ``every``-th corruption of ``source``: ``refused`` (a
    CheckpointError naming the file), ``identical`` (loads the written data), ``changed``
    (loads other data, silently), ``escaped <type>`` (another exception, or a
    CheckpointError that does not name the file). Examples of the bad outcomes are kept."""
    data = source.read_bytes()
    original = read_checkpoint(source)
    header = data.index(b"\n") + 1 if data.startswith(MAGIC) else 0
    target = work / "damaged.pt"
    file = InPlace(target, data)
    counts, examples = collections.Counter(), collections.defaultdict(list)
    by_kind = collections.defaultdict(collections.Counter)
    try:
        for number, (kind, operation) in enumerate(corruptions(data, header)):
            if number % every:
                continue
            file.apply(operation)
            try:
                loaded = load(target)
            except CheckpointError as error:
                outcome = "refused" if str(target) in str(error) else "escaped (unnamed file)"
            except Exception as error:  # noqa: BLE001 - counted as a failure of the test
                outcome = f"escaped {type(error).__name__}"
            else:
                loaded = loaded if isinstance(loaded, dict) else None
                outcome = "identical" if loaded is None or same(loaded, original) else "changed"
            finally:
                file.undo(operation)
            counts[outcome] += 1
            by_kind[kind][outcome] += 1
            if outcome not in ("refused", "identical"):
                examples[outcome].append((kind, operation[:2]))
    finally:
        file.close()
    assert target.read_bytes() == data  # every corruption was undone
    return {"counts": counts, "by_kind": by_kind, "examples": examples}


def report(title: str, result: dict) -> None:
    print(f"\n{title}: {sum(result['counts'].values())} cases, {dict(result['counts'])}")
    for kind, counts in result["by_kind"].items():
        print(f"  {kind}: {dict(counts)}")
    for outcome, cases in result["examples"].items():
        print(f"  {outcome}, e.g.: {cases[:5]}")


# --------------------------------------------------------------------------- the sweeps


def test_every_corruption_of_a_model_file_is_refused_or_harmless(model_file, tmp_path):
    result = sweep(model_file, tmp_path)
    report("format 2 (checksummed), read_checkpoint", result)
    counts = result["counts"]
    assert sum(counts.values()) > 3000
    bad = {k: v for k, v in counts.items() if k not in ("refused", "identical")}
    assert not bad, f"{bad}; e.g. {dict(result['examples'])}"


def test_corrupt_model_files_are_refused_by_vae_load(model_file, tmp_path):
    """The same corruptions (every 7th) through the public loader, which builds the model."""

    def load(path):
        VAE.load(path)  # raises, or loads data equal to the file's (checked above)

    result = sweep(model_file, tmp_path, load=load, every=7)
    report("format 2 (checksummed), VAE.load", result)
    bad = {k: v for k, v in result["counts"].items() if k not in ("refused", "identical")}
    assert not bad, f"{bad}; e.g. {dict(result['examples'])}"


def test_corrupt_checkpoints_are_refused_by_resume_before_any_change(model_file, tmp_path):
    """Every 61st corruption resumed by fit: refused, and nothing changed (parameters, RNG)."""
    x = tiny_data()
    torch.manual_seed(5)
    vae = VAE(TINY)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    rng = torch.get_rng_state()

    def resume(path):
        vae.fit(x, x[:8], checkpoint_path=path, resume=True, **{**TRAIN_OPTIONS, "epochs": 3})
        raise AssertionError("a damaged checkpoint was resumed")

    result = sweep(model_file, tmp_path, load=resume, every=61)
    report("format 2 (checksummed), fit(resume=True)", result)
    assert set(result["counts"]) == {"refused"}, dict(result["examples"])
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in before.items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert vae.history_ is None and vae.optimizer_ is None


def test_corrupt_legacy_files_fail_only_with_checkpoint_errors(legacy_file, tmp_path):
    """Format 1 has no checksum; its zip members' CRC-32 sums are checked instead. Every
    failure must still be a CheckpointError naming the file (no UnicodeDecodeError,
    KeyError, TypeError or AttributeError); loads of changed data are counted, for the docs."""
    result = sweep(legacy_file, tmp_path)
    report("format 1 (no checksum), read_checkpoint", result)
    escaped = {k: v for k, v in result["counts"].items() if k.startswith("escaped")}
    assert not escaped, f"{escaped}; e.g. {dict(result['examples'])}"


def test_legacy_files_without_a_checksum_still_load(model_file, legacy_file):
    assert not legacy_file.read_bytes().startswith(MAGIC)
    assert same(read_checkpoint(legacy_file), {**read_checkpoint(model_file), "format_version": 1})
    loaded, current = VAE.load(legacy_file), VAE.load(model_file)
    for name, value in current.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name


# --------------------------------------------------------------------------- single faults


def test_a_damaged_file_names_what_failed(model_file, tmp_path):
    data = bytearray(model_file.read_bytes())
    header = data.index(b"\n") + 1
    path = tmp_path / "damaged.pt"
    cases = {
        "checksum mismatch": lambda d: d.__setitem__(header + 500, d[header + 500] ^ 4),
        "header line is damaged": lambda d: d.__setitem__(20, ord("x")),
        r"announces \d+ payload bytes, the file holds \d+ \(truncated\)": lambda d: d.__delitem__(
            slice(len(d) - 10, None)
        ),
        r"\(bytes appended\)": lambda d: d.extend(b"\0"),
        "starts with neither a pyrovae header nor a torch archive": lambda d: d.__setitem__(
            0, ord("P")
        ),
    }
    for message, damage in cases.items():
        damaged = bytearray(data)
        damage(damaged)
        path.write_bytes(bytes(damaged))
        pattern = rf"model file .*damaged\.pt is truncated or corrupt.*{message}"
        with pytest.raises(CheckpointError, match=pattern):
            VAE.load(path)


def test_a_flipped_version_digit_is_damage_not_a_newer_format(model_file, tmp_path):
    data = model_file.read_bytes()
    assert data.startswith(b"pyrovae-model 2 ")
    path = tmp_path / "flipped.pt"
    path.write_bytes(b"pyrovae-model 3 " + data[len(b"pyrovae-model 2 ") :])
    with pytest.raises(CheckpointError, match="checksum mismatch") as caught:
        read_checkpoint(path)
    assert "upgrade" not in str(caught.value)


def test_a_genuinely_newer_format_asks_for_an_upgrade(model_file, tmp_path):
    from pyrovae.checkpoint import encode_checkpoint

    data = model_file.read_bytes()
    body = data[data.index(b"\n") + 1 :]
    path = tmp_path / "newer.pt"
    path.write_bytes(encode_checkpoint(body, version=3))
    pattern = r"format version 3, newer than this library's 2; upgrade"
    with pytest.raises(CheckpointError, match=pattern):
        read_checkpoint(path)


# --------------------------------------------------------------------------- large files

LARGE = 3 * 2**30
"""Apparent size of the sparse files below: reading any of them whole would take seconds and
gigabytes of memory; the header or archive signature must refuse them first."""


def bytes_read() -> int:
    """Bytes this process has read from files so far (Linux ``/proc/self/io``)."""
    with open("/proc/self/io") as handle:
        return int(next(line for line in handle if line.startswith("rchar:")).split()[1])


def sparse_file(path: Path, head: bytes, size: int = LARGE) -> Path:
    """A file of ``size`` bytes starting with ``head``, the rest a hole of zeros."""
    path.write_bytes(head)
    os.truncate(path, size)
    if path.stat().st_blocks * 512 > 2**20:
        pytest.skip("this filesystem stores the zeros of a sparse file")
    return path


@pytest.fixture
def large_files(tmp_path, model_file):
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io to count the bytes read")
    header = model_file.read_bytes().split(b"\n", 1)[0] + b"\n"
    line = f"pyrovae-model 2 {LARGE} sha256={'0' * 64}\n"  # as long as the right one
    matching = f"pyrovae-model 2 {LARGE - len(line)} sha256={'0' * 64}\n".encode()
    return {
        "zeros": sparse_file(tmp_path / "zeros.pt", b""),
        "a model's header, then zeros": sparse_file(tmp_path / "appended.pt", header),
        "a zip signature, then zeros": sparse_file(tmp_path / "zip.pt", b"PK\x03\x04"),
        "a header announcing the whole file": sparse_file(tmp_path / "huge.pt", matching),
    }


def test_large_non_model_files_are_refused_before_their_body_is_read(
    large_files, model_file, monkeypatch
):
    """Issue 24, item 4: ``VAE.load`` on a 2 GiB file of zeros read it all (76 s, 2.3 GB).
    The header, the archive's directory at the end of the file and the sizes are checked
    first; a file announcing more than the machine's memory is refused unread."""
    from pyrovae import checkpoint

    monkeypatch.setattr(checkpoint, "memory_limit", lambda: 2**30)
    VAE.load(model_file)  # lazy imports done before counting
    messages = {}
    for kind, path in large_files.items():
        before = bytes_read()
        with pytest.raises(CheckpointError, match=str(path)) as caught:
            VAE.load(path)
        assert bytes_read() - before < 2**20, kind
        messages[kind] = str(caught.value)
    assert "neither a pyrovae header nor a torch archive" in messages["zeros"]
    assert "(bytes appended)" in messages["a model's header, then zeros"]
    assert "not a complete archive" in messages["a zip signature, then zeros"]
    assert "1.0 GiB of memory" in messages["a header announcing the whole file"]
