"""Users' own Pyro models (experiments/user_models.py) get an amortized guide from
AmortizedGuide, train with the library's fit, and satisfy ELBO <= IWAE_k <= log p_hat."""

import importlib.util
from pathlib import Path

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.evaluation.importance import evaluate
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.latent_variable import LatentVariableModel

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "user_models.py"


@pytest.fixture(scope="module")
def studies():
    spec = importlib.util.spec_from_file_location("user_models", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["factor_analysis", "poisson_factorisation"])
def test_user_model_trains_and_its_bounds_are_ordered(studies, name):
    fitted, (train, valid, test) = studies.STUDIES[name](seed=0)
    before = fitted.elbo(*valid, num_samples=20, seed=1)
    history = fitted.fit(
        train, valid, epochs=8, batch_size=64, learning_rate=1e-2, seed=0, progress=False
    )
    after = fitted.elbo(*valid, num_samples=20, seed=1)
    difference = (after - before).numpy()
    standard_error = difference.std(ddof=1) / np.sqrt(len(difference))
    assert difference.mean() > 5 * standard_error and difference.mean() > 1.0
    assert len(history) == 8 and all(np.isfinite(history.column("valid_elbo")))
    assert list(pyro.get_param_store().keys()) == []  # the model's parameters stay local

    result = fitted.evaluate(*test, num_samples=400, ks=(1, 20), seed=0, latent_diagnostics=False)
    columns = result.per_datapoint
    # Ordered in expectation: compare means of per-datapoint differences with 4 SE of slack.
    for lower, upper in (("elbo", "iwae_20"), ("iwae_20", "log_px")):
        gap = columns[upper] - columns[lower]
        assert gap.mean() > -4 * gap.std(ddof=1) / np.sqrt(len(gap)), (lower, upper)
    assert columns["elbo"].mean() < columns["log_px"].mean()


def test_the_guide_follows_the_sites_supports(studies):
    fitted, ((x,), _, _) = studies.STUDIES["poisson_factorisation"](seed=0)
    site = fitted.guide.sites[0]
    assert site.name == "theta" and tuple(site.event_shape) == (4,)
    with torch.no_grad():
        trace = pyro.poutine.trace(fitted.guide).get_trace(x[:7])
    value = trace.nodes["theta"]["value"]
    assert value.shape == (7, 4) and bool((value > 0).all())  # Gamma support: positive


def test_guide_refuses_global_and_discrete_latents():
    def global_latent(x):
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("x", dist.Normal(0.0, scale).expand([x.shape[0], 3]).to_event(1), obs=x)

    def discrete_latent(x):
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            mean = c.unsqueeze(-1).expand(c.shape + (3,))
            pyro.sample("x", dist.Normal(mean, 1.0).to_event(1), obs=x)

    def discrete_latent_for_one_shape(x):  # .expand([N, 3]) cannot take an enumeration dim
        with pyro.plate("data", x.shape[0]):
            c = pyro.sample("c", dist.Bernoulli(0.5))
            pyro.sample(
                "x", dist.Normal(c.unsqueeze(-1), 1.0).expand([x.shape[0], 3]).to_event(1), obs=x
            )

    x = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"latent site 'scale' is global \(outside"):
        AmortizedGuide(global_latent, x)
    guide = AmortizedGuide(discrete_latent, x)  # the discrete site is enumerated, not guided
    assert guide.sites == []
    result = evaluate(discrete_latent, guide, x, num_samples=3, ks=(1,), latent_diagnostics=False)
    normal = dist.Normal(0.0, 1.0)
    exact = (
        torch.logsumexp(
            torch.stack([normal.log_prob(x).sum(-1), normal.log_prob(x - 1).sum(-1)]), 0
        )
        - torch.tensor(2.0).log()
    )
    np.testing.assert_allclose(result.per_datapoint["log_px"], exact.numpy(), rtol=1e-5)
    guide = AmortizedGuide(discrete_latent_for_one_shape, x)
    with pytest.raises(ValueError, match=r"fails with its discrete site\(s\) 'c' enumerated"):
        evaluate(discrete_latent_for_one_shape, guide, x, num_samples=3, ks=(1,))


def test_generic_inputs_are_validated_before_training(studies):
    fitted, ((x,), _, _) = studies.STUDIES["poisson_factorisation"](seed=0)
    state = {k: v.clone() for k, v in fitted.state_dict().items()}
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fitted.fit(bad, epochs=1, progress=False)
    with pytest.raises(ValueError, match="binarize applies to the built-in VAE"):
        fitted.fit(x, epochs=1, binarize="dynamic", progress=False)
    for key, value in fitted.state_dict().items():
        assert torch.equal(value, state[key])
    model = LatentVariableModel(fitted.model, fitted.guide)
    with pytest.raises(ValueError, match="same non-zero number of rows"):
        model.elbo(x, x[:3])
