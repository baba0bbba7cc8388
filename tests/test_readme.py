"""The README's Python snippets run as written (in order, in one namespace)."""

from __future__ import annotations

import re

import pytest
import torch
from conftest import PROJECT_ROOT


def python_blocks() -> list[str]:
    text = (PROJECT_ROOT / "README.md").read_text()
    blocks = re.findall(r"^( *)```python\n(.*?)^\1```", text, flags=re.S | re.M)
    return ["\n".join(line[len(indent) :] for line in body.splitlines()) for indent, body in blocks]


@pytest.mark.slow
def test_readme_python_snippets_run_as_written(tmp_path, monkeypatch):
    blocks = python_blocks()
    assert len(blocks) >= 3  # the API tour, your own model, Pyro's SVI
    monkeypatch.chdir(tmp_path)  # the snippets write model files
    namespace: dict = {}
    exec(compile(blocks[0], "README block 1", "exec"), namespace)
    digits = namespace["digits"]
    # The own-model snippet names its data x, x_train, x_valid, x_test: the digits here.
    namespace.update(
        x=digits.train.double().float(),
        x_train=digits.train,
        x_valid=digits.valid,
        x_test=digits.test,
    )
    for number, block in enumerate(blocks[1:], start=2):
        exec(compile(block, f"README block {number}", "exec"), namespace)
    fitted = namespace["fitted"]
    assert sorted(fitted.pyro_params.names()) == ["W", "sigma"]
    assert torch.isfinite(namespace["again"].elbo(digits.test[:8])).all()
