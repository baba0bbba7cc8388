"""The Pyro idioms a user writes first: pyro.infer.SVI on the built-in VAE, function-style
models with pyro.param / pyro.module / PyroModule, bound methods, parameter-free programs,
and saving and loading a model of one's own (issue 14, items 1, 2 and 6)."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.distributions import constraints
from pyro.infer import SVI, Trace_ELBO, TraceMeanField_ELBO
from pyro.nn import PyroModule, PyroParam
from torch import nn

from pyrovae import VAE, VAEConfig
from pyrovae.checkpoint import read_checkpoint
from pyrovae.data import load_digits
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.base import LocalParamsModule
from pyrovae.models.latent_variable import LatentVariableModel

D, Q = 6, 2


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def binary_data(n: int = 48, features: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.rand(n, features, generator=generator) > 0.5).to(torch.get_default_dtype())


def factor_data(n: int = 120, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    loadings = torch.randn(D, Q, generator=generator)
    z = torch.randn(n, Q, generator=generator)
    return z @ loadings.T + 0.3 * torch.randn(n, D, generator=generator)


def ppca_model(x):
    """Probabilistic PCA written the way Pyro's tutorials write models."""
    loadings = pyro.param("W", lambda: 0.1 * torch.ones(D, Q))
    noise = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
        pyro.sample("x", dist.Normal(z @ loadings.T, noise).to_event(1), obs=x)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def unchanged(before: dict, module: nn.Module) -> list[str]:
    return [name for name, p in module.named_parameters() if torch.equal(before[name], p)]


# -- pyro.infer.SVI on the built-in VAE -------------------------------------------------
FAMILIES = {
    "bernoulli": {},
    "learned-prior": {"prior": "learned-normal"},
    "mixture-prior": {"prior": "mixture", "prior_components": 3},
    "vamp-prior": {"prior": "vamp", "prior_components": 3},
    "full-guide": {"guide": "full"},
    "low-rank-guide": {"guide": "low-rank", "guide_rank": 2},
    "flow-guide": {"guide": "flow", "num_flows": 2},
    "two-layers": {"top_latent_dim": 2},
    "normal-likelihood": {"likelihood": "normal"},
    "conv": {"network": "conv", "image_shape": (8, 8)},
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_literal_svi_trains_every_parameter_of_every_vae_family(family):
    vae = VAE(VAEConfig(num_features=64, latent_dim=4, hidden_sizes=(16,), **FAMILIES[family]))
    x = binary_data()
    before = snapshot(vae)
    svi = SVI(vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    losses = [svi.step(x) for _ in range(3)]
    assert all(math.isfinite(loss) for loss in losses)
    assert unchanged(before, vae) == []
    assert len(pyro.get_param_store()) == 0  # nothing went to the global store


@pytest.mark.parametrize(
    "pyro_elbo, name", [(Trace_ELBO, "trace_elbo"), (TraceMeanField_ELBO, "trace_meanfield_elbo")]
)
def test_svi_reproduces_fit_bitwise_with_the_same_seed(float64, pyro_elbo, name):
    """fit averages each minibatch's loss; SVI on programs scaled by 1/batch then takes the
    very same Adam steps (unscaled, only Adam's eps acts differently)."""
    x, batch, epochs, seed = binary_data(), 16, 3, 5
    fitted = VAE(num_features=64, latent_dim=4, hidden_sizes=(32,), seed=1)
    history = fitted.fit(
        x,
        epochs=epochs,
        batch_size=batch,
        objective=name,
        learning_rate=1e-2,
        seed=seed,
        progress=False,
        compile="none",
    )
    for scale, tolerance in ((1 / batch, 0.0), (1.0, 1e-7)):
        vae = VAE(num_features=64, latent_dim=4, hidden_sizes=(32,), seed=1)
        model, guide = poutine.scale(vae.model, scale), poutine.scale(vae.guide, scale)
        svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro_elbo())
        pyro.set_rng_seed(seed)
        order = torch.Generator().manual_seed(seed)
        trajectory = []
        for _ in range(epochs):
            total = sum(
                svi.step(x[i]) for i in torch.randperm(len(x), generator=order).split(batch)
            )
            trajectory.append(-total / (scale * len(x)))
        assert trajectory == pytest.approx(history.column("train_elbo"), rel=tolerance, abs=0)
        for mine, theirs in zip(vae.parameters(), fitted.parameters(), strict=True):
            assert torch.allclose(mine, theirs, rtol=0, atol=tolerance * 100)


def test_two_vaes_train_side_by_side_under_svi():
    x = binary_data()
    first, second = (VAE(num_features=64, latent_dim=4, hidden_sizes=(16,), seed=s) for s in (0, 1))
    untouched = snapshot(second)
    svi = SVI(first.model, first.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    for _ in range(3):
        svi.step(x)
    assert len(unchanged(untouched, second)) == len(untouched)


# -- function-style models --------------------------------------------------------------
def test_function_model_with_pyro_param_trains_model_and_guide():
    x = factor_data()
    fitted = LatentVariableModel(ppca_model, AmortizedGuide(ppca_model, x[:4]))
    assert len(pyro.get_param_store()) == 0  # building the guide left nothing behind
    fitted.fit(x[:100], x[100:], epochs=2, batch_size=20, learning_rate=1e-2, progress=False)
    registry = fitted.pyro_params
    assert sorted(registry.names()) == ["W", "sigma"]
    assert not torch.allclose(registry.parameter("W"), 0.1 * torch.ones(D, Q))
    assert float(registry.parameter("sigma").detach()) != 0.0  # log(1) at the start: it moved
    assert len(pyro.get_param_store()) == 0


def test_function_model_under_literal_svi_through_the_wrappers():
    x = factor_data()
    fitted = LatentVariableModel(ppca_model, AmortizedGuide(ppca_model, x[:4]))
    svi = SVI(fitted.model, fitted.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO())
    svi.step(x)
    before = snapshot(fitted)
    svi.step(x)
    assert unchanged(before, fitted) == []
    assert len(pyro.get_param_store()) == 0


def test_pyro_module_and_global_pyro_modules_inside_functions_are_trained():
    decoder = nn.Linear(Q, D)

    class Noise(PyroModule):
        def __init__(self):
            super().__init__()
            self.scale = PyroParam(torch.ones(D), constraint=constraints.positive)

        def forward(self):
            return self.scale

    noise = Noise()

    def model(x):
        pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
            pyro.sample("x", dist.Normal(decoder(z), noise()).to_event(1), obs=x)

    x = factor_data()
    fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4]))
    weight, scale = decoder.weight.detach().clone(), noise.scale.detach().clone()
    fitted.fit(x, epochs=2, batch_size=30, learning_rate=1e-2, progress=False)
    assert not torch.equal(decoder.weight, weight)  # the user's own module was trained
    assert not torch.equal(noise.scale, scale)
    # A PyroModule built on the global store writes its own PyroParam there (Pyro's code,
    # not ours); nothing else may appear.
    assert set(pyro.get_param_store().keys()) <= {"scale"}


