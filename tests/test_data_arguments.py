"""Evaluation slices only the data (issue 14, item C).

When :func:`pyrovae.evaluation.importance.evaluate` and
:func:`pyrovae.evaluation.traces.particle_terms` split the data into chunks (``max_pairs``),
they slice

* every positional tensor argument: positional arguments are the model's per-datapoint
  data, each with one row per data point (one with another number of rows is refused);
* the keyword arguments named in ``data_kwargs``, and no other.

A keyword tensor argument with one row per data point whose role is not stated
(``data_kwargs`` omitted) is refused, so that a parameter that happens to have N rows is
never cut. Checked on a model with an exact posterior guide: every log weight is log p(x),
so the bounds equal the closed form exactly whatever the chunking.
"""

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch

from pyrovae.evaluation.importance import evaluate
from pyrovae.evaluation.traces import _slice_arguments, particle_terms

N = D = 4  # as many features as data points: the offset vector has N rows
K = 3


def model(x, offset):
    """z_n ~ N(0, 1); x_n | z_n ~ N(offset + z_n 1, I): offset is a parameter, not data."""
    with pyro.plate("data", x.shape[0]):
        z = pyro.sample("z", dist.Normal(x.new_zeros(()), 1.0))
        pyro.sample("x", dist.Normal(z.unsqueeze(-1) + offset, 1.0).to_event(1), obs=x)


def guide(x, offset):
    """The exact posterior N(sum_d (x_nd - offset_d) / (D + 1), 1 / (D + 1))."""
    with pyro.plate("data", x.shape[0]):
        loc = (x - offset).sum(-1) / (D + 1)
        pyro.sample("z", dist.Normal(loc, (D + 1) ** -0.5))


def covariate_model(x, shift):
    """As ``model`` with offset 0 and a per-datapoint shift: x_n ~ N(shift_n + z_n, I)."""
    model(x, shift.unsqueeze(-1))


def covariate_guide(x, shift):
    guide(x, shift.unsqueeze(-1))


def exact_log_px(x, offset):
    covariance = torch.eye(D, dtype=x.dtype) + torch.ones(D, D, dtype=x.dtype)
    return dist.MultivariateNormal(offset, covariance).log_prob(x)


@pytest.fixture
def data(float64):
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(N, D, generator=generator, dtype=torch.float64) * 2
    offset = torch.tensor([4.0, -4.0, 1.0, 0.5])
    return x, offset


def test_a_parameter_with_n_rows_is_never_cut(data):
    """One data point per chunk (max_pairs = K): the offset stays whole, so every bound is
    log p(x) exactly; the old rule sliced it to one entry, broadcast over the features."""
    x, offset = data
    expected = exact_log_px(x, offset).numpy()
    result = evaluate(
        model, guide, x, offset=offset, data_kwargs=(), num_samples=K, ks=(1,), max_pairs=K, seed=0
    )
    for column in ("log_px", "elbo", "iwae_1"):
        np.testing.assert_allclose(result.per_datapoint[column], expected, rtol=1e-12)
    terms = particle_terms(
        model, guide, x, offset=offset, data_kwargs=(), num_particles=K, max_pairs=K
    )
    np.testing.assert_allclose(
        terms.log_weights.numpy(), np.broadcast_to(expected, (K, N)), rtol=1e-12
    )
    # What cutting the offset gives (the old rule; here by declaring it data): one entry per
    # chunk, broadcast over the features without an error, off by many nats.
    cut = evaluate(
        model,
        guide,
        x,
        offset=offset,
        data_kwargs=("offset",),
        num_samples=K,
        ks=(1,),
        max_pairs=K,
        seed=0,
        latent_diagnostics=False,
    )
    assert np.abs(cut.per_datapoint["log_px"] - expected).max() > 5


def test_an_unstated_keyword_tensor_with_n_rows_is_refused(data):
    x, offset = data
    pattern = r"keyword argument 'offset' has 4 rows.*data_kwargs=\('offset',\).*data_kwargs=\(\)"
    with pytest.raises(ValueError, match=pattern):
        evaluate(model, guide, x, offset=offset, num_samples=K, ks=(1,), max_pairs=K)
    with pytest.raises(ValueError, match=pattern):
        particle_terms(model, guide, x, offset=offset, num_particles=K)
    # a keyword tensor with another number of rows is unambiguous: passed whole
    terms = particle_terms(
        lambda x, offset: model(x, offset[:D]),
        lambda x, offset: guide(x, offset[:D]),
        x,
        offset=torch.cat([offset, offset]),
        num_particles=K,
        max_pairs=K,
    )
    np.testing.assert_allclose(
        terms.log_weights[0].numpy(), exact_log_px(x, offset).numpy(), rtol=1e-12
    )


def test_named_keyword_data_are_sliced_like_positional_data(data):
    x, _ = data
    shift = torch.tensor([0.5, -1.0, 2.0, 0.0])
    expected = exact_log_px(x, shift.unsqueeze(-1).expand(N, D)).numpy()
    keyword = evaluate(
        covariate_model,
        covariate_guide,
        x,
        shift=shift,
        data_kwargs=("shift",),
        num_samples=K,
        ks=(1,),
        max_pairs=K,
        seed=0,
    )
    positional = evaluate(
        covariate_model, covariate_guide, x, shift, num_samples=K, ks=(1,), max_pairs=K, seed=0
    )
    for result in (keyword, positional):
        np.testing.assert_allclose(result.per_datapoint["log_px"], expected, rtol=1e-12)
    assert set(keyword.latent) == {"z"}  # the latent diagnostics slice the same arguments


def test_positional_arguments_must_be_per_datapoint_data(data):
    x, offset = data
    with pytest.raises(ValueError, match=r"positional argument 1 has 5 rows.*data has 4.*keyword"):
        evaluate(model, guide, x, torch.ones(5), num_samples=K, ks=(1,))
    with pytest.raises(ValueError, match="data_kwargs names 'missing'"):
        particle_terms(model, guide, x, offset=offset, data_kwargs=("missing",), num_particles=K)


def test_slice_arguments_cuts_only_the_data():
    x, w, y = torch.zeros(5, 2), torch.ones(5, 3), torch.arange(5.0)
    args, kwargs = _slice_arguments((x, 7), {"w": w, "y": y}, 5, slice(1, 3), data_kwargs=("y",))
    assert args[0].shape == (2, 2) and args[1] == 7
    assert kwargs["w"] is w and torch.equal(kwargs["y"], y[1:3])
    assert math.isfinite(float(kwargs["y"].sum()))
