"""Evaluation in eval mode: dropout off and BatchNorm on its running statistics during
``evaluate``, ``elbo``, ``compare``, the gap decomposition and the validation ELBO, with one
warning naming the layers switched and every module's own mode restored afterwards."""

import copy
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyrovae.evaluation.comparison import compare
from pyrovae.evaluation.gaps import decompose_gaps
from pyrovae.evaluation.importance import evaluate
from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.latent_variable import LatentVariableModel
from pyrovae.models.modes import NOTE, evaluation_mode

FIT = {"epochs": 2, "batch_size": 25, "learning_rate": 1e-2, "progress": False, "compile": "none"}


def data(n: int = 100) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(n, 2, generator=generator, dtype=torch.float64)
    w = torch.randn(6, 2, generator=generator, dtype=torch.float64)
    return torch.tanh(z @ w.T) + 0.3 * torch.randn(n, 6, generator=generator, dtype=torch.float64)


def decoder_model(decoder: nn.Module):
    """A function-style model whose decoder (registered with pyro.module) may hold dropout."""

    def model(x):
        net = pyro.module("decoder", decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(net(z), 0.5).to_event(1), obs=x)

    return model


def notes(caught) -> list[str]:
    return [str(w.message) for w in caught if str(w.message).startswith(NOTE)]


@pytest.fixture
def with_and_without_dropout(float64):
    """The same fitted model twice: its decoder with a dropout layer, and without it."""
    x = data()
    decoder = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Dropout(0.3), nn.Linear(16, 6))
    model = decoder_model(decoder)
    fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4], hidden_sizes=(16,)))
    fitted.fit(x, **FIT)
    plain = nn.Sequential(*(layer for layer in decoder if not isinstance(layer, nn.Dropout)))
    reference = LatentVariableModel(decoder_model(plain), copy.deepcopy(fitted.guide))
    return fitted, reference, decoder, x


def test_dropout_does_not_move_log_px(with_and_without_dropout):
    fitted, reference, decoder, x = with_and_without_dropout
    decoder[1].eval()  # a module the user left in eval mode keeps its own mode
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fitted.evaluate(x, num_samples=50, seed=3)
    expected = reference.evaluate(x, num_samples=50, seed=3)
    for name in ("log_px", "elbo", "iwae_5"):
        torch.testing.assert_close(
            torch.as_tensor(result.per_datapoint[name]),
            torch.as_tensor(expected.per_datapoint[name]),
            rtol=0,
            atol=1e-12,
        )
    assert len(notes(caught)) == 1  # one line, once, for the whole evaluation
    assert "decoder.2 (Dropout)" in notes(caught)[0]
    assert [m.training for m in decoder] == [True, False, True, True]
    torch.testing.assert_close(
        fitted.elbo(x, num_samples=4, seed=1), reference.elbo(x, num_samples=4, seed=1)
    )


def test_the_direct_estimators_switch_the_modules_too(with_and_without_dropout):
    fitted, reference, decoder, x = with_and_without_dropout
    options = {"num_samples": 20, "seed": 2, "latent_diagnostics": False, "ks": (1,)}
    direct = evaluate(decoder_model(decoder), fitted.guide, x, **options)  # a closure's module
    expected = reference.evaluate(x, **options)
    assert (direct.per_datapoint["log_px"] == expected.per_datapoint["log_px"]).all()
    comparison = compare({"dropout": fitted, "plain": reference}, x, num_samples=20)
    assert comparison.difference("dropout", "plain")["difference"] == 0.0
    gaps = decompose_gaps(fitted, x[:6], num_samples=10, steps=3, draws=2, seed=0)
    plain_gaps = decompose_gaps(reference, x[:6], num_samples=10, steps=3, draws=2, seed=0)
    assert (gaps.per_datapoint["elbo_optimal"] == plain_gaps.per_datapoint["elbo_optimal"]).all()
    assert decoder.training and decoder[2].training


class BatchNormPair(nn.Module):
    """Model and guide as methods; the guide's encoder normalises its hidden layer."""

    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(2, 6)
        self.encoder = nn.Sequential(
            nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4)
        )

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
            pyro.sample("x", dist.Normal(self.decoder(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        loc, raw = self.encoder(x).chunk(2, -1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw)).to_event(1))


def test_batch_norm_guide_evaluates_on_running_statistics_after_fit(float64):
    x = data()
    pair = BatchNormPair()
    fitted = LatentVariableModel(pair.model, pair.guide)
    fitted.fit(x[:75], x[75:], **FIT)
    norm = pair.encoder[1]
    statistics = (norm.running_mean.clone(), norm.running_var.clone())
    with pytest.warns(UserWarning, match=r"switched model\.encoder\.1 \(BatchNorm1d\)"):
        result = fitted.evaluate(x[:1], num_samples=50, seed=0)  # one point: no batch statistics
    assert torch.equal(norm.running_mean, statistics[0])  # evaluation leaves them unchanged
    assert torch.equal(norm.running_var, statistics[1])
    assert pair.training and norm.training
    by_hand = copy.deepcopy(fitted).eval()  # what a PyTorch user would do
    expected = by_hand.evaluate(x[:1], num_samples=50, seed=0)
    assert result.per_datapoint["log_px"] == pytest.approx(expected.per_datapoint["log_px"], abs=0)


class Recorder(nn.Module):
    """Identity that records the mode and batch size of each call."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple[bool, int]] = []

    def forward(self, z):
        self.calls.append((self.training, z.shape[-2]))
        return z


def test_validation_elbo_is_computed_in_eval_mode(float64):
    x = data()
    recorder = Recorder()
    decoder = nn.Sequential(nn.Linear(2, 6), recorder)
    model = decoder_model(decoder)
    fitted = LatentVariableModel(model, AmortizedGuide(model, x[:4], hidden_sizes=(8,)))
    recorder.calls.clear()
    fitted.fit(x[:75], x[75:], **FIT)
    validation = {mode for mode, size in recorder.calls if size == 25 and not mode}
    training_steps = {mode for mode, size in recorder.calls if size == 25 and mode}
    assert validation == {False} and training_steps == {True}  # 25 rows: steps and validation
    assert recorder.training


def test_modes_are_restored_after_an_exception_and_no_warning_without_dropout():
    decoder = nn.Sequential(nn.Linear(2, 3), nn.Dropout(0.5))
    with pytest.raises(RuntimeError, match="failed"), pytest.warns(UserWarning, match=NOTE):
        with evaluation_mode(decoder_model(decoder)):
            assert not decoder.training and not decoder[1].training
            raise RuntimeError("failed")
    assert decoder.training and decoder[1].training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with evaluation_mode(decoder_model(nn.Linear(2, 3))):
            pass
        decoder.eval()
        with evaluation_mode(decoder_model(decoder)):  # already in eval mode: nothing to say
            pass
    assert not decoder.training


def test_a_module_found_only_when_called_is_switched_and_restored():
    hidden = {"net": nn.Sequential(nn.Linear(2, 2), nn.Dropout(0.5))}  # no static route to it

    def program(z):
        return hidden["net"](z)

    with pytest.warns(UserWarning, match=r"Sequential\.1 \(Dropout\)"):
        with evaluation_mode(program):
            z = torch.ones(4, 2)
            assert torch.equal(program(z), program(z))  # no dropout mask
    assert hidden["net"].training and hidden["net"][1].training