def test_a_pyro_module_attribute_read_from_outside_is_refused_not_left_untrained():
    """Reading a PyroModule's PyroParam outside a call of the module emits no param
    statement (in Pyro too): no optimizer would see it, so fitting must refuse."""

    class Noise(PyroModule):
        def __init__(self):
            super().__init__()
            self.scale = PyroParam(torch.ones(D), constraint=constraints.positive)

    noise = Noise()

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
            pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), noise.scale).to_event(1), obs=x)

    x = factor_data()
    fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4]))
    with pytest.raises(ValueError, match=r"shape \(6,\) require gradients.*call a PyroModule"):
        fitted.fit(x, epochs=1, batch_size=40, progress=False)


def test_guide_reads_a_parameter_the_model_created_by_name():
    def model(x):
        loc = pyro.param("loc", torch.zeros(D))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z + loc, 1.0).to_event(1), obs=x)

    def guide(x):
        loc = pyro.param("loc")  # no initial value: the model's
        weight = pyro.param("weight", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(weight * (x - loc), 0.7).to_event(1))

    fitted = LatentVariableModel(model, guide)
    fitted.fit(factor_data(), epochs=2, batch_size=40, learning_rate=5e-2, progress=False)
    assert sorted(fitted.pyro_params.names()) == ["loc", "weight"]
    assert not torch.equal(fitted.pyro_params.parameter("loc"), torch.zeros(D))


class FactorAnalysis:
    """Model and guide as methods of a plain object holding its networks."""

    def __init__(self):
        self.decoder = nn.Linear(Q, D)
        self.encoder = nn.Linear(D, 2 * Q)

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))


class FactorAnalysisModule(FactorAnalysis, nn.Module):
    def __init__(self):
        nn.Module.__init__(self)
        FactorAnalysis.__init__(self)


@pytest.mark.parametrize("owner", [FactorAnalysis, FactorAnalysisModule])
def test_bound_methods_train_every_parameter(owner):
    program = owner()
    fitted = LatentVariableModel(program.model, program.guide)
    networks = {"decoder": program.decoder, "encoder": program.encoder}
    before = {name: snapshot(net) for name, net in networks.items()}
    fitted.fit(factor_data(), epochs=2, batch_size=40, learning_rate=1e-2, progress=False)
    for name, net in networks.items():
        assert unchanged(before[name], net) == [], name


