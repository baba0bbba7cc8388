"""The objectives are Pyro ELBOs in full (issue 14, items 3-4).

* Constructors take Pyro's ELBO keyword arguments; ``max_plate_nesting=float("inf")``
  (Pyro's default) is guessed, also for models without tensor arguments;
  ``loss_and_grads`` with nothing trainable returns the loss, as Pyro's ELBOs do; models
  without latent sites reduce every bound to log p(x).
* Scales: ``poutine.scale`` and every plate's subsample scale are honoured. For a data point
  n with draws k the log weight is log w_kn = sum over sites of (scale of the plates other
  than the data plate) x (log density summed inside the data point); the bound of data
  point n is a function of (log w_kn)_k, and the loss is minus the bound summed over the
  batch times the common factor (poutine.scale) x (data-plate subsampling scale).
* Checked against Pyro's ``Trace_ELBO`` / ``TraceMeanField_ELBO`` on the same draws (same
  seed, same particle plate), against closed-form log densities written out here (values
  and, through autograd of the closed form at the same noise, per-sample gradients), and
  through the compiled step.

Everything runs in float64 with fixed seeds; deterministic identities use EXACT = 1e-10
relative (far above float64 rounding, far below any modelling difference).
"""

import contextlib
import copy
import math
import signal
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from torch import nn

from pyrovae.compiled import CompiledStep
from pyrovae.objectives import (
    IWAE,
    STLELBO,
    AnnealedMeanFieldELBO,
    DReGIWAE,
    MonteCarloELBO,
    RenyiBound,
    make_objective,
)

EXACT = 1e-10
N_TOTAL, F_TOTAL = 6, 4  # data points and features of the full data set
DATA_INDEX = torch.tensor([0, 2, 5])  # data plate subsampled 6 -> 3 (scale 2)
FEATURE_INDEX = torch.tensor([1, 3])  # inner plate subsampled 4 -> 2 (scale 2)
K = 3

CLASSES = {
    "montecarlo": MonteCarloELBO,
    "iwae": IWAE,
    "renyi": lambda **kw: RenyiBound(0.5, **kw),
    "stl": STLELBO,
    "dreg": DReGIWAE,
    "annealed": AnnealedMeanFieldELBO,
}
LINEAR = {"montecarlo", "stl", "annealed"}


def close(actual, expected, rtol: float = EXACT) -> None:
    actual, expected = torch.as_tensor(actual).double(), torch.as_tensor(expected).double()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol)


# ---------------------------------------------------------------------- the test problem


def log_normal(value, loc, scale):
    """log N(value; loc, scale^2), written out (nats)."""
    return -0.5 * ((value - loc) / scale) ** 2 - torch.log(scale) - 0.5 * math.log(2 * math.pi)


class Params(nn.Module):
    """Named scalar parameters (float64)."""

    def __init__(self, **values):
        super().__init__()
        for name, value in values.items():
            setattr(self, name, nn.Parameter(torch.tensor(value, dtype=torch.float64)))


class PlatedModel(Params):
    """z_n ~ N(0, 1); u_fn | z_n ~ N(a z_n, 1); y_fn | u_fn ~ N(u_fn + b, sigma^2), in a data
    plate (dim -1) and a feature plate inside it (dim -2), either or both subsampled.

    ``site_scales`` multiplies named sites' log densities (poutine.scale around those sites
    alone, e.g. a tempered likelihood); ``scale`` wraps the whole program."""

    def __init__(self, scale=1.0, site_scales=None):
        super().__init__(a=0.7, b=-0.3, log_sigma=-0.2)
        self.scale, self.site_scales = scale, site_scales or {}

    def site_scale(self, name):
        return poutine.scale(scale=self.site_scales.get(name, 1.0))

    def forward(self, x, data_index, feature_index):
        y = x[data_index][:, feature_index].T  # (features, points)
        with poutine.scale(scale=self.scale):
            with pyro.plate("data", x.shape[0], subsample=data_index, dim=-1):
                with self.site_scale("z"):
                    z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
                with pyro.plate("features", x.shape[1], subsample=feature_index, dim=-2):
                    with self.site_scale("u"):
                        u = pyro.sample("u", dist.Normal(self.a * z, 1.0))
                    with self.site_scale("y"):
                        sigma = self.log_sigma.exp()
                        pyro.sample("y", dist.Normal(u + self.b, sigma), obs=y)


