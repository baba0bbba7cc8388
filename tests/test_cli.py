"""Tests of the command line, run in-process through ``pyrovae.cli.main``."""

import csv
import json
import math

import numpy as np
import pytest

from pyrovae.cli import main


def train_args(out, epochs: int = 2, binarize: str = "dynamic") -> list[str]:
    """`pyrovae train` on the digits with a small network."""
    return [
        "train",
        "--hidden",
        "32",
        "--latent-dim",
        "2",
        "--epochs",
        str(epochs),
        "--batch-size",
        "64",
        "--binarize",
        binarize,
        "--quiet",
        "--out",
        str(out),
    ]


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory):
    """Output directory of one `pyrovae train` run on the 8x8 digits."""
    out = tmp_path_factory.mktemp("train")
    assert main(train_args(out)) == 0
    return out


def test_train_writes_model_and_history(trained_dir):
    assert (trained_dir / "model.pt").is_file()
    lines = (trained_dir / "history.jsonl").read_text().splitlines()
    assert len(lines) == 2
    records = [json.loads(line) for line in lines]
    for epoch, record in enumerate(records, start=1):
        assert set(record) == {"epoch", "train_elbo", "valid_elbo", "seconds", "learning_rate"}
        assert record["epoch"] == epoch
        # A lower bound on the log-probability of 64 binary pixels: finite and negative.
        assert math.isfinite(record["train_elbo"]) and record["train_elbo"] < 0
        assert math.isfinite(record["valid_elbo"]) and record["valid_elbo"] < 0
        assert record["seconds"] > 0
    with open(trained_dir / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2]
    assert float(rows[1]["valid_elbo"]) == pytest.approx(records[1]["valid_elbo"])


def test_train_prints_summary(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_args(out, epochs=1)) == 0
    printed = capsys.readouterr().out
    assert "trained 1 epoch in" in printed and str(out / "model.pt") in printed
    assert len((out / "history.jsonl").read_text().splitlines()) == 1


def test_evaluate_prints_table_and_writes_csv(trained_dir, tmp_path, capsys):
    out = tmp_path / "eval.csv"
    code = main(
        [
            "evaluate",
            "--model",
            str(trained_dir / "model.pt"),
            "--num-samples",
            "20",
            "--ks",
            "1,5",
            "--quiet",
            "--out",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "test split of digits" in printed
    for name in ("elbo", "elbo_analytic", "iwae_1", "iwae_5", "log_px", "gap"):
        assert any(line.split()[:1] == [name] for line in printed.splitlines()), name
    assert "iwae_50" not in printed
    assert "N=250" in printed and "K=20" in printed
    with open(out, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 250
    for column in ("data_point", "log_px", "elbo", "iwae_5", "khat", "ess"):
        assert column in rows[0]
    log_px = np.array([float(row["log_px"]) for row in rows])
    elbo = np.array([float(row["elbo"]) for row in rows])
    assert np.isfinite(log_px).all()
    assert (elbo <= log_px + 1e-5).all()  # ELBO <= log p_hat on the same draws


def test_evaluate_drops_ks_above_k(trained_dir, capsys):
    code = main(
        ["evaluate", "--model", str(trained_dir / "model.pt"), "--num-samples", "3", "--quiet"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "iwae_1" in printed and "iwae_5" not in printed and "iwae_50" not in printed


def test_sample_writes_png_grid(trained_dir, tmp_path, capsys):
    import matplotlib.image

    out = tmp_path / "s.png"
    code = main(
        ["sample", "--model", str(trained_dir / "model.pt"), "--num", "16", "--out", str(out)]
    )
    assert code == 0
    assert str(out) in capsys.readouterr().out
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(out)
    # 4 x 4 tiles of 8 x 8 pixels with 1-pixel gaps: 4 * 9 + 1 = 37 pixels, enlarged 4 times.
    side = (4 * (8 + 1) + 1) * 4
    assert image.shape[:2] == (side, side)
    assert np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1


def test_grey_digits_with_bernoulli_need_binarize(tmp_path, capsys):
    out = tmp_path / "grey"
    code = main(train_args(out, binarize="none"))
    assert code != 0
    assert "binarize" in capsys.readouterr().err
    assert not (out / "model.pt").exists()


@pytest.mark.parametrize("count", ["0", "-2"])
def test_evaluate_rejects_non_positive_num_samples(trained_dir, count, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(trained_dir / "model.pt"), "--num-samples", count])
    assert exit_info.value.code == 2
    assert "argument --num-samples: expected a positive integer" in capsys.readouterr().err


def test_unknown_dataset_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--dataset", "no-such-data", "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "invalid choice: 'no-such-data'" in capsys.readouterr().err


def test_bad_ks_is_an_argparse_error(trained_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["evaluate", "--model", str(trained_dir / "model.pt"), "--ks", "1,0"])
    assert exit_info.value.code == 2
    assert "positive integers" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["evaluate", "sample"])
def test_missing_model_file_is_a_clear_error(tmp_path, capsys, command):
    missing = tmp_path / "nowhere" / "model.pt"
    extra = ["--num-samples", "5"] if command == "evaluate" else ["--out", str(tmp_path / "s.png")]
    code = main([command, "--model", str(missing), *extra])
    assert code != 0
    err = capsys.readouterr().err
    assert str(missing) in err and "does not exist" in err
    assert not (tmp_path / "s.png").exists()