def test_parameter_free_programs_evaluate_and_refuse_to_fit_clearly():
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
            pyro.sample("x", dist.Normal(z, 1.0).to_event(1), obs=x)

    def guide(x):  # the exact posterior: N(x / 2, 1/2)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x / 2, 0.5**0.5).to_event(1))

    x = factor_data(20)
    fitted = LatentVariableModel(model, guide)
    exact = dist.Normal(0.0, 2.0**0.5).log_prob(x).sum(-1).double()
    assert torch.allclose(fitted.elbo(x, num_samples=3), exact, atol=1e-9)
    with pytest.raises(ValueError, match="no parameters to fit"):
        fitted.fit(x, epochs=1, batch_size=10, progress=False)


def test_a_tensor_no_optimizer_would_see_is_refused_before_training():
    shift = torch.zeros(D, requires_grad=True)  # meant as a parameter, but nobody owns it

    class ScopedParam(LocalParamsModule):
        def forward(self, x):
            with pyro.plate("data", x.shape[0]):
                z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([Q]).to_event(1))
                pyro.sample(
                    "x", dist.Normal(shift + z.sum(-1, keepdim=True), 1.0).to_event(1), obs=x
                )

    x = factor_data()
    model = ScopedParam()
    fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4]))
    before = snapshot(fitted)
    with pytest.raises(ValueError, match=r"shape \(6,\) require gradients"):
        fitted.fit(x, epochs=1, batch_size=40, progress=False)
    assert unchanged(before, fitted) == list(before)


# -- saving and loading one's own model -------------------------------------------------
def test_user_model_saves_and_loads_without_code(tmp_path):
    x = factor_data()
    fitted = LatentVariableModel(ppca_model, AmortizedGuide(ppca_model, x[:4]))
    fitted.fit(x[:100], x[100:], epochs=2, batch_size=20, learning_rate=1e-2, progress=False)
    path = fitted.save(tmp_path / "ppca.pt")
    again = LatentVariableModel.load(path, ppca_model, AmortizedGuide(ppca_model, x[:4]))
    expected = fitted.elbo(x[100:], num_samples=4, seed=3)
    assert torch.equal(again.elbo(x[100:], num_samples=4, seed=3), expected)
    assert again.history_.records == fitted.history_.records
    assert len(pyro.get_param_store()) == 0


def test_user_model_resumes_bitwise_from_its_checkpoint(tmp_path):
    x, options = factor_data(), dict(batch_size=20, learning_rate=1e-2, seed=2, progress=False)

    def build():
        pyro.set_rng_seed(7)  # the guide's initial weights
        return LatentVariableModel(ppca_model, AmortizedGuide(ppca_model, x[:4]))

    straight = build()
    straight.fit(x[:100], x[100:], epochs=4, **options)
    path = tmp_path / "run.pt"
    build().fit(x[:100], x[100:], epochs=2, checkpoint_path=path, **options)
    resumed = build()
    resumed.fit(x[:100], x[100:], epochs=4, checkpoint_path=path, resume=True, **options)
    assert resumed.history_.column("train_elbo") == straight.history_.column("train_elbo")


def test_vae_load_then_save_keeps_optimizer_and_resume_state(tmp_path, digits):
    vae = VAE(num_features=64, latent_dim=2, hidden_sizes=(16,), seed=0)
    path = tmp_path / "model.pt"
    vae.fit(
        digits.train[:128],
        binarize="dynamic",
        epochs=1,
        batch_size=64,
        progress=False,
        checkpoint_path=path,
    )
    again = tmp_path / "again.pt"
    VAE.load(path).save(again)
    loaded, reloaded = read_checkpoint(path), read_checkpoint(again)
    for key in ("optimizer_state", "training_state", "history", "train_config"):
        assert reloaded[key] is not None and str(reloaded[key]) == str(loaded[key]), key
    VAE.load(path).save(tmp_path / "small.pt", include_training_state=False)
    small = read_checkpoint(tmp_path / "small.pt")
    assert small["optimizer_state"] is None and small["training_state"] is None


