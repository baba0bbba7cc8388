"""Users' models at the edges of the per-datapoint estimators (issue 21): nested plates, masked
latents, obs_mask imputation, other plate dims, code written for one draw, integer and bool
inputs, data plates with other names, per-datapoint scales, global latents. Each model is
linear-Gaussian, so log p(x) is exact; the importance-sampled estimates must agree with it
within their Monte Carlo standard errors (float64, fixed seeds), or the pair is refused
before anything trains."""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine

from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.structure import check_structure
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.latent_variable import LatentVariableModel
from pyrovae.objectives import make_objective

NOISE = 0.7
WEIGHTS = torch.tensor([0.5, -1.0, 1.5, 0.8], dtype=torch.float64)


def assert_matches_exact(result, exact: torch.Tensor) -> None:
    """Mean over points of log p_hat(x) - log p(x) within 4 standard errors (the IS bias,
    about V/2K, is far below one SE at these K)."""
    log_px = result.per_datapoint["log_px"]
    se = result.per_datapoint["log_px_se"]
    difference = log_px - exact.numpy()
    tolerance = 4 * math.sqrt(float(np.sum(se**2))) / len(se) + 1e-9
    assert abs(difference.mean()) < tolerance, (difference.mean(), tolerance)


def fitted_guide(model, guide, *inputs, epochs: int = 60, **options) -> LatentVariableModel:
    """The pair with its guide trained (full-batch steps): a proposal close to the
    posterior, so that K = 2000 importance weights have a small, well-estimated variance."""
    fitted = LatentVariableModel(model, guide, **options)
    fitted.fit(
        inputs,
        epochs=epochs,
        batch_size=len(inputs[0]),
        learning_rate=3e-2,
        compile="none",
        progress=False,
    )
    return fitted


def normal_log_density(x: torch.Tensor, variance) -> torch.Tensor:
    return dist.Normal(0.0, torch.as_tensor(variance, dtype=x.dtype).sqrt()).log_prob(x)


# --------------------------------------------------------------------------- nested plates


def nested_model(data_dim: int):
    inner_dim = -1 if data_dim == -2 else -2

    def model(x):
        with pyro.plate("data", x.shape[0], dim=data_dim):
            with pyro.plate("steps", 4, dim=inner_dim):
                z = pyro.sample("z", dist.Normal(0.0, 1.0))
            if data_dim == -2:  # z: (..., N, 4)
                mean = (z * WEIGHTS).sum(-1, keepdim=True)
                pyro.sample("x", dist.Normal(mean, NOISE), obs=x)
            else:  # z: (..., 4, N)
                mean = (z * WEIGHTS[:, None]).sum(-2)
                pyro.sample("x", dist.Normal(mean, NOISE), obs=x[:, 0])

    return model


@pytest.mark.parametrize("data_dim", [-1, -2])
def test_amortized_guide_follows_nested_plates_and_data_plate_dims(float64, data_dim):
    torch.manual_seed(0)
    x = torch.randn(40, 1) * 2.0
    model = nested_model(data_dim)
    guide = AmortizedGuide(model, x[:3], hidden_sizes=(16,))
    # The posterior of the four z is correlated, which a mean-field guide misses: trained
    # longer, its importance weights stay light enough for K = 2000 (IS bias ~ 1.5 SE).
    result = fitted_guide(model, guide, x, epochs=200).evaluate(
        x, num_samples=2000, ks=(1,), seed=0, latent_diagnostics=False
    )
    exact = normal_log_density(x[:, 0], NOISE**2 + float(WEIGHTS.square().sum()))
    assert_matches_exact(result, exact)


def test_a_guide_that_broadcasts_over_an_inner_plate_is_refused(float64):
    x = torch.randn(6, 1)
    model = nested_model(-2)

    def guide(x):  # one value per data point, broadcast over the model's inner plate
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 1), 1.0))

    with pytest.raises(ValueError, match="shapes disagree at site 'z'.*'steps'"):
        evaluate(model, guide, x, num_samples=10, ks=(1,))


# --------------------------------------------------------------------------- masks


def padded_model(x, lengths):
    """Variable-length sequences: z_nt and x_nt exist for t < length_n only."""
    mask = torch.arange(x.shape[1]) < lengths[:, None]
    with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("time", x.shape[1], dim=-1):
        with poutine.mask(mask=mask):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(1.3 * z, NOISE), obs=x)


