"""Discrete local latent sites, summed out exactly by parallel enumeration (issue 22): a
Gaussian mixture marked with config_enumerate, Kingma's M2 structure with labels observed for
some points (obs_mask), every objective, and the refusals. Exact answers by brute-force sums
over the labels of linear-Gaussian models (float64, SE-derived tolerances)."""

import math
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate

from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.structure import check_structure
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.latent_variable import LatentVariableModel

WEIGHTS = torch.tensor([0.3, 0.7], dtype=torch.float64)
MEANS = torch.tensor([-2.0, 2.0], dtype=torch.float64)
NOISE = 0.5


@config_enumerate
def mixture(x):
    """y ~ Categorical(w), z | y ~ N(mu_y, 1), x | z ~ N(z, s^2): one component per point."""
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(WEIGHTS))
        z = pyro.sample("z", dist.Normal(MEANS[y], 1.0))
        pyro.sample("x", dist.Normal(z, NOISE), obs=x)


def mixture_log_px(x: torch.Tensor) -> torch.Tensor:
    components = dist.Normal(MEANS, math.sqrt(1 + NOISE**2)).log_prob(x[:, None])
    return torch.logsumexp(WEIGHTS.log() + components, -1)


def column(x):
    return x[:, None]


def fitted_mixture(x) -> LatentVariableModel:
    guide = AmortizedGuide(mixture, x[:3], encoder_input=column, hidden_sizes=(16,))
    fitted = LatentVariableModel(mixture, guide)
    fitted.fit(x, epochs=80, batch_size=len(x), learning_rate=3e-2, compile="none", progress=False)
    return fitted


def within_standard_errors(estimate, se, exact, count: float = 4.0) -> None:
    difference = np.asarray(estimate) - np.asarray(exact)
    tolerance = count * math.sqrt(float(np.sum(np.asarray(se) ** 2))) / len(difference)
    assert abs(difference.mean()) < tolerance, (difference.mean(), tolerance)


@pytest.fixture(scope="module")
def mixture_fit():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)
    x = torch.randn(50) * 2.0
    fitted = fitted_mixture(x)
    yield x, fitted
    torch.set_default_dtype(previous)


def test_enumerated_mixture_log_likelihood_is_exact(mixture_fit, float64):
    x, fitted = mixture_fit
    assert fitted.structure(x).vectorized
    result = fitted.evaluate(x, num_samples=2000, ks=(1,), seed=0, latent_diagnostics=False)
    within_standard_errors(
        result.per_datapoint["log_px"], result.per_datapoint["log_px_se"], mixture_log_px(x)
    )
    assert result.per_datapoint["elbo"].mean() < float(mixture_log_px(x).mean())


def test_the_elbo_is_pyros_trace_enum_elbo(mixture_fit, float64):
    x, fitted = mixture_fit
    pyro.set_rng_seed(1)
    theirs = pyro.infer.TraceEnum_ELBO(
        max_plate_nesting=1, num_particles=4000, vectorize_particles=True
    )
    with warnings.catch_warnings():  # Pyro notes that the enumerated site is not guided
        warnings.simplefilter("ignore", UserWarning)
        pyros = -theirs.loss(fitted.model, fitted.guide, x) / len(x)
    ours = fitted.elbo(x, num_samples=4000, seed=0)
    analytic = fitted.elbo(x, num_samples=4000, seed=0, analytic_kl=True)
    terms = fitted.elbo(x, num_samples=1, seed=0)  # a single draw's spread bounds the SE
    se = float(terms.std()) / math.sqrt(4000 * len(x)) * 2
    assert abs(float(ours.mean()) - pyros) < 4 * se
    assert abs(float(analytic.mean()) - float(ours.mean())) < 4 * se


@pytest.mark.parametrize(
    "objective,compile",
    [
        ("iwae", "auto"),
        ("trace_meanfield_elbo", "auto"),
        ("stl", "none"),
        ("dreg", "none"),
        ("renyi", "none"),
    ],
)
def test_every_objective_trains_with_the_enumerated_site(float64, objective, compile):
    torch.manual_seed(1)
    x = torch.randn(24) * 2.0
    guide = AmortizedGuide(mixture, x[:3], encoder_input=column, hidden_sizes=(8,))
    fitted = LatentVariableModel(mixture, guide)
    history = fitted.fit(
        x,
        x,
        epochs=2,
        batch_size=12,
        objective=objective,
        num_particles=3,
        compile=compile,
        progress=False,
    )
    assert np.isfinite(history.column("valid_elbo")).all()