class PlatedGuide(Params):
    """q(z_n | y) = N(c mean_f y_fn + d, s_z^2); q(u_fn | z_n, y) = N(e z_n + g y_fn, s_u^2):
    the two guide sites depend on each other."""

    def __init__(self, scale=1.0, site_scales=None):
        super().__init__(c=0.4, d=0.1, log_sz=-0.5, e=0.5, g=0.3, log_su=-0.4)
        self.scale, self.site_scales = scale, site_scales or {}

    def forward(self, x, data_index, feature_index):
        y = x[data_index][:, feature_index].T
        with poutine.scale(scale=self.scale):
            with pyro.plate("data", x.shape[0], subsample=data_index, dim=-1):
                with poutine.scale(scale=self.site_scales.get("z", 1.0)):
                    loc = self.c * y.mean(0) + self.d
                    z = pyro.sample("z", dist.Normal(loc, self.log_sz.exp()))
                with pyro.plate("features", x.shape[1], subsample=feature_index, dim=-2):
                    with poutine.scale(scale=self.site_scales.get("u", 1.0)):
                        loc = self.e * z + self.g * y
                        pyro.sample("u", dist.Normal(loc, self.log_su.exp()))


CASES = {
    # name: (poutine scale, data-plate index, feature-plate index)
    "poutine_scale": (0.1, torch.arange(N_TOTAL), torch.arange(F_TOTAL)),
    "inner_subsample": (1.0, torch.arange(N_TOTAL), FEATURE_INDEX),
    "all_three": (0.1, DATA_INDEX, FEATURE_INDEX),
}


def problem(case: str):
    scale, data_index, feature_index = CASES[case]
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(N_TOTAL, F_TOTAL, generator=generator, dtype=torch.float64)
    return PlatedModel(scale), PlatedGuide(scale), (x, data_index, feature_index)


def outer_and_inner(case: str) -> tuple[float, float]:
    """(poutine scale x data-plate scale, feature-plate scale) of a case."""
    scale, data_index, feature_index = CASES[case]
    return scale * N_TOTAL / len(data_index), F_TOTAL / len(feature_index)


