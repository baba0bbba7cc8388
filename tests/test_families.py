"""Model families of the declarative spec: priors, guides, networks, conditional and two-layer
VAEs; closed-form KLs; spec files; plate diagrams; invalid combinations."""

import shutil

import numpy as np
import pytest
import torch
from torch.distributions import kl_divergence

from pyrovae import VAE, VAEConfig
from pyrovae.data import load_digits, threshold
from pyrovae.posteriors import POSTERIORS
from pyrovae.priors import PRIORS
from pyrovae.spec import load_spec, render, save_spec

FAMILIES = (
    [{"prior": name} for name in PRIORS]
    + [{"guide": name} for name in POSTERIORS if name != "diagonal"]
    + [{"network": "conv", "image_shape": (8, 8)}, {"top_latent_dim": 2}]
)


@pytest.fixture(scope="module")
def digits():
    return load_digits()


@pytest.mark.parametrize("options", FAMILIES, ids=lambda o: "-".join(map(str, o.values())))
def test_each_family_trains_and_its_bounds_are_ordered(digits, options):
    vae = VAE(num_features=64, latent_dim=3, hidden_sizes=(32,), seed=0, **options)
    valid = threshold(digits.valid)
    before = vae.elbo(valid, num_samples=10, seed=1)
    vae.fit(
        digits.train,
        digits.valid,
        binarize="dynamic",
        epochs=4,
        batch_size=64,
        seed=0,
        progress=False,
    )
    after = vae.elbo(valid, num_samples=10, seed=1)
    difference = (after - before).numpy()
    assert difference.mean() > 5 * difference.std(ddof=1) / np.sqrt(len(difference))

    result = vae.evaluate(threshold(digits.test), num_samples=100, ks=(1, 10), seed=0)
    columns = result.per_datapoint
    for lower, upper in (("elbo", "iwae_10"), ("iwae_10", "log_px")):
        gap = columns[upper] - columns[lower]
        assert gap.mean() > -4 * gap.std(ddof=1) / np.sqrt(len(gap)), (lower, upper)
    assert all(np.isfinite(v).all() for v in columns.values() if v.dtype.kind == "f")
    means, draws = vae.sample(5, seed=0)
    assert means.shape == draws.shape == (5, 64)
    loc, scale = vae.encode(valid[:7])
    assert loc.shape == scale.shape == (7, 3) and bool((scale > 0).all())


@pytest.mark.parametrize("guide", ["full", "low-rank"])
def test_closed_form_kl_of_correlated_guides_matches_monte_carlo(float64, guide):
    vae = VAE(num_features=64, latent_dim=3, hidden_sizes=(16,), guide=guide, seed=0).double()
    x = torch.rand(5, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    q = vae.guide.posterior(x)
    prior = vae.model.prior(x)
    exact = kl_divergence(q, prior)
    torch.manual_seed(0)
    draws = q.sample((200_000,))
    log_ratio = q.log_prob(draws) - prior.log_prob(draws)
    error = log_ratio.std(0) / np.sqrt(draws.shape[0])
    assert bool(((exact - log_ratio.mean(0)).abs() < 4 * error).all())
    # the lecture notes' closed form for a full covariance against N(0, I)
    covariance = q.covariance_matrix
    by_hand = 0.5 * (
        covariance.diagonal(dim1=-2, dim2=-1).sum(-1)
        + q.loc.square().sum(-1)
        - 3
        - torch.logdet(covariance)
    )
    torch.testing.assert_close(exact, by_hand, rtol=1e-10, atol=1e-10)


def test_analytic_objectives_refuse_families_without_closed_form_kl(digits):
    for options, missing in (
        ({"guide": "flow"}, "guide 'flow'"),
        ({"prior": "vamp"}, "prior 'vamp'"),
    ):
        vae = VAE(num_features=64, latent_dim=3, hidden_sizes=(16,), seed=0, **options)
        state = {k: v.clone() for k, v in vae.state_dict().items()}
        with pytest.raises(ValueError, match=rf"closed form, which the {missing}.*'trace_elbo'"):
            vae.fit(
                digits.train,
                objective="trace_meanfield_elbo",
                binarize="dynamic",
                epochs=1,
                progress=False,
            )
        assert all(torch.equal(v, state[k]) for k, v in vae.state_dict().items())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"prior": "vamp", "guide": "flow"}, "the VampPrior is a mixture of the guide's"),
        ({"network": "conv"}, "network 'conv' needs image_shape"),
        ({"guide": "low-rank", "guide_rank": 3}, "guide_rank 3 must be below latent_dim 3"),
        ({"top_latent_dim": 2, "guide": "full"}, "support guide 'diagonal' only, not 'full'"),
        ({"prior": "gaussian"}, "unknown prior 'gaussian'; valid names: learned-normal, mixture"),
    ],
)
def test_invalid_specifications_say_what_to_change(options, message):
    with pytest.raises(ValueError, match=message):
        VAEConfig(num_features=64, latent_dim=3, **options)


@pytest.mark.parametrize("suffix", [".json", ".toml", ".yaml"])
def test_spec_files_round_trip(tmp_path, suffix):
    config = VAEConfig(
        num_features=64,
        latent_dim=3,
        image_shape=(8, 8),
        prior="mixture",
        guide="low-rank",
        network="conv",
        top_hidden_sizes=(50,),
    )
    path = save_spec(config, tmp_path / f"model{suffix}")
    assert load_spec(path) == config
    path.write_text(path.read_text().replace("latent_dim", "latnet_dim"))
    with pytest.raises(ValueError, match="unknown VAEConfig option.*'latnet_dim'"):
        load_spec(path)
    with pytest.raises(ValueError, match="unknown spec format '.ini'"):
        save_spec(config, tmp_path / "model.ini")


def test_conditional_vae_generates_the_requested_label(digits):
    one_hot = torch.nn.functional.one_hot
    vae = VAE(num_features=64, latent_dim=2, hidden_sizes=(64,), condition_dim=10, seed=0)
    vae.fit(
        (digits.train, one_hot(digits.train_labels, 10).float()),
        (digits.valid, one_hot(digits.valid_labels, 10).float()),
        binarize="dynamic",
        epochs=15,
        batch_size=64,
        seed=0,
        progress=False,
    )
    # Decoded means per requested label are closest to that label's average test image.
    templates = torch.stack([digits.test[digits.test_labels == k].mean(0) for k in range(10)])
    means, _ = vae.sample(200, seed=0, condition=one_hot(torch.tensor(3), 10).float())
    nearest = torch.cdist(means.mean(0, keepdim=True), templates).argmin()
    assert int(nearest) == 3
    with pytest.raises(ValueError, match="needs a condition of width 10"):
        vae.elbo(threshold(digits.test))


def test_conv_networks_handle_28x28_images():
    vae = VAE(
        num_features=784,
        latent_dim=4,
        hidden_sizes=(64,),
        network="conv",
        image_shape=(28, 28),
        seed=0,
    )
    x = (torch.rand(6, 784, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    assert vae.elbo(x, num_samples=3, seed=0).shape == (6,)
    assert vae.reconstruct(x).shape == (6, 784)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz's dot program is not installed")
def test_plate_diagram_renders(tmp_path):
    pytest.importorskip("graphviz", reason="the graphviz Python package is not installed")
    vae = VAE(num_features=64, latent_dim=3, hidden_sizes=(16,), seed=0)
    graph = render(vae, tmp_path / "model.png")
    assert "data" in graph.source and "z" in graph.source
    assert (tmp_path / "model.png").stat().st_size > 1000