# --------------------------------------------------------------------------- partial labels

# Offsets small beside the noise: the posterior of z given x alone (a mixture over labels) is
# close to one Gaussian, so a Gaussian guide is a good proposal for the unlabelled points.
OFFSETS = torch.tensor([[-0.8, 0.0], [0.0, 0.8], [0.8, -0.4]], dtype=torch.float64)
PRIOR = torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64)


def m2(x, y, labelled):
    """Kingma's M2 structure, linear-Gaussian: y ~ Cat(pi) observed where ``labelled``,
    z ~ N(0, I), x ~ N(z + b_y, s^2 I); one pass over labelled and unlabelled points."""
    with pyro.plate("data", x.shape[0]):
        label = pyro.sample("y", dist.Categorical(PRIOR), obs=y, obs_mask=labelled)
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z + OFFSETS[label], NOISE).to_event(1), obs=x)


def m2_data(n: int = 40):
    torch.manual_seed(2)
    y = torch.multinomial(PRIOR, n, replacement=True)
    x = torch.randn(n, 2) * math.sqrt(1 + NOISE**2) + OFFSETS[y]
    labelled = torch.arange(n) % 2 == 0
    joint = PRIOR.log() + dist.Normal(OFFSETS, math.sqrt(1 + NOISE**2)).log_prob(x[:, None, :]).sum(
        -1
    )  # (n, 3): log p(x_n, y)
    exact = torch.where(labelled, joint[torch.arange(n), y], torch.logsumexp(joint, -1))
    return x, y, labelled, exact


def encode_m2(x, y, labelled):
    shown = torch.where(labelled[:, None], F.one_hot(y, 3), 0).to(x.dtype)
    return torch.cat([x, shown], -1)


def test_m2_with_partial_labels_sums_the_missing_labels_exactly(float64):
    x, y, labelled, exact = m2_data()
    guide = AmortizedGuide(
        m2, x[:3], y[:3], labelled[:3], encoder_input=encode_m2, hidden_sizes=(16,)
    )
    assert [s.name for s in guide.sites] == ["z"]  # the label is enumerated, not guided
    fitted = LatentVariableModel(m2, guide)
    fitted.fit(
        (x, y, labelled),
        epochs=80,
        batch_size=40,
        learning_rate=3e-2,
        compile="none",
        progress=False,
    )
    result = fitted.evaluate(x, y, labelled, num_samples=2000, ks=(1,), seed=0)
    log_px, se = result.per_datapoint["log_px"], result.per_datapoint["log_px_se"]
    unlabelled = ~labelled.numpy()
    within_standard_errors(log_px[unlabelled], se[unlabelled], exact[unlabelled])
    within_standard_errors(log_px[~unlabelled], se[~unlabelled], exact[~unlabelled])
    # Latent-use diagnostics (on by default) cover z; the summed-out label is not a code,
    # and z's prior could depend on it, so no KL per dimension is claimed.
    assert set(result.latent) == {"z"}
    assert result.latent["z"].kl_per_dim is None
    assert result.latent["z"].active_units == 2


# --------------------------------------------------------------------------- refusals


def test_discrete_sites_that_cannot_be_enumerated_here_are_refused(float64):
    x = torch.randn(6, 3)

    def markov(x):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("time", 3, dim=-1):
            s = pyro.sample("s", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(s, 1.0), obs=x)

    def counts(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Poisson(3.0))
            pyro.sample("x", dist.Normal(k[..., None], 1.0).to_event(1), obs=x)

    def sampled(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Bernoulli(0.5))

    def nothing(x):
        pass

    with pytest.raises(ValueError, match="'s' is discrete.*Markov"):
        check_structure(markov, nothing, x)
    with pytest.raises(ValueError, match="'k' is discrete.*no finite support"):
        check_structure(counts, nothing, x)


