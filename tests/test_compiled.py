"""Guard for the compiled training path: the replayed ATen graph gives the same loss and
gradients as the eager Pyro objective on the same noise, and the same training run."""

import pyro
import pytest
import torch

from pyrovae import VAE
from pyrovae.compiled import CompiledStep, drop_exact_identities, drop_identity_views
from pyrovae.data import load_digits
from pyrovae.objectives import OBJECTIVES, make_objective
from pyrovae.training import EAGER_ONLY_OBJECTIVES, _gradient_norm

OPTIONS = {"renyi": {"renyi_alpha": 0.5}, "annealed_meanfield_elbo": {"free_bits": 0.05}}


def _eager(loss_module, x):
    for parameter in loss_module.parameters():
        parameter.grad = None
    loss = loss_module(x) / x.shape[0]
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in loss_module.parameters()]


@pytest.mark.parametrize("name", sorted(set(OBJECTIVES) - set(EAGER_ONLY_OBJECTIVES)))
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
        CompiledStep, "_trace", lambda self, *a, **k: traced.append(1) or original(self, *a, **k)
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


def _small_step(name="trace_elbo", backend="graph"):
    torch.manual_seed(0)
    vae = VAE(num_features=20, latent_dim=3, hidden_sizes=(16,))
    x = (torch.rand(12, 20) > 0.5).float()
    return vae, x, CompiledStep(make_objective(name, traceable=True)(vae.model, vae.guide), backend)


def test_replayed_gradients_carry_no_autograd_history():
    vae, x, compiled = _small_step()
    loss = compiled(x)
    assert not loss.requires_grad
    for parameter in compiled.parameters:
        assert parameter.grad.grad_fn is None and not parameter.grad.requires_grad


def test_identity_views_are_dropped_from_the_graph():
    vae, x, compiled = _small_step()
    graph = compiled.graph_for((x,)).graph
    assert drop_identity_views(graph) == 0  # already applied when tracing
    targets = [node.target for node in graph.nodes if node.op == "call_function"]
    assert torch.ops.aten.detach.default not in targets
    for node in graph.nodes:
        if node.target is torch.ops.aten.t.default:
            assert node.args[0].target is not torch.ops.aten.t.default
        if node.target in (torch.ops.aten.view.default, torch.ops.aten.expand.default):
            assert node.args[0].meta["val"].shape != node.meta["val"].shape


def test_dropping_identity_views_keeps_shape_changes_and_aliasing():
    from torch.fx.experimental.proxy_tensor import make_fx

    def function(w, x):
        same = w.t().t().view(4, 3).expand(4, 3).detach()
        flat = x.view(12)
        return same * 2, flat.view(3, 4), flat.unsqueeze(0), x.t()

    w, x = torch.randn(4, 3), torch.randn(3, 4)
    graph = make_fx(function)(w, x)
    expected = graph(w, x)
    assert drop_identity_views(graph.graph) == 5  # t.t (the second t), view, expand, detach, view
    graph.recompile()
    targets = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert targets.count("aten.t.default") == 1 and "aten.unsqueeze.default" in targets
    result = graph(w, x)
    for got, want in zip(result, expected, strict=True):
        assert torch.equal(got, want) and got.stride() == want.stride()
    assert result[1].data_ptr() == x.data_ptr()  # still a view of x


def _traced(function, *inputs):
    from torch.fx.experimental.proxy_tensor import make_fx

    return make_fx(function)(*inputs)


def test_exact_identities_are_dropped_and_nothing_else():
    def function(x, n, w):
        kept = (x + 0.0, n * 1.0, x * torch.ones(2, 3))  # -0.0 + 0.0 is +0.0; int; a tensor
        y = (x * 1.0) / 1 - 0  # three dropped
        z = (y**1.0 * 2.0).t() * 1  # the power is dropped, the last product is returned: kept
        return (*kept, x * 1.0 + w, z)  # one more dropped

    x = torch.tensor([[-0.0, 1.0, float("nan")], [2.0, -3.0, float("inf")]])
    n, w = torch.arange(6).reshape(2, 3), torch.randn(2, 3)
    graph = _traced(function, x, n, w)
    expected = graph(x, n, w)
    assert drop_exact_identities(graph.graph) == 5
    graph.recompile()
    for got, want in zip(graph(x, n, w), expected, strict=True):
        assert got.dtype == want.dtype and got.stride() == want.stride()
        assert torch.equal(_bits(got), _bits(want))  # signed zeros and NaNs included


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.view(torch.int32) if tensor.dtype == torch.float32 else tensor


def test_identities_stay_where_they_change_what_a_caller_sees():
    def function(x, c):
        y = x * 1.0  # returned through a view from split: kept (a copy, not an alias of x)
        return y.split(1)[0], y * 2, c.conj()  # the conjugate view has c's layout: kept

    x, c = torch.randn(2, 3), torch.randn(3, dtype=torch.complex64)
    graph = _traced(function, x, c)
    assert drop_exact_identities(graph.graph) == 0
    assert drop_identity_views(graph.graph) == 0


def test_exact_identities_stay_when_a_tensor_is_modified_in_place():
    def function(x):
        y = x * 2.0
        z = y * 1.0
        y.add_(1.0)  # z must keep the value before this
        return z + y

    graph = _traced(function, torch.randn(3))
    assert drop_exact_identities(graph.graph) == 0