@pytest.mark.slow
def test_function_ppca_fit_reaches_the_closed_form_maximum_likelihood(float64, digits):
    """pPCA has a closed-form maximum-likelihood solution (Tipping and Bishop, 1999) and a
    Gaussian posterior that is diagonal at it, so an amortized mean-field guide can be
    exact; fit must then reach the ML held-out log-likelihood (issue 14: within 0.5 nats)."""
    train, valid, test = (t.double() for t in (digits.train, digits.valid, digits.test))
    features, rank = train.shape[1], 8
    centre = train.mean(0)

    def model(x):
        mean = pyro.param("mean", centre.clone())
        loadings = pyro.param(
            "W",
            lambda: 0.1 * torch.randn(features, rank, generator=torch.Generator().manual_seed(0)),
        )
        noise = pyro.param("sigma", torch.tensor(1.0), constraint=constraints.positive)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([rank]).to_event(1))
            pyro.sample("x", dist.Normal(mean + z @ loadings.T, noise).to_event(1), obs=x)

    def held_out(mean, loadings, variance):
        covariance = loadings @ loadings.T + variance * torch.eye(features)
        return float(dist.MultivariateNormal(mean, covariance).log_prob(test).mean())

    eigenvalues, vectors = torch.linalg.eigh(torch.cov(train.T, correction=0))
    eigenvalues, vectors = eigenvalues.flip(0), vectors.flip(1)
    variance = eigenvalues[rank:].mean()
    ml_loadings = vectors[:, :rank] * (eigenvalues[:rank] - variance).sqrt()
    maximum_likelihood = held_out(centre, ml_loadings, variance)

    fitted = LatentVariableModel(model, AmortizedGuide(model, train[:4], hidden_sizes=(64,)))
    fitted.fit(
        train,
        valid,
        objective="trace_meanfield_elbo",
        epochs=600,
        batch_size=100,
        learning_rate=1e-2,
        lr_schedule="plateau",
        lr_patience=20,
        min_learning_rate=1e-3,
        seed=0,
        progress=False,
    )
    params = fitted.pyro_params
    sigma = params.parameter("sigma").detach().exp()
    estimate = held_out(params.parameter("mean").detach(), params.parameter("W").detach(), sigma**2)
    assert abs(estimate - maximum_likelihood) < 0.5, (estimate, maximum_likelihood)


def test_compiled_training_refuses_modules_captured_from_outside():
    """A compiled step substitutes the module tree's parameters; a module the function
    reaches from its enclosing scope would keep its own tensors and get no gradient."""
    program = FactorAnalysis()
    fitted = LatentVariableModel(program.model, program.guide)
    with pytest.raises(ValueError, match=r"compile='graph'.*cannot substitute them"):
        fitted.fit(factor_data(), epochs=1, batch_size=40, compile="graph", progress=False)


def test_methods_of_one_module_train_identically_eager_and_compiled(float64):
    def run(compile_mode):
        torch.manual_seed(0)
        program = FactorAnalysisModule()
        fitted = LatentVariableModel(program.model, program.guide)
        fitted.fit(
            factor_data(),
            epochs=2,
            batch_size=40,
            learning_rate=1e-2,
            seed=1,
            compile=compile_mode,
            progress=False,
        )
        return fitted.history_.column("train_elbo"), snapshot(program)

    (eager, eager_state), (graph, graph_state) = run("none"), run("graph")
    assert graph == pytest.approx(eager, rel=1e-9)
    for name, value in eager_state.items():
        assert torch.allclose(graph_state[name], value, rtol=1e-7, atol=1e-9), name


@pytest.mark.parametrize("compile_mode", ["none", "graph"])
def test_fit_trains_a_model_with_a_plate_nested_in_the_data_plate(compile_mode):
    def model(x):
        loc = pyro.param("loc", torch.zeros(D))
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", D, dim=-1):
                pyro.sample("x", dist.Normal(z + loc, 1.0), obs=x)

    def guide(x):
        weight = pyro.param("weight", torch.tensor(0.5))
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(weight * x.mean(-1, keepdim=True), 0.7))

    fitted = LatentVariableModel(model, guide)
    history = fitted.fit(
        factor_data(),
        epochs=3,
        batch_size=40,
        learning_rate=5e-2,
        compile=compile_mode,
        progress=False,
    )
    assert all(math.isfinite(value) for value in history.column("train_elbo"))
    assert not torch.equal(fitted.pyro_params.parameter("loc"), torch.zeros(D))


def test_poutine_lift_still_turns_a_function_programs_parameters_into_samples():
    """The registry answers param statements by wrapping their function, so a handler
    outside (poutine.lift) still replaces the parameter by a draw from its prior."""
    x = factor_data()
    fitted = LatentVariableModel(ppca_model, AmortizedGuide(ppca_model, x[:4]))
    fitted.prepare_parameters(x)
    prior = {"W": dist.Normal(torch.full((D, Q), 5.0), 1.0).to_event(2)}
    trace = poutine.trace(poutine.lift(fitted.model, prior=prior)).get_trace(x)
    assert trace.nodes["W"]["type"] == "sample"
    assert trace.nodes["W"]["value"].mean() > 3.0  # a draw from the prior, not the parameter
    assert trace.nodes["sigma"]["type"] == "param"
    plain = poutine.trace(fitted.model, param_only=True).get_trace(x)
    assert plain.nodes["W"]["value"].unconstrained() is fitted.pyro_params.parameter("W")