def padded_data(n: int = 30):
    torch.manual_seed(1)
    lengths = torch.randint(1, 5, (n,))
    x = torch.randn(n, 4) * 1.5
    x[torch.arange(4) >= lengths[:, None]] = 0.0  # padding
    exact = (normal_log_density(x, 1.3**2 + NOISE**2) * (torch.arange(4) < lengths[:, None])).sum(
        -1
    )
    return x, lengths, exact


def test_masked_latents_get_the_models_mask_and_integer_inputs_keep_their_dtype(float64):
    x, lengths, exact = padded_data()
    guide = AmortizedGuide(padded_model, x[:3], lengths[:3], hidden_sizes=(16,))
    fitted = fitted_guide(padded_model, guide, x, lengths)
    assert fitted.inputs(x, lengths)[1].dtype == torch.int64
    result = fitted.evaluate(
        x, lengths, num_samples=2000, ks=(1,), seed=0, latent_diagnostics=False
    )
    assert_matches_exact(result, exact)
    elbo = fitted.elbo(x, lengths, num_samples=200, seed=0)
    assert float(elbo.mean()) < float(exact.mean())  # a bound, not above log p(x)


def test_a_guide_that_does_not_mask_padded_latents_is_refused(float64):
    x, lengths, _ = padded_data(6)

    def guide(x, lengths):
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("time", x.shape[1], dim=-1):
            pyro.sample("z", dist.Normal(0.5 * x, 0.8))

    with pytest.raises(ValueError, match="masked differently in the model and the guide"):
        evaluate(padded_model, guide, x, lengths, num_samples=10, ks=(1,))
    fitted = LatentVariableModel(padded_model, guide)
    with pytest.raises(ValueError, match="masked differently"):
        fitted.elbo(x, lengths)


def test_pyro_svi_elbo_with_the_amortized_guide_stays_below_log_px(float64):
    """The literal user code: Pyro's own Trace_ELBO on a masked model and AmortizedGuide."""
    x, lengths, exact = padded_data()
    guide = AmortizedGuide(padded_model, x[:3], lengths[:3], hidden_sizes=(16,))
    pyro.clear_param_store()
    elbo = pyro.infer.Trace_ELBO(num_particles=400, vectorize_particles=True, max_plate_nesting=2)
    estimate = -elbo.loss(padded_model, guide, x, lengths)
    assert estimate < float(exact.sum())


LOADINGS = [1.0, -0.3, 0.2]  # the entries that may be missing depend weakly on z


def imputation_model(x, observed):
    """Factor analysis with entries missing at random, imputed through obs_mask."""
    loadings = torch.tensor(LOADINGS, dtype=x.dtype)
    with pyro.plate("data", x.shape[0], dim=-2):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        with pyro.plate("features", 3, dim=-1):
            pyro.sample("x", dist.Normal(z * loadings, NOISE), obs=x, obs_mask=observed)


def test_obs_mask_imputation_sites_are_guided_and_marginalised(float64):
    torch.manual_seed(2)
    x = torch.randn(30, 3) * 1.5
    observed = torch.rand(30, 3) > 0.3
    observed[:, 0] = True
    guide = AmortizedGuide(imputation_model, x[:3], observed[:3], hidden_sizes=(16,))
    assert {s.name for s in guide.sites} == {"z", "x_unobserved"}
    result = fitted_guide(imputation_model, guide, x, observed).evaluate(
        x, observed, num_samples=2000, ks=(1,), seed=0, latent_diagnostics=False
    )
    loadings = torch.tensor(LOADINGS)
    exact = []
    for row, keep in zip(x, observed, strict=True):
        w = loadings[keep]
        covariance = torch.outer(w, w) + NOISE**2 * torch.eye(len(w))
        exact.append(dist.MultivariateNormal(torch.zeros(len(w)), covariance).log_prob(row[keep]))
    assert_matches_exact(result, torch.stack(exact))


# --------------------------------------------------------------------------- one draw


MIXING = torch.tensor([[1.0, 0.5], [-0.5, 1.0], [0.3, 0.0]], dtype=torch.float64)
OFFSETS = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 1.0], [-2.0, -1.0, 0.0]], dtype=torch.float64)