def test_a_guide_that_samples_a_discrete_site_is_evaluated_and_refused_by_ais(float64):
    """Sampled from the guide, the site is importance-sampled (a valid proposal; Pyro's
    Trace_ELBO trains it with a score function); AIS, which moves z by HMC, refuses it."""
    from pyrovae.evaluation.ais import ais

    torch.manual_seed(5)
    x = torch.randn(30, 2) + 0.5

    def bernoulli_model(x):
        with pyro.plate("data", x.shape[0]):
            k = pyro.sample("k", dist.Bernoulli(0.5))
            pyro.sample("x", dist.Normal(k[..., None], 1.0).to_event(1), obs=x)

    def sampled(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("k", dist.Bernoulli(0.5))

    result = evaluate(
        bernoulli_model, sampled, x, num_samples=400, ks=(1,), seed=0, latent_diagnostics=False
    )
    normal = dist.Normal(0.0, 1.0)
    exact = torch.logsumexp(
        torch.stack([normal.log_prob(x).sum(-1), normal.log_prob(x - 1).sum(-1)]), 0
    ) - math.log(2)
    within_standard_errors(result.per_datapoint["log_px"], result.per_datapoint["log_px_se"], exact)
    with pytest.raises(ValueError, match="guide samples the discrete site\\(s\\) 'k'"):
        ais(bernoulli_model, sampled, x, num_steps=2, num_chains=2)


def test_eager_training_sums_the_discrete_site_out_instead_of_sampling_it(float64, recwarn):
    """Pyro's Trace_ELBO would sample the label (no gradient reaches its probabilities); the
    eager path takes the pyrovae ELBO, which enumerates it, as the compiled path does."""
    x, y, labelled, _ = m2_data(20)
    guide = AmortizedGuide(
        m2, x[:3], y[:3], labelled[:3], encoder_input=encode_m2, hidden_sizes=(8,)
    )
    fitted = LatentVariableModel(m2, guide)
    fitted.fit((x, y, labelled), epochs=1, batch_size=10, compile="none", progress=False)
    assert not [w for w in recwarn if "not guide" in str(w.message)]
    assert fitted.training_path_ == "eager"


def test_ais_sums_the_enumerated_site_out_exactly(mixture_fit, float64):
    from pyrovae.evaluation.ais import ais

    x, fitted = mixture_fit
    points = x[:20]
    result = ais(fitted.model, fitted.guide, points, num_steps=30, num_chains=8, seed=0)
    within_standard_errors(result.log_px, result.log_px_se, mixture_log_px(points))


def test_gaps_and_compare_work_on_an_enumerated_model(mixture_fit, float64):
    from pyrovae.evaluation.comparison import compare
    from pyrovae.evaluation.gaps import decompose_gaps

    x, fitted = mixture_fit
    points = x[:10]
    gaps = decompose_gaps(fitted, points, num_samples=100, steps=20, seed=0)
    exact = float(mixture_log_px(points).mean())
    column = gaps.per_datapoint["log_px"]
    assert abs(column.mean() - exact) < 4 * column.std() / math.sqrt(len(column)) + 0.05
    result = compare({"a": fitted, "b": fitted}, points, num_samples=100, seed=0)
    assert "a - b" in result.table()


def test_the_label_posterior_is_the_exact_bayes_posterior(float64):
    """p(y | x) of M2's unlabelled points against pi_y N(x; b_y, (1 + s^2) I) normalized; the
    tolerance is four standard errors estimated from two independent runs."""
    x, y, labelled, _ = m2_data()
    guide = AmortizedGuide(
        m2, x[:3], y[:3], labelled[:3], encoder_input=encode_m2, hidden_sizes=(16,)
    )
    fitted = LatentVariableModel(m2, guide)
    fitted.fit(
        (x, y, labelled),
        epochs=80,
        batch_size=40,
        learning_rate=3e-2,
        compile="none",
        progress=False,
    )
    unlabelled = torch.zeros_like(labelled)
    first = fitted.discrete_posterior(x, y, unlabelled, site="y", num_samples=1000, seed=0)
    second = fitted.discrete_posterior(x, y, unlabelled, site="y", num_samples=1000, seed=1)
    joint = PRIOR.log() + dist.Normal(OFFSETS, math.sqrt(1 + NOISE**2)).log_prob(x[:, None, :]).sum(
        -1
    )
    exact = torch.softmax(joint, -1)
    assert first.shape == (40, 3) and torch.allclose(first.sum(-1), torch.ones(40))
    spread = (first - second).abs().mean(0) / math.sqrt(2)  # per class, one run's error
    error = ((first + second) / 2 - exact).mean(0).abs()
    assert bool((error < 4 * spread / math.sqrt(40) + 1e-3).all()), (error, spread)
    observed = fitted.discrete_posterior(x, y, labelled, site="y", num_samples=10, seed=0)
    assert torch.allclose(observed[labelled], torch.full((int(labelled.sum()), 3), 1 / 3))


def test_an_amortized_label_head_trains_with_traceenum_and_its_bounds_are_exact(float64):
    """discrete="amortize": q(y | x) q(z | x, y) as in Kingma et al.'s M2, trained with Pyro's
    TraceEnum_ELBO (the label summed in the guide); evaluate samples y from q(y | x)."""
    x, y, labelled, exact = m2_data()
    guide = AmortizedGuide(
        m2,
        x[:3],
        y[:3],
        labelled[:3],
        encoder_input=encode_m2,
        hidden_sizes=(16,),
        discrete="amortize",
    )
    assert [s.name for s in guide.sites] == ["z"]
    assert [s.name for s in guide.discrete_sites] == ["y_unobserved"]
    fitted = LatentVariableModel(m2, guide)
    fitted.fit(
        (x, y, labelled),
        epochs=80,
        batch_size=40,
        learning_rate=3e-2,
        objective="traceenum_elbo",
        compile="none",
        progress=False,
    )
    result = fitted.evaluate(x, y, labelled, num_samples=2000, ks=(1,), seed=0)
    log_px, se = result.per_datapoint["log_px"], result.per_datapoint["log_px_se"]
    unlabelled = ~labelled.numpy()
    within_standard_errors(log_px[unlabelled], se[unlabelled], exact[unlabelled])
    within_standard_errors(log_px[~unlabelled], se[~unlabelled], exact[~unlabelled])
    assert set(result.latent) == {"z"}  # the sampled label is not diagnosed as a code
    assert result.latent["z"].kl_per_dim is not None  # the guide samples y: nothing summed
    probabilities = guide.class_probabilities(x, y, labelled, site="y")
    assert probabilities.shape == (40, 3)
    assert torch.allclose(probabilities.sum(-1), torch.ones(40))
    with pytest.raises(ValueError, match="reparameterized"):
        fitted.fit(
            (x, y, labelled),
            epochs=1,
            batch_size=40,
            objective="iwae",
            num_particles=2,
            compile="none",
            progress=False,
        )


def test_the_classification_term_is_a_training_mode_factor_on_labelled_points(float64):
    x, y, labelled, _ = m2_data(8)
    guide = AmortizedGuide(
        m2,
        x[:3],
        y[:3],
        labelled[:3],
        encoder_input=encode_m2,
        hidden_sizes=(4,),
        discrete="amortize",
        classification_weight=2.0,
    )
    trace = pyro.poutine.trace(guide).get_trace(x, y, labelled)
    factor = trace.nodes["y_unobserved_classification"]["fn"].log_factor
    log_q = torch.log(guide.class_probabilities(x, y, labelled, site="y"))[torch.arange(8), y]
    expected = torch.where(labelled, -2.0 * log_q, 0.0)
    assert torch.allclose(factor, expected)
    guide.eval()  # evaluation leaves it out: the bounds stay bounds
    assert (
        "y_unobserved_classification"
        not in pyro.poutine.trace(guide).get_trace(x, y, labelled).nodes
    )
    with pytest.raises(ValueError, match="classification_weight"):
        AmortizedGuide(m2, x[:3], y[:3], labelled[:3], classification_weight=1.0)
    with pytest.raises(ValueError, match="discrete must be"):
        AmortizedGuide(m2, x[:3], y[:3], labelled[:3], discrete="sample")


def test_a_labelled_points_latent_head_sees_its_observed_label(float64):
    """q(z | x, y) of a labelled point conditions on the label the model observes, whatever
    value the enumerated draw of the masked twin takes; unlabelled points see the draw."""
    x, y, labelled, _ = m2_data(6)
    guide = AmortizedGuide(m2, x[:3], y[:3], labelled[:3], hidden_sizes=(4,), discrete="amortize")
    enumerated = pyro.poutine.enum(config_enumerate(guide), first_available_dim=-2)
    trace = pyro.poutine.trace(enumerated).get_trace(x, y, labelled)
    draws = trace.nodes["y_unobserved"]["value"]  # (3, 1): every class
    loc = trace.nodes["z"]["fn"].base_dist.loc  # (3, 6, 2): one row per enumerated class
    hidden = guide.trunk(x)

    def head(labels):
        return guide.locs["z"](torch.cat([hidden, F.one_hot(labels, 3).to(x.dtype)], -1))

    assert torch.allclose(loc[:, labelled], head(y)[labelled].expand(3, -1, -1))
    for c, row in zip(draws.reshape(-1).tolist(), loc, strict=True):
        assert torch.allclose(row[~labelled], head(torch.full_like(y, c))[~labelled])
