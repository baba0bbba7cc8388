"""Guard for the compiled training path: the replayed ATen graph gives the same loss and
gradients as the eager Pyro objective on the same noise, and the same training run."""

import pyro
import pytest
import torch

from pyrovae import VAE
from pyrovae.compiled import CompiledStep
from pyrovae.data import load_digits
from pyrovae.objectives import OBJECTIVES, make_objective

OPTIONS = {"renyi": {"renyi_alpha": 0.5}, "annealed_meanfield_elbo": {"free_bits": 0.05}}


def _eager(loss_module, x):
    for parameter in loss_module.parameters():
        parameter.grad = None
    loss = loss_module(x) / x.shape[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in loss_module.parameters()]


@pytest.mark.parametrize("name", sorted(OBJECTIVES))
@pytest.mark.parametrize("num_particles", [1, 3])
def test_compiled_loss_and_gradients_equal_the_eager_objective(name, num_particles):
    torch.manual_seed(0)
    vae = VAE(num_features=20, latent_dim=3, hidden_sizes=(16,))
    x = (torch.rand(12, 20) > 0.5).float()
    options = OPTIONS.get(name, {})
    compiled = CompiledStep(
        make_objective(name, num_particles, traceable=True, **options)(vae.model, vae.guide)
    )
    eager = make_objective(name, num_particles, **options)(vae.model, vae.guide)
    for seed in (1, 2):  # the second call replays the cached graph with fresh noise
        pyro.set_rng_seed(seed)
        loss = compiled(x)
        grads = [p.grad.clone() for p in compiled.parameters]
        pyro.set_rng_seed(seed)
        expected_loss, expected_grads = _eager(eager, x)
        # Same operations on the same draws; only the order of a few float32 sums may differ.
        torch.testing.assert_close(loss, expected_loss, rtol=1e-6, atol=1e-5)
        for grad, expected in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-6)


def test_tracing_does_not_consume_random_numbers():
    torch.manual_seed(0)
    vae = VAE(num_features=20, latent_dim=3, hidden_sizes=(16,))
    compiled = CompiledStep(make_objective("trace_elbo", traceable=True)(vae.model, vae.guide))
    x = (torch.rand(12, 20) > 0.5).float()
    state = torch.get_rng_state()
    compiled.graph_for((x,))
    assert torch.equal(torch.get_rng_state(), state)


def test_a_new_batch_shape_or_objective_setting_retraces():
    vae = VAE(num_features=20, latent_dim=3, hidden_sizes=(16,))
    objective = make_objective("annealed_meanfield_elbo", traceable=True, kl_warmup_epochs=2)
    compiled = CompiledStep(objective(vae.model, vae.guide))
    x = (torch.rand(12, 20) > 0.5).float()
    graphs = {id(compiled.graph_for((x,))), id(compiled.graph_for((x[:5],)))}
    objective.start_epoch(1)
    graphs.add(id(compiled.graph_for((x,))))
    assert len(graphs) == 3
    assert compiled.graph_for((x[:5],)) is compiled.graph_for((x[:5],))


@pytest.mark.parametrize("objective", ["trace_elbo", "trace_meanfield_elbo", "dreg"])
def test_compiled_training_is_bitwise_the_eager_training(objective, monkeypatch):
    traced = []
    original = CompiledStep._trace
    monkeypatch.setattr(
        CompiledStep, "_trace", lambda self, b: traced.append(1) or original(self, b)
    )
    digits = load_digits()
    parameters = {}
    for mode in ("none", "graph"):
        torch.manual_seed(123)
        vae = VAE(num_features=64, latent_dim=3, hidden_sizes=(32,))
        history = vae.fit(
            digits.train[:300],
            digits.valid[:50],
            binarize="dynamic",
            epochs=2,
            batch_size=64,
            objective=objective,
            compile=mode,
            progress=False,
            num_particles=2 if objective == "dreg" else 1,
            seed=1,
        )
        parameters[mode] = (
            [p.detach().clone() for p in vae.parameters()],
            history.column("valid_elbo"),
        )
    assert traced, "fit(compile='graph') did not take the compiled path"
    for eager, compiled in zip(parameters["none"][0], parameters["graph"][0], strict=True):
        assert torch.equal(eager, compiled)
    assert parameters["none"][1] == parameters["graph"][1]


def test_unknown_backend_is_refused():
    vae = VAE(num_features=20, latent_dim=3, hidden_sizes=(16,))
    loss_module = make_objective("iwae", 2)(vae.model, vae.guide)
    with pytest.raises(ValueError, match="unknown backend 'jit'; valid names: graph, inductor"):
        CompiledStep(loss_module, backend="jit")
