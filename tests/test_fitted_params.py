"""Reading fitted values by their Pyro names, and loading a file into code whose parameters
differ (renamed, added, dropped, reshaped): refused before ``load`` returns, naming each."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.nn import PyroModule, PyroParam
from torch import nn
from torch.distributions import transform_to

from pyrovae.checkpoint import CheckpointError, read_checkpoint, write_checkpoint
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.base import LocalParamsModule
from pyrovae.models.latent_variable import LatentVariableModel

FIT = {"epochs": 3, "batch_size": 20, "learning_rate": 1e-2, "progress": False}


def data(n: int = 60, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 2, generator=generator)
    noise = torch.randn(n, 5, generator=generator)
    return torch.randn(n, 2, generator=generator) @ w.T + 0.5 * noise


def ppca(sigma_name="sigma", extra=False, drop_b=False, b_shape=(5,)):
    """Probabilistic PCA as a Pyro user writes it (README), with variants of its parameters."""

    def model(x):
        W = pyro.param("W", lambda: 0.1 * torch.randn(x.shape[1], 2))
        sigma = pyro.param(sigma_name, torch.tensor(1.0), constraint=constraints.positive)
        b = 0.0 if drop_b else pyro.param("b", torch.zeros(b_shape))
        if extra:
            b = b + pyro.param("shift", torch.zeros(x.shape[1]))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z @ W.T + b, sigma).to_event(1), obs=x)

    return model


@pytest.fixture
def fitted_ppca():
    x = data()
    model = ppca()
    fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4]))
    fitted.fit(x, **FIT)
    return fitted, x


def test_literal_user_code_reads_sigma_both_ways(fitted_ppca):
    fitted, _ = fitted_ppca
    unconstrained = fitted.pyro_params.parameter("sigma")
    expected = transform_to(constraints.positive)(unconstrained)
    sigma = fitted.param("sigma")
    assert sigma.item() == pytest.approx(expected.item(), rel=1e-6)
    assert sigma.item() != pytest.approx(1.0)  # trained away from its initial value
    assert sigma.unconstrained() is unconstrained
    assert fitted.param("W") is fitted.pyro_params.parameter("W")  # the live tensor
    pyro.param("theirs", torch.tensor(3.0))  # the user's own store content survives
    with fitted.param_store():
        inside = pyro.param("sigma")
        assert inside.item() == pytest.approx(sigma.item(), rel=1e-6)
        assert inside.unconstrained() is unconstrained
        assert pyro.param("W").unconstrained() is fitted.pyro_params.parameter("W")
        assert "theirs" not in pyro.get_param_store()
        pyro.param("made_inside", torch.tensor(2.0))
    store = pyro.get_param_store()
    assert set(store.keys()) == {"theirs"} and pyro.param("theirs").item() == 3.0
    assert "unconstrained" not in unconstrained.__dict__  # the parameter stays picklable


def test_param_store_is_restored_after_an_exception(fitted_ppca):
    fitted, _ = fitted_ppca
    with pytest.raises(RuntimeError, match="inside"), fitted.param_store():
        raise RuntimeError("inside")
    assert len(pyro.get_param_store()) == 0


def test_unknown_name_lists_the_known_ones(fitted_ppca):
    fitted, _ = fitted_ppca
    with pytest.raises(KeyError, match=r"'nope'.*known Pyro names: 'W', .*'sigma'"):
        fitted.param("nope")


class PyroModel(PyroModule):
    """A model written as a PyroModule, with a PyroParam and a plain layer."""

    def __init__(self):
        super().__init__()
        self.scale = PyroParam(torch.ones(5), constraint=constraints.positive)
        self.decoder = nn.Linear(2, 5)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), self.scale).to_event(1), obs=x)


def model_with_module(decoder):
    def model(x):
        net = pyro.module("decoder", decoder)
        sigma = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(net(z), sigma).to_event(1), obs=x)

    return model


@pytest.mark.parametrize("kind", ["functions", "pyro_module"])
def test_names_and_values_are_those_of_pyros_param_sites(kind):
    x = data()
    if kind == "functions":
        model = model_with_module(nn.Linear(2, 5))
        fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4]))
    else:
        with pyro.settings.context(module_local_params=True):
            model = PyroModel()
        fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4]))
    fitted.fit(x, **FIT)
    with poutine.trace(param_only=True) as params:
        fitted.guide(x[:2])
        fitted.model(x[:2])
    sites = params.trace.nodes
    values = fitted.named_pyro_params()
    assert set(values) == set(sites)
    for name, site in sites.items():
        torch.testing.assert_close(values[name], site["value"], rtol=0, atol=0, msg=name)
    if kind == "pyro_module":
        assert bool((values["scale"] > 0).all())  # the PyroParam, constrained
        assert not torch.equal(values["scale"], torch.ones(5))  # fitted
        with fitted.param_store():
            torch.testing.assert_close(pyro.param("scale"), values["scale"])


class Decoder(LocalParamsModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 5)

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(self.net(z), 1.0).to_event(1), obs=x)


class Encoder(LocalParamsModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Linear(5, 4)

    def forward(self, x):
        loc, raw = self.net(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))


def test_a_name_the_model_and_guide_give_different_tensors_is_qualified():
    fitted = LatentVariableModel(Decoder(), Encoder())
    values = fitted.named_pyro_params()
    assert {"model:net$$$weight", "guide:net$$$weight"} <= set(values)
    assert values["model:net$$$weight"] is fitted.model.net.weight
    with pytest.raises(KeyError, match=r"'model:net\$\$\$weight' or 'guide:net\$\$\$weight'"):
        fitted.param("net$$$weight")


# --------------------------------------------------------------------------- loading


@pytest.fixture
def saved(fitted_ppca, tmp_path):
    fitted, x = fitted_ppca
    path = fitted.save(tmp_path / "ppca.pt")
    return path, fitted, x


def loaded(path, model, x):
    return LatentVariableModel.load(path, model, AmortizedGuide(model, x[:4]))


def test_same_code_loads_every_parameter_before_first_use(saved):
    path, fitted, x = saved
    model = ppca()
    guide = AmortizedGuide(model, x[:4])
    state = torch.get_rng_state()
    again = LatentVariableModel.load(path, model, guide)
    assert torch.equal(torch.get_rng_state(), state)  # the probe run drew nothing
    assert len(pyro.get_param_store()) == 0
    assert again.param("sigma").item() == pytest.approx(fitted.param("sigma").item(), rel=0)
    torch.testing.assert_close(
        again.elbo(x, num_samples=10, seed=1), fitted.elbo(x, num_samples=10, seed=1)
    )


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        (
            {"sigma_name": "scale"},
            r"renamed \(in the file -> in the code, same shape\): 'sigma' -> 'scale' \(\)",
        ),
        ({"extra": True}, r"added \(used by the code, not in the file\): 'shift' \(5,\)"),
        ({"drop_b": True}, r"dropped \(in the file, not used by the code\): 'b' \(5,\)"),
        ({"b_shape": (1, 5)}, r"reshaped \(in the file -> in the code\): 'b' \(5,\) -> \(1, 5\)"),
    ],
    ids=["renamed", "added", "dropped", "reshaped"],
)
def test_load_refuses_code_whose_parameters_differ(saved, variant, message):
    path, _, x = saved
    model = ppca(**variant)
    guide = AmortizedGuide(model, x[:4])
    with pytest.raises(CheckpointError, match=message):
        LatentVariableModel.load(path, model, guide)


def test_renamed_parameter_no_longer_gives_another_elbo(saved):
    """The issue's scenario: a renamed sigma loaded silently as a fresh parameter."""
    path, _, x = saved
    with pytest.raises(CheckpointError, match="'sigma' -> 'scale'"):
        loaded(path, ppca(sigma_name="scale"), x)