@pytest.mark.parametrize("name", ["trace_elbo", "trace_meanfield_elbo", "dreg"])
@pytest.mark.parametrize("clip_norm", [None, 0.5, 1e6])
def test_loss_and_norm_is_the_step_followed_by_clip_grad_norm(name, clip_norm):
    vae, x, compiled = _small_step(name)
    for seed in (1, 2):  # the second call replays the cached graph with fresh noise
        pyro.set_rng_seed(seed)
        loss, norm = compiled.loss_and_norm(x, clip_norm=clip_norm)
        grads = [p.grad.clone() for p in compiled.parameters]
        pyro.set_rng_seed(seed)
        expected_loss = compiled(x)
        expected_norm = _gradient_norm(list(compiled.parameters), clip_norm)  # clips in place
        assert torch.equal(loss, expected_loss) and torch.equal(norm, expected_norm)
        for grad, parameter in zip(grads, compiled.parameters, strict=True):
            assert torch.equal(grad, parameter.grad)
    if clip_norm == 0.5:
        assert float(norm) > 0.5
        assert torch.isclose(torch.nn.utils.get_total_norm(grads), torch.tensor(0.5))


def test_loss_and_norm_needs_the_same_parameters_in_the_same_order():
    vae, x, compiled = _small_step()
    parameters = list(vae.parameters())
    assert compiled.same_parameters(parameters)
    assert not compiled.same_parameters(parameters[::-1])
    assert not compiled.same_parameters(parameters[:-1])
    assert not compiled.same_parameters([p.detach() for p in parameters])


@pytest.mark.parametrize("objective", ["trace_elbo", "trace_meanfield_elbo"])
@pytest.mark.parametrize("clip_norm", [None, 1.0])
def test_training_with_the_norm_in_the_graph_is_bitwise_the_eager_training(objective, clip_norm):
    """Steps of a compiled step whose graph also computes (and clips) the gradient norm
    (``loss_and_norm``, then Adam) are bitwise ``pyrovae.training.train_step`` with the eager
    objective, and with the compiled step (whichever way train_step gets the norm):
    parameters, losses and norms."""
    from pyrovae.training import train_step

    digits = load_digits()
    batches = [(batch > 8).float() for batch in digits.train[:320].split(64)]
    results = {}
    for mode in ("eager", "compiled", "norm_in_graph"):
        torch.manual_seed(123)
        vae = VAE(num_features=64, latent_dim=3, hidden_sizes=(32,))
        loss_module = make_objective(objective, traceable=True)(vae.model, vae.guide)
        optimizer = torch.optim.Adam(vae.parameters(), lr=1e-2)
        if mode != "eager":
            loss_module = CompiledStep(loss_module)
            assert loss_module.same_parameters(list(vae.parameters()))
        pyro.set_rng_seed(7)
        trace = []
        for batch in batches * 2:
            if mode == "norm_in_graph":
                trace.append(loss_module.loss_and_norm(batch, clip_norm=clip_norm))
                optimizer.step()
            else:
                trace.append(train_step(loss_module, optimizer, batch, clip_norm))
        results[mode] = ([p.detach().clone() for p in vae.parameters()], trace)
    reference, *others = results.values()
    for parameters, trace in others:
        for expected, got in zip(reference[0], parameters, strict=True):
            assert torch.equal(expected, got)
        for (loss, norm), (loss_c, norm_c) in zip(reference[1], trace, strict=True):
            assert torch.equal(loss, loss_c) and torch.equal(norm, norm_c)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trace_elbo", "trace_meanfield_elbo"])
def test_inductor_step_is_the_graph_step_up_to_rounding(name):
    import torch._inductor.config

    with torch._inductor.config.patch(fallback_random=True):  # draws from torch, not its own
        _compare_inductor_with_graph(name)


def _compare_inductor_with_graph(name):
    vae, x, graph = _small_step(name)
    inductor = CompiledStep(graph.loss_module, backend="inductor")
    for seed in (1, 2):
        results = []
        for step in (graph, inductor):
            pyro.set_rng_seed(seed)
            loss, norm = step.loss_and_norm(x, clip_norm=1.0)
            results.append((loss, norm, [p.grad.clone() for p in step.parameters]))
        (loss, norm, grads), (loss_i, norm_i, grads_i) = results
        torch.testing.assert_close(loss_i, loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(norm_i, norm, rtol=1e-5, atol=1e-5)
        for grad_i, grad in zip(grads_i, grads, strict=True):
            torch.testing.assert_close(grad_i, grad, rtol=1e-4, atol=1e-6)
        assert not any(g.requires_grad for g in grads_i)


def test_an_eager_only_objective_is_refused_by_the_graph_path_and_auto_takes_eager():
    torch.manual_seed(0)
    x = (torch.rand(12, 20) > 0.5).float()
    vae = VAE(num_features=20, latent_dim=3, hidden_sizes=(16,))
    with pytest.raises(ValueError, match="traceenum_elbo.*eager Pyro only"):
        vae.fit(
            x, epochs=1, batch_size=6, objective="traceenum_elbo", compile="graph", progress=False
        )
    vae.fit(x, epochs=1, batch_size=6, objective="traceenum_elbo", progress=False)
    assert vae.training_path_ == "eager"
