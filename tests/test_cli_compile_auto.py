"""``compile="auto"`` (the default of ``fit`` and ``pyrovae train``, issue 16): the graph
path where the model and guide trace, eager Pyro with a one-line warning where they do not,
and Pyro's first-step validation kept either way."""

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule, PyroParam

from pyrovae.cli import main
from pyrovae.compiled import CompiledStep
from pyrovae.models.latent_variable import LatentVariableModel


class DiscreteModel(PyroModule):
    """A mixture of two means: z ~ Bernoulli(0.5), x ~ Normal(z w, 1)."""

    def __init__(self):
        super().__init__()
        self.w = PyroParam(torch.ones(3))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(torch.full((x.shape[0],), 0.5)))
            pyro.sample("x", dist.Normal(z[:, None] * self.w, 1.0).to_event(1), obs=x)


class DiscreteGuide(PyroModule):
    """q(z | x) Bernoulli: not reparameterizable, so Pyro's Trace_ELBO takes the score
    function; the compiled objectives refuse it."""

    def __init__(self):
        super().__init__()
        self.weight = PyroParam(torch.zeros(3))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=x @ self.weight))


class GaussianModel(PyroModule):
    """z ~ Normal(0, 1), x ~ Bernoulli(sigmoid(z w)) per feature."""

    def __init__(self):
        super().__init__()
        self.w = PyroParam(torch.ones(3))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(x.shape[0]), 1.0))
            pyro.sample("x", dist.Bernoulli(logits=z[:, None] * self.w).to_event(1), obs=x)


class GaussianGuide(PyroModule):
    def __init__(self):
        super().__init__()
        self.weight = PyroParam(torch.zeros(3))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x @ self.weight, 1.0))


def auto_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith("compile='auto'")]


def test_auto_takes_the_graph_path_for_a_model_that_traces():
    from pyrovae import VAE
    from pyrovae.data import load_digits

    digits = load_digits()
    vae = VAE(num_features=64, latent_dim=2, hidden_sizes=(8,), seed=0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vae.fit(digits.train[:200], binarize="dynamic", epochs=1, batch_size=64, progress=False)
    assert vae.training_path_ == "graph" and not auto_warnings(caught)


def test_auto_falls_back_to_eager_pyro_with_one_warning():
    x = torch.randn(32, 3, generator=torch.Generator().manual_seed(0))
    fitted = LatentVariableModel(DiscreteModel(), DiscreteGuide())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        history = fitted.fit(x, epochs=2, batch_size=8, progress=False)
    assert fitted.training_path_ == "eager"
    (message,) = auto_warnings(caught)
    assert "training with eager Pyro" in message and "\n" not in message
    assert len(history) == 2 and all(v == v for v in history.column("train_elbo"))
    with pytest.raises(ValueError):  # asked for explicitly, the graph path does not hide it
        LatentVariableModel(DiscreteModel(), DiscreteGuide()).fit(
            x, epochs=1, batch_size=8, progress=False, compile="graph"
        )


@pytest.mark.parametrize("mode", ["none", "auto"])
def test_auto_keeps_pyros_first_step_validation(mode):
    """Grey levels under a Bernoulli likelihood: eager Pyro refuses them on the first step
    (validation on); the compiled graph runs with validation off and would train on them."""
    x = torch.rand(32, 3, generator=torch.Generator().manual_seed(0))
    fitted = LatentVariableModel(GaussianModel(), GaussianGuide())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError):
            fitted.fit(x, epochs=1, batch_size=8, progress=False, compile=mode)


def test_the_cli_prints_the_fallback_in_one_line(tmp_path, capsys, monkeypatch):
    def refuse(self, *batch, clip_norm=None):
        raise RuntimeError("cannot trace this")

    monkeypatch.setattr(CompiledStep, "loss_and_norm", refuse)
    arguments = ["train", "--hidden", "8", "--epochs", "1", "--batch-size", "256"]
    assert main([*arguments, "--out", str(tmp_path / "a")]) == 0
    captured = capsys.readouterr()
    (line,) = captured.err.strip().splitlines()
    assert (
        line.startswith("warning: compile='auto': ") and "RuntimeError: cannot trace this" in line
    )
    assert "(eager path, --compile auto)" in captured.out
    assert main([*arguments, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    assert capsys.readouterr().err == ""