def draws(guide, args, num_particles: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The guide's draws z (K, 1, B) and u (K, F_sub, B) after ``pyro.set_rng_seed(seed)``,
    with K particles in a plate left of the model's two (as Pyro's vectorized particles)."""
    pyro.set_rng_seed(seed)
    with torch.no_grad(), pyro.plate("particles", num_particles, dim=-3):
        trace = poutine.trace(guide).get_trace(*args)
    return trace.nodes["z"]["value"], trace.nodes["u"]["value"]


def hand_log_weights(model, guide, args, z, u, inner, q_guide=None):
    """Closed-form log w_kb = log p(z) - log q(z) + inner x sum_f [log p(u|z) + log p(y|u)
    - log q(u|z)], shape (K, B), with the draws written as z = loc_z + s_z eps_z and
    u = loc_u(z) + s_u eps_u in the parameters of ``guide`` (so autograd gives the
    reparameterized gradients) and log q taken with the parameters of ``q_guide`` (default:
    ``guide``; a detached copy removes the score term)."""
    q_guide = guide if q_guide is None else q_guide
    x, data_index, feature_index = args
    y = x[data_index][:, feature_index].T
    mean_y = y.mean(0)

    def z_loc(g):
        return g.c * mean_y + g.d

    def u_loc(g, z):
        return g.e * z + g.g * y

    with torch.no_grad():
        eps_z = (z - z_loc(guide)) / guide.log_sz.exp()
        eps_u = (u - u_loc(guide, z)) / guide.log_su.exp()
    z = z_loc(guide) + guide.log_sz.exp() * eps_z
    u = u_loc(guide, z) + guide.log_su.exp() * eps_u
    one = torch.ones((), dtype=torch.float64)
    log_p_z = log_normal(z, 0.0 * one, one)
    log_p_u = log_normal(u, model.a * z, one)
    log_p_y = log_normal(y, u + model.b, model.log_sigma.exp())
    log_q_z = log_normal(z, z_loc(q_guide), q_guide.log_sz.exp())
    log_q_u = log_normal(u, u_loc(q_guide, z), q_guide.log_su.exp())
    inner_terms = (log_p_u + log_p_y - log_q_u).sum(-2, keepdim=True)
    return (log_p_z - log_q_z + inner * inner_terms).squeeze(-2)


def iwae_bound(log_w):
    return torch.logsumexp(log_w, 0) - math.log(log_w.shape[0])


def seeded(objective, model, guide, args, seed):
    pyro.set_rng_seed(seed)
    return objective.differentiable_loss(model, guide, *args)


def gradients(loss, modules):
    params = [p for module in modules for p in module.parameters()]
    return torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)


def assert_same_gradients(ours, theirs):
    for mine, reference in zip(ours, theirs, strict=True):
        close(mine, reference)


# ------------------------------------------------------------ 1. constructors like Pyro's


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_constructors_take_pyros_elbo_keywords(name):
    make = CLASSES[name]
    objective = make(
        num_particles=2,
        max_plate_nesting=2,
        vectorize_particles=True,
        strict_enumeration_warning=False,
        ignore_jit_warnings=True,
        jit_options={"check_trace": False},
        retain_graph=True,
    )
    assert objective.num_particles == 2 and objective.max_plate_nesting == 2
    assert objective.retain_graph is True and objective.vectorize_particles is True
    assert objective.strict_enumeration_warning is False and objective.ignore_jit_warnings
    with pytest.warns(DeprecationWarning, match="max_iarange_nesting is deprecated"):
        assert make(max_iarange_nesting=3).max_plate_nesting == 3
    # Pyro's meaning: False draws the particles one per pass (programs written for one draw).
    assert make(num_particles=1, vectorize_particles=False).vectorize_particles is False
    assert make(num_particles=2, vectorize_particles=False).vectorize_particles is False
    with pytest.raises(ValueError, match="vectorize_particles must be True, False or None"):
        make(num_particles=2, vectorize_particles="yes")
    with pytest.raises(ValueError, match="tail_adaptive_beta.*TraceTailAdaptive_ELBO"):
        make(tail_adaptive_beta=-0.5)
    for bad in (-1, 1.5, "2"):
        with pytest.raises(ValueError, match="max_plate_nesting must be"):
            make(max_plate_nesting=bad)


@contextlib.contextmanager
def time_limit(seconds: int):
    """Fail instead of hanging (SIGALRM; the tests run on Linux)."""

    def expire(*_):
        raise TimeoutError(f"did not finish within {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_infinite_max_plate_nesting_is_guessed(name, float64):
    """Pyro's default max_plate_nesting=float('inf') means 'guess it' (it used to hang)."""
    model, guide, args = problem("inner_subsample")
    guessed = CLASSES[name](num_particles=K, max_plate_nesting=float("inf"))
    given = CLASSES[name](num_particles=K, max_plate_nesting=2)
    with time_limit(60):
        close(seeded(guessed, model, guide, args, 4), seeded(given, model, guide, args, 4))
    assert guessed.max_plate_nesting == float("inf")  # the setting; the guess is cached apart


