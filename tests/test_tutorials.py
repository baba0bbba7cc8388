"""The tutorials in docs/tutorials run as written and print what their pages show.

Each script runs in a fresh interpreter with an empty temporary directory as its working
directory (it must neither need nor write files there). Its output is checked twice:

* its *shape*, line by line, against the expected output stored next to it and shown on the
  tutorial's page (``<name>.output.txt``, with every number replaced by ``#``), so that the
  pages cannot silently go stale;
* its *content*: the statistical statements the page makes (bounds ordered, estimates
  matching the closed forms, diagnostics in range).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "docs" / "tutorials"
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?%?|\binf\b|\bnan\b)")
TABLE_ROW = re.compile(r"^(\w+)\s+(-?\d+\.\d+)\s+(\d+\.\d+)$")

pytestmark = pytest.mark.slow


def run_tutorial(name: str, directory: Path) -> str:
    """Run ``docs/tutorials/<name>.py`` with ``directory`` as its working directory."""
    environment = {**os.environ, "PYTHONHASHSEED": "0", "MPLBACKEND": "Agg"}
    completed = subprocess.run(
        [sys.executable, str(TUTORIALS / f"{name}.py")],
        cwd=directory,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert completed.returncode == 0, f"{name}.py failed:\n{completed.stderr[-4000:]}"
    assert list(directory.iterdir()) == [], f"{name}.py wrote files into its working directory"
    return completed.stdout


def skeleton(text: str) -> list[str]:
    """Lines with every number replaced by '#' and runs of spaces collapsed."""
    return [" ".join(NUMBER.sub("#", line).split()) for line in text.strip().splitlines()]


def check_matches_stored_output(name: str, output: str) -> None:
    stored = (TUTORIALS / f"{name}.output.txt").read_text()
    assert skeleton(output) == skeleton(stored), (
        f"the output of {name}.py no longer has the shape of {name}.output.txt, which its page "
        f"shows; regenerate it: cd docs/tutorials && python {name}.py > {name}.output.txt"
    )


def summary_table(output: str) -> dict[str, tuple[float, float]]:
    """Rows ``quantity mean se`` of ``EvaluationResult.table()``."""
    rows = {}
    for line in output.splitlines():
        match = TABLE_ROW.match(line.strip())
        if match:
            rows[match.group(1)] = (float(match.group(2)), float(match.group(3)))
    return rows


def number_after(label: str, output: str) -> float:
    """The first number after ``label`` in the output."""
    index = output.index(label) + len(label)
    return float(NUMBER.search(output, index).group().rstrip("%"))


def test_fit_vae_digits(tmp_path):
    name = "fit_vae_digits"
    output = run_tutorial(name, tmp_path)
    check_matches_stored_output(name, output)
    table = summary_table(output)
    assert {"elbo", "elbo_analytic", "iwae_1", "iwae_10", "iwae_100", "log_px", "gap"} <= set(table)
    means = [table[name][0] for name in ("elbo", "iwae_10", "iwae_100", "log_px")]
    assert means == sorted(means), means  # ELBO <= IWAE_10 <= IWAE_100 <= log p_hat
    assert abs(table["iwae_1"][0] - table["elbo"][0]) < 1e-9
    assert abs(table["elbo_analytic"][0] - table["elbo"][0]) < 0.1  # same expectation
    assert -40 < table["log_px"][0] < -15  # nats per 8x8 binarized digit
    gap = table["gap"][0]
    assert 0 < gap < 2
    assert abs(gap - (table["log_px"][0] - table["elbo"][0])) < 2e-3
    assert "for every test image: True" in output
    assert 0 <= number_after("share of test images with Pareto k-hat > 0.7:", output) <= 0.2
    assert number_after("active units:", output) >= 4


def test_custom_model(tmp_path):
    name = "custom_model"
    output = run_tutorial(name, tmp_path)
    check_matches_stored_output(name, output)
    assert "parameters in Pyro's global param store: 0" in output
    table = summary_table(output)
    assert table["elbo"][0] <= table["iwae_10"][0] <= table["iwae_100"][0] <= table["log_px"][0]
    exact = number_after("exact log p(x|c) of the fitted model:   mean", output)
    estimate = number_after("importance-sampled log p_hat (K=2000):  mean", output)
    assert abs(estimate - exact) < 0.02  # importance sampling recovers the closed form
    assert number_after("reported SE for", output) >= 90  # percent of test points
    estimated_gap = number_after("ELBO gap: estimated", output)
    exact_gap = number_after("exact KL(q(z|x,c) || p(z|x,c))", output)
    assert abs(estimated_gap - exact_gap) < 0.02
    assert number_after("of which best diagonal Gaussian", output) <= exact_gap + 1e-6


def test_compare_bounds(tmp_path):
    name = "compare_bounds"
    output = run_tutorial(name, tmp_path)
    check_matches_stored_output(name, output)
    lines = output.splitlines()
    # Part 1: IWAE_k increases with k towards log p_hat; the ELBO equals IWAE_1.
    ks = (1, 2, 5, 10, 50, 200, 1000)
    means = [number_after(f"  IWAE_{k} ", output) for k in ks]
    assert means == sorted(means), means
    assert number_after("  ELBO ", output) == means[0]
    assert means[-1] <= number_after("  log p_hat ", output) + 1e-9
    # Part 2: every test image falls into one k-hat class.
    counts = [
        int(number_after(f"  {label} ", output)) for label in ("< 0.5", "0.5 to 0.7", "> 0.7")
    ]
    assert sum(counts) == 250
    # Part 3: the wide guide has finite weight variance and small k-hat; the narrow one has
    # infinite variance, large k-hat, and an actual error well above its reported SE.
    rows = {
        line.split()[1]: [float(v) for v in line.split()[2:]]
        for line in lines
        if line.startswith("  x ")
    }
    wide, narrow = rows["2.0"], rows["0.5"]
    variance, share, mean_se, rms_error, _ = wide
    assert variance < float("inf") and share < 0.05 and rms_error < 3 * mean_se
    variance, share, mean_se, rms_error, _ = narrow
    assert variance == float("inf") and share > 0.5 and rms_error > 1.5 * mean_se