def one_draw_cvae(x, y):
    """A conditional model written as people write it: cat along dim=1, integer labels."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        h = torch.cat([z, F.one_hot(y, 3).to(z.dtype)], dim=1)
        mean = h @ torch.cat([MIXING, OFFSETS.T], dim=1).T
        pyro.sample("x", dist.Normal(mean, NOISE).to_event(1), obs=x)


def encode_with_label(x, y):
    return torch.cat([x, F.one_hot(y, 3).to(x.dtype)], dim=-1)


def cvae_data(n: int = 40):
    torch.manual_seed(3)
    y = torch.randint(0, 3, (n,))
    x = torch.randn(n, 3) + OFFSETS[y]
    covariance = MIXING @ MIXING.T + NOISE**2 * torch.eye(3)
    exact = dist.MultivariateNormal(OFFSETS[y], covariance).log_prob(x)
    return x, y, exact


def test_code_written_for_one_draw_runs_one_draw_per_pass_with_exact_numbers(float64):
    x, y, exact = cvae_data()
    guide = AmortizedGuide(
        one_draw_cvae, x[:3], y[:3], hidden_sizes=(16,), encoder_input=encode_with_label
    )
    structure = check_structure(one_draw_cvae, guide, x, y)
    assert not structure.vectorized and "RuntimeError" in structure.why_sequential
    fitted = fitted_guide(one_draw_cvae, guide, x, y)
    result = fitted.evaluate(x, y, num_samples=1000, ks=(1,), seed=0, latent_diagnostics=False)
    assert_matches_exact(result, exact)
    with pytest.warns(UserWarning, match="one per pass"):
        history = fitted.fit(
            (x, y),
            (x, y),
            objective="iwae",
            num_particles=3,
            epochs=2,
            batch_size=20,
            compile="none",
            progress=False,
        )
    assert np.isfinite(history.column("valid_elbo")).all()


def softmax_model(dim: int):
    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([3]).to_event(1))
            probs = torch.softmax(z, dim=dim)
            pyro.sample("x", dist.Categorical(probs=probs), obs=x)

    return model


def softmax_guide(x):
    with pyro.plate("data", x.shape[0]):
        loc = 0.5 * F.one_hot(x, 3).to(torch.get_default_dtype())
        pyro.sample("z", dist.Normal(loc, 1.0).to_event(1))


def test_a_silently_particle_unsafe_softmax_gives_the_broadcasting_rewrites_numbers(float64):
    """softmax(dim=1) over (K, N, 3) normalises over data points, without an error."""
    x = torch.arange(20) % 3
    assert not check_structure(softmax_model(1), softmax_guide, x).vectorized
    assert check_structure(softmax_model(-1), softmax_guide, x).vectorized
    one = evaluate(softmax_model(1), softmax_guide, x, num_samples=2000, ks=(1,), seed=0)
    safe = evaluate(softmax_model(-1), softmax_guide, x, num_samples=2000, ks=(1,), seed=1)
    difference = one.per_datapoint["log_px"] - safe.per_datapoint["log_px"]
    se = np.sqrt(one.per_datapoint["log_px_se"] ** 2 + safe.per_datapoint["log_px_se"] ** 2)
    assert abs(difference.mean()) < 4 * np.sqrt(np.sum(se**2)) / len(se)


# --------------------------------------------------------------------------- global, scales, names


def global_model(x):
    tau = pyro.sample("tau", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z[..., None], tau[..., None, None]).to_event(1), obs=x)


def test_global_latents_are_refused_before_any_training_step(float64):
    x = torch.randn(20, 1)

    def guide(x):
        scale = pyro.param("scale", torch.tensor(1.0), constraint=dist.constraints.positive)
        pyro.sample("tau", dist.LogNormal(0.0, scale))
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, 0], 1.0))

    fitted = LatentVariableModel(global_model, guide)
    with pytest.raises(ValueError, match="latent site 'tau' is global"):
        fitted.fit(x, epochs=1, batch_size=5, progress=False)
    assert fitted.history_ is None and fitted.optimizer_ is None
    with pytest.raises(ValueError, match="'tau' is global"):
        evaluate(global_model, guide, x, num_samples=5, ks=(1,))


def weighted_model(x, weights):
    with pyro.plate("data", x.shape[0]), poutine.scale(scale=weights):
        z = pyro.sample("z", dist.Normal(0.0, 1.0))
        pyro.sample("x", dist.Normal(z[..., None], NOISE).to_event(1), obs=x)


def test_per_datapoint_weights_train_and_validate_with_elbos_and_are_refused_by_iwae(float64):
    torch.manual_seed(4)
    x, weights = torch.randn(40, 1), torch.rand(40) + 0.5
    guide = AmortizedGuide(weighted_model, x[:3], weights[:3], hidden_sizes=(8,))
    fitted = LatentVariableModel(weighted_model, guide)
    before = {k: v.clone() for k, v in fitted.state_dict().items()}
    with pytest.raises(ValueError, match="one common scale per data point"):
        fitted.fit(
            (x, weights), epochs=1, batch_size=10, objective="iwae", num_particles=2, progress=False
        )
    assert all(torch.equal(before[k], v) for k, v in fitted.state_dict().items())
    history = fitted.fit((x, weights), (x, weights), epochs=2, batch_size=10, progress=False)
    assert np.isfinite(history.column("valid_elbo")).all()


def documents_model(x):
    with pyro.plate("documents", x.shape[0]):
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z.sum(-1, keepdim=True), NOISE).to_event(1), obs=x)


@pytest.mark.parametrize(
    "objective,compile", [("iwae", "none"), ("stl", "none"), ("trace_elbo", "graph")]
)
def test_data_plate_reaches_every_objective(float64, objective, compile):
    x = torch.randn(24, 1)
    guide = AmortizedGuide(documents_model, x[:3], data_plate="documents", hidden_sizes=(8,))
    fitted = LatentVariableModel(documents_model, guide, data_plate="documents")
    history = fitted.fit(
        x,
        x,
        epochs=1,
        batch_size=8,
        objective=objective,
        num_particles=2,
        compile=compile,
        progress=False,
    )
    assert np.isfinite(history.column("valid_elbo")).all()
    built = make_objective("iwae", 2, data_plate="documents")
    assert built.data_plate == "documents"


@pytest.mark.parametrize("autoguide", ["AutoNormal", "AutoDiagonalNormal", "AutoDelta"])
def test_pyros_whole_model_autoguides_are_refused_before_they_are_sized(float64, autoguide):
    from pyro.infer import autoguide as autoguides

    x = torch.randn(12, 1)
    guide = getattr(autoguides, autoguide)(documents_model)
    with pytest.raises(ValueError, match=f"Pyro's {autoguide}.*not amortized"):
        evaluate(documents_model, guide, x, num_samples=4, ks=(1,), data_plate="documents")
    fitted = LatentVariableModel(documents_model, guide, data_plate="documents")
    with pytest.raises(ValueError, match="not amortized"):
        fitted.fit(x, epochs=1, batch_size=4, progress=False)
    assert not list(guide.parameters())  # never called on a probe: nothing was sized


def test_model_and_guide_scaled_differently_are_refused(float64):
    x = torch.randn(8, 1)

    def guide(x):
        with pyro.plate("documents", x.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], 2), 1.0).to_event(1))

    with pytest.raises(ValueError, match="'z' is scaled differently in the model \\(0.5\\)"):
        evaluate(
            poutine.scale(documents_model, 0.5),
            guide,
            x,
            num_samples=4,
            ks=(1,),
            data_plate="documents",
        )


def test_deterministic_and_factor_sites_are_exact(float64):
    """A global pyro.deterministic carries no density; a factor adds its log term per point."""
    x = torch.randn(10, 1)

    def model(x):
        pyro.deterministic("noise", torch.tensor(NOISE))
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.deterministic("twice", 2 * z)
            pyro.factor("penalty", -0.5 * x[:, 0] ** 2)
            pyro.sample("x", dist.Normal(z[..., None], NOISE).to_event(1), obs=x)

    def guide(x):  # the exact posterior of z given x
        with pyro.plate("data", x.shape[0]):
            precision = 1 + 1 / NOISE**2
            pyro.sample("z", dist.Normal(x[:, 0] / NOISE**2 / precision, precision**-0.5))

    result = evaluate(model, guide, x, num_samples=3, ks=(1,), latent_diagnostics=False)
    exact = normal_log_density(x[:, 0], 1 + NOISE**2) - 0.5 * x[:, 0] ** 2
    np.testing.assert_allclose(result.per_datapoint["log_px"], exact.numpy(), rtol=1e-10)


def test_a_randomly_subsampled_inner_plate_keeps_the_vectorized_path(float64):
    """Each probe pass would draw its own subsample; the one-draw runs reuse the vectorized
    run's indices, so the comparison sees the same model."""
    x = torch.randn(6, 4)

    def model(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            with pyro.plate("features", 4, subsample_size=2, dim=-1) as index:
                pyro.sample("x", dist.Normal(z, 1.0), obs=x[:, index])

    def guide(x):
        with pyro.plate("data", x.shape[0], dim=-2):
            pyro.sample("z", dist.Normal(x.mean(-1, keepdim=True), 1.0))

    assert check_structure(model, guide, x).vectorized


def test_a_data_plate_subsampled_in_the_model_scales_the_amortized_guide_alike(float64):
    """The model declares N points and receives B of them; log q must be scaled by N / B as
    log p is, else the loss is wrong without an error (Pyro's Trace_ELBO included)."""
    x = torch.randn(12, 1)

    def model(x, index):
        with pyro.plate("data", 60, subsample=index):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z[..., None], NOISE).to_event(1), obs=x)

    index = torch.arange(12)
    guide = AmortizedGuide(model, x[:3], index[:3], hidden_sizes=(4,))
    trace = poutine.trace(guide).get_trace(x, index)
    assert trace.nodes["z"]["scale"] == pytest.approx(60 / 12)

    def unscaled_guide(x, index):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(x[:, 0], 1.0))

    with pytest.raises(ValueError, match="'z' is scaled differently"):
        check_structure(model, unscaled_guide, x, index)