def test_module_parameters_that_differ_are_named(saved):
    path, _, x = saved
    model = ppca()
    message = r"reshaped .*'guide.trunk.0.weight' \(128, 5\) -> \(16, 5\)"
    with pytest.raises(CheckpointError, match=message):
        LatentVariableModel.load(path, model, AmortizedGuide(model, x[:4], hidden_sizes=(16,)))


def without_probe(path, tmp_path):
    """The file as written before probe inputs were saved."""
    payload = read_checkpoint(path)
    payload.pop("probe_inputs")
    for key in ("format", "format_version"):
        payload.pop(key)
    return write_checkpoint(payload, tmp_path / "old.pt")


def test_old_file_without_probe_restores_same_code_on_first_use(saved, tmp_path):
    path, fitted, x = saved
    old = without_probe(path, tmp_path)
    again = loaded(old, ppca(), x)
    with pytest.raises(KeyError, match="not created yet"):
        again.param("sigma")
    torch.testing.assert_close(
        again.elbo(x, num_samples=10, seed=1), fitted.elbo(x, num_samples=10, seed=1)
    )


@pytest.mark.parametrize(
    ("variant", "message"),
    [
        ({"sigma_name": "scale"}, "renamed .*'sigma' -> 'scale'"),
        ({"extra": True}, "added .*'shift'"),
        ({"drop_b": True}, "dropped .*'b'"),
        ({"b_shape": (1, 5)}, r"reshaped .*'b' \(5,\) -> \(1, 5\)"),
    ],
    ids=["renamed", "added", "dropped", "reshaped"],
)
def test_old_file_refuses_a_mismatch_at_first_use_and_after(saved, tmp_path, variant, message):
    path, _, x = saved
    again = loaded(without_probe(path, tmp_path), ppca(**variant), x)
    for _ in range(2):
        with pytest.raises(CheckpointError, match=message):
            again.elbo(x)