def int_model(n: int):
    with pyro.plate("data", n):
        z = pyro.sample("z", dist.Normal(torch.zeros(n), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=torch.linspace(-1.0, 1.0, n))


def int_guide(n: int):
    loc = pyro.param("loc", torch.zeros(n))
    with pyro.plate("data", n):
        pyro.sample("z", dist.Normal(loc, 0.8))


def no_argument_model():
    int_model(3)


def no_argument_guide():
    int_guide(3)


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_nesting_is_guessed_for_models_without_tensor_arguments(name, float64):
    for model, guide, args in (
        (int_model, int_guide, (3,)),
        (no_argument_model, no_argument_guide, ()),
    ):
        objective = CLASSES[name](num_particles=K)
        value = objective.loss(model, guide, *args)
        assert math.isfinite(value)
        assert objective._nesting == 1


def fixed_model(x):
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
        pyro.sample("x", dist.Normal(z, 1.0), obs=x)


def fixed_guide(x):
    with pyro.plate("data", x.shape[0]):
        pyro.sample("z", dist.Normal(x / 2, 0.7))


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_loss_and_grads_without_trainable_parameters_returns_the_loss(name, float64):
    """Pyro's ELBOs skip the backward pass when nothing is trainable and return the loss;
    so do ours (a NaN loss warns, through Pyro's warn_if_nan)."""
    x = torch.tensor([0.3, -1.2, 0.8])
    objective = CLASSES[name](num_particles=K, max_plate_nesting=1)
    pyro.set_rng_seed(1)
    value = objective.loss_and_grads(fixed_model, fixed_guide, x)
    pyro.set_rng_seed(1)
    assert isinstance(value, float) and value == pytest.approx(
        objective.loss(fixed_model, fixed_guide, x), rel=EXACT
    )
    if name in LINEAR:  # one particle of the ELBO: Pyro's own loss_and_grads on the same draw
        single = CLASSES[name](num_particles=1, max_plate_nesting=1)
        pyro.set_rng_seed(1)
        ours = single.loss_and_grads(fixed_model, fixed_guide, x)
        pyro.set_rng_seed(1)
        pyros = pyro.infer.TraceMeanField_ELBO if name == "annealed" else pyro.infer.Trace_ELBO
        theirs = pyros(max_plate_nesting=1).loss_and_grads(fixed_model, fixed_guide, x)
        assert ours == pytest.approx(theirs, rel=EXACT)
    with pyro.validation_enabled(False), pytest.warns(UserWarning, match="Encountered NaN"):
        objective.loss_and_grads(fixed_model, fixed_guide, torch.tensor([0.3, math.nan]))


def observed_only_model(x):
    loc = pyro.param("loc", torch.tensor(0.2))
    with pyro.plate("data", x.shape[0]):
        pyro.sample("x", dist.Normal(loc, 1.5), obs=x)


def empty_guide(x):
    pass


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_models_without_latent_sites_reduce_to_log_px(name, float64):
    """No latent site: every bound is log p(x) exactly, and the gradient is its gradient."""
    x = torch.tensor([0.3, -1.2, 0.8, 2.0])
    loss = CLASSES[name](num_particles=K, max_plate_nesting=1).differentiable_loss(
        observed_only_model, empty_guide, x
    )
    loc = pyro.param("loc")
    expected = -log_normal(x, loc, torch.tensor(1.5)).sum()
    close(loss, expected)
    close(torch.autograd.grad(loss, loc)[0], torch.autograd.grad(expected, loc)[0])


# ------------------------------------------------ 2. scales: against Pyro and closed forms


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("name", sorted(CLASSES))
def test_one_particle_loss_equals_pyros_trace_elbo(case, name, float64):
    """With one particle every objective's value is the ELBO: minus Pyro's Trace_ELBO loss on
    the same draw, with poutine.scale and subsampled plates (it was off by the scale)."""
    model, guide, args = problem(case)
    ours = seeded(CLASSES[name](num_particles=1, max_plate_nesting=2), model, guide, args, 7)
    reference = pyro.infer.Trace_ELBO(max_plate_nesting=2)
    if name == "annealed":
        reference = pyro.infer.TraceMeanField_ELBO(max_plate_nesting=2)
    theirs = seeded(reference, model, guide, args, 7)
    close(ours, theirs)


@pytest.mark.parametrize("case", sorted(CASES))
def test_elbo_values_and_gradients_equal_pyros_on_the_same_draws(case, float64):
    """K vectorized particles: MonteCarloELBO is Trace_ELBO and the annealed objective
    (beta = 1) is TraceMeanField_ELBO, value and every gradient; STL has the ELBO's value."""
    model, guide, args = problem(case)
    pairs = [
        (MonteCarloELBO, pyro.infer.Trace_ELBO, True),
        (AnnealedMeanFieldELBO, pyro.infer.TraceMeanField_ELBO, True),
        (STLELBO, pyro.infer.Trace_ELBO, False),
    ]
    for ours_class, pyros_class, same_gradient in pairs:
        ours = seeded(ours_class(num_particles=K, max_plate_nesting=2), model, guide, args, 8)
        pyros = pyros_class(num_particles=K, vectorize_particles=True, max_plate_nesting=2)
        theirs = seeded(pyros, model, guide, args, 8)
        close(ours, theirs)
        if same_gradient:
            assert_same_gradients(
                gradients(ours, (model, guide)), gradients(theirs, (model, guide))
            )


def renyi_bound(log_w, alpha=0.5):
    return iwae_bound((1 - alpha) * log_w) / (1 - alpha)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bounds_and_gradients_equal_the_closed_form_per_data_point(case, float64):
    """loss = -outer x sum_b bound_b((log w_kb)_k) with log w from the closed form: the
    feature plate's scale inside log w, poutine.scale and the data plate's scale outside the
    log-sum-exp. Gradients: autograd of the closed form at the same noise (IWAE, Rényi,
    ELBO), and for STL and DReG the same with log q's parameters detached and, for DReG,
    the guide's per-draw weights squared (w~_k^2) and the model's not (w~_k)."""
    model, guide, args = problem(case)
    outer, inner = outer_and_inner(case)
    z, u = draws(guide, args, K, seed=9)
    frozen = copy.deepcopy(guide).requires_grad_(False)  # log q with detached parameters
    log_w = hand_log_weights(model, guide, args, z, u, inner)
    stl_log_w = hand_log_weights(model, guide, args, z, u, inner, q_guide=frozen)
    assert float(log_w.detach().std(0).min()) > 0.05  # the draws differ: not trivial
    references = {
        "montecarlo": -outer * log_w.mean(0).sum(),
        "iwae": -outer * iwae_bound(log_w).sum(),
        "renyi": -outer * renyi_bound(log_w).sum(),
        "stl": -outer * stl_log_w.mean(0).sum(),
    }
    for name, expected in references.items():
        loss = seeded(CLASSES[name](num_particles=K, max_plate_nesting=2), model, guide, args, 9)
        close(loss, expected)
        assert_same_gradients(gradients(loss, (model, guide)), gradients(expected, (model, guide)))
    # DReG: value IWAE_K; model gradient sum_k w~_k d log w_k, guide sum_k w~_k^2 d log w_k^STL
    loss = seeded(DReGIWAE(num_particles=K, max_plate_nesting=2), model, guide, args, 9)
    close(loss, references["iwae"])
    normalized = torch.softmax(log_w.detach(), 0)
    model_part = -outer * (normalized * log_w).sum()
    guide_part = -outer * (normalized**2 * stl_log_w).sum()
    assert_same_gradients(gradients(loss, (model,)), gradients(model_part, (model,)))
    assert_same_gradients(gradients(loss, (guide,)), gradients(guide_part, (guide,)))


def test_site_specific_scales_linear_objectives_follow_pyro_others_refuse(float64):
    """poutine.scale around some sites only (a tempered likelihood): the ELBO-type objectives
    are linear in the site terms and equal Pyro's Trace_ELBO / TraceMeanField_ELBO; the
    bounds with a log-sum-exp over draws need one common scale per data point and refuse."""
    site_scales = {"y": 0.25, "u": 0.5}
    model, guide = PlatedModel(site_scales=site_scales), PlatedGuide(site_scales=site_scales)
    _, _, args = problem("inner_subsample")
    for ours_class, pyros_class in (
        (MonteCarloELBO, pyro.infer.Trace_ELBO),
        (STLELBO, pyro.infer.Trace_ELBO),
        (AnnealedMeanFieldELBO, pyro.infer.TraceMeanField_ELBO),
    ):
        ours = seeded(ours_class(num_particles=K, max_plate_nesting=2), model, guide, args, 2)
        pyros = pyros_class(num_particles=K, vectorize_particles=True, max_plate_nesting=2)
        close(ours, seeded(pyros, model, guide, args, 2))
    for name in ("iwae", "renyi", "dreg"):
        with pytest.raises(ValueError, match="one common scale"):
            seeded(CLASSES[name](num_particles=K, max_plate_nesting=2), model, guide, args, 2)


# ----------------------------------------------------------------- 3. the compiled step


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize(
    "name, pyros_class",
    [
        ("trace_elbo", pyro.infer.Trace_ELBO),
        ("trace_meanfield_elbo", pyro.infer.TraceMeanField_ELBO),
    ],
)
def test_compiled_step_equals_pyros_elbo_under_scales(case, name, pyros_class, float64):
    """compile='graph' swaps Pyro's ELBO for its traceable equivalent: the compiled loss and
    gradients equal Pyro's eager Trace_ELBO / TraceMeanField_ELBO on the same draws."""
    model, guide, args = problem(case)
    objective = make_objective(name, K, max_plate_nesting=2, traceable=True)
    compiled = CompiledStep(objective(model, guide))
    pyros = pyros_class(num_particles=K, vectorize_particles=True, max_plate_nesting=2)
    for seed in (1, 2):  # the second call replays the cached graph
        pyro.set_rng_seed(seed)
        loss = compiled(*args)
        grads = [p.grad.clone() for p in compiled.parameters]
        theirs = seeded(pyros, model, guide, args, seed)
        count = args[0].shape[0]  # the compiled step's loss is per row of its first argument
        expected = torch.autograd.grad(theirs / count, list(compiled.parameters))
        close(loss * count, theirs)
        assert_same_gradients(grads, expected)


def test_make_objective_guesses_the_nesting_when_asked(float64):
    model, guide, args = problem("inner_subsample")
    for name in ("iwae", "trace_elbo"):
        objective = make_objective(name, K, max_plate_nesting=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert math.isfinite(objective.loss(model, guide, *args))


@pytest.mark.slow
def test_inductor_step_equals_pyros_trace_elbo_under_scales(float64):
    """The same through torch.compile (inductor; random draws from torch's generator):
    equal to Pyro's eager Trace_ELBO up to the reordering of float64 sums."""
    import torch._inductor.config

    model, guide, args = problem("all_three")
    objective = make_objective("trace_elbo", K, max_plate_nesting=2, traceable=True)
    with torch._inductor.config.patch(fallback_random=True):
        compiled = CompiledStep(objective(model, guide), backend="inductor")
        pyro.set_rng_seed(3)
        loss = compiled(*args)
    grads = [p.grad.clone() for p in compiled.parameters]
    pyros = pyro.infer.Trace_ELBO(num_particles=K, vectorize_particles=True, max_plate_nesting=2)
    theirs = seeded(pyros, model, guide, args, 3)
    count = args[0].shape[0]
    expected = torch.autograd.grad(theirs / count, list(compiled.parameters))
    close(loss * count, theirs, rtol=1e-8)
    for mine, reference in zip(grads, expected, strict=True):
        close(mine, reference, rtol=1e-8)


def test_tensor_scales(float64):
    """poutine.scale with a 0-dim tensor is a common scale like a number; a tensor with one
    entry per data point is a site-wise weight: the ELBO objectives follow Trace_ELBO, the
    log-sum-exp bounds refuse it."""
    _, _, args = problem("inner_subsample")
    for scale in (torch.tensor(0.1), torch.tensor([0.5, 1.0, 2.0, 1.5, 0.2, 3.0])):
        model, guide = PlatedModel(scale), PlatedGuide(scale)
        pyros = pyro.infer.Trace_ELBO(
            num_particles=K, vectorize_particles=True, max_plate_nesting=2
        )
        theirs = seeded(pyros, model, guide, args, 6)
        for name in sorted(CLASSES):
            objective = CLASSES[name](
                num_particles=1 if name not in LINEAR else K, max_plate_nesting=2
            )
            if scale.dim() and name not in LINEAR:
                with pytest.raises(ValueError, match=r"tensor of shape \(6,\).*one common scale"):
                    seeded(objective, model, guide, args, 6)
            elif name in LINEAR and name != "annealed":
                close(seeded(objective, model, guide, args, 6), theirs)
            elif name != "annealed":  # one particle: the ELBO of the first of Pyro's draws
                single = pyro.infer.Trace_ELBO(max_plate_nesting=2)
                close(
                    seeded(objective, model, guide, args, 6), seeded(single, model, guide, args, 6)
                )


def test_evaluation_terms_are_per_data_point_whatever_the_common_scale(float64):
    """particle_terms (evaluation) applies the inner plates' scales and leaves the common
    factor out: poutine.scale does not change per-datapoint bounds; site-specific scales are
    refused (no per-datapoint log p(x) exists for a tempered model)."""
    from pyrovae.evaluation.traces import particle_terms

    _, _, args = problem("inner_subsample")
    x, data_index, feature_index = args
    results = []
    for scale in (1.0, 0.1):
        model, guide = PlatedModel(scale), PlatedGuide(scale)
        pyro.set_rng_seed(4)
        indices = {"data_index": data_index, "feature_index": feature_index}
        results.append(
            particle_terms(
                model, guide, x, num_particles=K, max_plate_nesting=2, data_kwargs=(), **indices
            )
        )
    close(results[0].log_weights, results[1].log_weights)
    z, u = draws(PlatedGuide(), args, K, seed=4)
    with torch.no_grad():
        expected = hand_log_weights(PlatedModel(), PlatedGuide(), args, z, u, inner=2.0)
    close(results[0].log_weights, expected)
    tempered = PlatedModel(site_scales={"y": 0.5})
    with pytest.raises(ValueError, match="one common scale"):
        particle_terms(
            tempered,
            PlatedGuide(),
            x,
            num_particles=K,
            max_plate_nesting=2,
            data_kwargs=(),
            **indices,
        )