def masked_by_input(x, keep):
    """The mask arrives as a bool input and goes straight to poutine.mask."""
    with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("time", x.shape[1], dim=-1):
        with poutine.mask(mask=keep):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(1.3 * z, NOISE), obs=x)


def test_a_bool_mask_input_keeps_its_dtype_and_ais_follows_a_dim_minus_two_plate(float64):
    from pyrovae.evaluation.ais import ais

    x, lengths, exact = padded_data(12)
    keep = torch.arange(4) < lengths[:, None]
    guide = AmortizedGuide(masked_by_input, x[:3], keep[:3], hidden_sizes=(8,))
    fitted = fitted_guide(masked_by_input, guide, x, keep)
    assert fitted.inputs(x, keep)[1].dtype == torch.bool
    result = ais(fitted.model, fitted.guide, x, keep, num_steps=20, num_chains=8, seed=0)
    difference = result.log_px - exact.numpy()
    assert abs(difference.mean()) < 4 * math.sqrt(float(np.sum(result.log_px_se**2))) / 12 + 0.02


class BatchNormGuide(torch.nn.Module):
    """A guide with BatchNorm1d in its encoder (batch statistics in training, running
    statistics in evaluation; the probes run in eval mode, so one or two rows are fine)."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(1, 8), torch.nn.BatchNorm1d(8), torch.nn.Tanh(), torch.nn.Linear(8, 4)
        )

    def forward(self, x):
        pyro.module("encoder", self.encoder)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("documents", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, F.softplus(raw) + 1e-3).to_event(1))


def test_a_batchnorm_guide_trains_and_evaluates(float64):
    torch.manual_seed(6)
    x = torch.randn(40, 1) * 2
    fitted = LatentVariableModel(documents_model, BatchNormGuide(), data_plate="documents")
    history = fitted.fit(x, x, epochs=3, batch_size=20, compile="none", progress=False)
    assert np.isfinite(history.column("valid_elbo")).all()
    result = fitted.evaluate(x, num_samples=50, ks=(1,), seed=0, latent_diagnostics=False)
    assert np.isfinite(result.per_datapoint["log_px"]).all()


TRANSITION = torch.nn.Linear(1, 1, bias=False)
with torch.no_grad():
    TRANSITION.weight.fill_(0.5)
TRANSITION.requires_grad_(False)


def markov_model(x, lengths):
    """A linear-Gaussian state-space model as a deep Markov model is written: a pyro.markov
    loop, a registered network, and steps past each sequence's length masked."""
    pyro.module("transition", TRANSITION.double())
    with pyro.plate("data", x.shape[0]):
        z = torch.zeros(x.shape[0], 1, dtype=x.dtype)
        for t in pyro.markov(range(x.shape[1])):
            with poutine.mask(mask=t < lengths):
                z = pyro.sample(f"z_{t}", dist.Normal(TRANSITION(z), 1.0).to_event(1))
                pyro.sample(f"x_{t}", dist.Normal(z, NOISE).to_event(1), obs=x[:, t])


