"""The README's Python snippets run as written: in order, in one fresh interpreter, in an empty
directory, with nothing defined for them (issue 23: the own-model snippet once needed names
that no snippet defined, and computed a table that it never printed)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT


def python_blocks() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


CHECKS = """
# --- appended by tests/test_readme.py: what the snippets promise
assert sorted(fitted.pyro_params.names()) == ["W", "sigma"]
assert torch.isfinite(again.elbo(digits.test[:8])).all()
assert len(frame) == len(x) and "log_px" in frame
print("README CHECKS PASSED")
"""


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(tmp_path):
    blocks = python_blocks()
    assert len(blocks) >= 3  # the API tour, your own model, Pyro's SVI
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(PROJECT_ROOT), os.environ.get("PYTHONPATH")])
        ),
        "OMP_NUM_THREADS": "1",
    }
    completed = subprocess.run(
        [sys.executable, "-c", "\n\n".join(blocks) + CHECKS],
        cwd=tmp_path,  # the snippets write model files
        env=environment,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    output = completed.stdout
    assert "README CHECKS PASSED" in output
    # Both evaluate(...).table() calls print their tables: the VAE's and the pPCA model's.
    assert output.count("log_px ") >= 2, output[-3000:]