def kalman_log_px(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Exact log p(x_{<length}) by the Kalman filter (a = 0.5, unit transition noise)."""
    totals = []
    for row, length in zip(x[:, :, 0], lengths, strict=True):
        mean, variance, total = 0.0, 0.0, 0.0
        for t in range(int(length)):
            mean, variance = 0.5 * mean, 0.25 * variance + 1.0  # predict z_t
            total += float(dist.Normal(mean, math.sqrt(variance + NOISE**2)).log_prob(row[t]))
            gain = variance / (variance + NOISE**2)
            mean, variance = mean + gain * (float(row[t]) - mean), (1 - gain) * variance
        totals.append(total)
    return torch.tensor(totals)


def test_a_deep_markov_model_with_padding_is_exact_under_is_and_ais(float64):
    from pyrovae.evaluation.ais import ais

    torch.manual_seed(7)
    x, lengths = torch.randn(30, 3, 1) * 1.5, torch.randint(1, 4, (30,))
    guide = AmortizedGuide(markov_model, x[:3], lengths[:3], hidden_sizes=(16,))
    fitted = fitted_guide(markov_model, guide, x, lengths, epochs=150)
    exact = kalman_log_px(x, lengths)
    result = fitted.evaluate(
        x, lengths, num_samples=2000, ks=(1,), seed=0, latent_diagnostics=False
    )
    assert_matches_exact(result, exact)
    annealed = ais(
        fitted.model, fitted.guide, x[:10], lengths[:10], num_steps=20, num_chains=8, seed=0
    )
    difference = annealed.log_px - exact[:10].numpy()
    se = math.sqrt(float(np.sum(annealed.log_px_se**2))) / 10
    assert abs(difference.mean()) < 4 * se + 0.02


def test_ais_refuses_code_written_for_one_draw_with_the_reason(float64):
    from pyrovae.evaluation.ais import ais

    x, y, _ = cvae_data(6)
    guide = AmortizedGuide(
        one_draw_cvae, x[:3], y[:3], hidden_sizes=(4,), encoder_input=encode_with_label
    )
    with pytest.raises(ValueError, match="AIS runs its chains in one vectorized plate"):
        ais(one_draw_cvae, guide, x, y, num_steps=2, num_chains=2)


def test_an_inner_plate_of_another_size_than_the_examples_is_one_clear_error(float64):
    def steps_model(x):  # one latent per column: the inner plate's size follows the data
        with pyro.plate("data", x.shape[0], dim=-2), pyro.plate("steps", x.shape[1], dim=-1):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, NOISE), obs=x)

    guide = AmortizedGuide(
        steps_model, torch.randn(3, 4), hidden_sizes=(4,), encoder_input=lambda x: x[:, :1]
    )
    with pytest.raises(ValueError, match="plate 'steps' around latent site 'z' has size 6"):
        poutine.trace(guide).get_trace(torch.randn(5, 6))


def test_a_model_that_subsamples_the_rows_it_is_given_is_refused_with_the_reason(float64):
    """Pyro's SVI idiom ``pyro.plate("data", len(x), subsample_size=B) as ind`` with
    ``obs=x[ind]``: per-datapoint estimators must see every row they pass, so every entry
    point refuses it, saying how to write it, before anything is created or trained."""
    x = torch.randn(200, 2)

    def model(x):
        with pyro.plate("data", len(x), subsample_size=50) as index:
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(z, NOISE).to_event(1), obs=x[index])

    def guide(x):
        shrink = pyro.param("shrink", torch.tensor(0.5))
        with pyro.plate("data", len(x), subsample_size=50) as index:
            pyro.sample("z", dist.Normal(shrink * x[index], 0.5).to_event(1))

    reason = r"subsample_size=50\)\) but was given \d+.*batch_size=50"
    with pytest.raises(ValueError, match=reason):
        AmortizedGuide(model, x[:4])
    fitted = LatentVariableModel(model, guide)
    with pytest.raises(ValueError, match=reason):
        fitted.fit((x,), epochs=1, batch_size=200, progress=False)
    assert "shrink" not in pyro.get_param_store()
    with pytest.raises(ValueError, match=reason):
        evaluate(model, guide, x, num_samples=4, ks=(1,), latent_diagnostics=False)
