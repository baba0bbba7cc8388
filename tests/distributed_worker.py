"""Worker for tests/test_distributed.py.

Run under ``torchrun --nproc_per_node 2`` (gloo, loopback) it trains or evaluates
data-parallel; imported by the test, the same functions give the one-process reference.
Rank 0 (or the single process) saves what the test compares to ``--out``.

The training model is a small VAE in float64 whose guide takes its standard-normal draw
with each data point (``z = loc(x) + scale(x) * noise``, scored by the Normal log density),
so that training is a deterministic function of the data order: a data-parallel run must
then give the one-process parameters up to rounding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.distributed import active_context, init_from_environment, shutdown  # noqa: E402
from pyrovae.models.base import LocalParamsModule  # noqa: E402
from pyrovae.models.latent_variable import LatentVariableModel  # noqa: E402

FEATURES, LATENT = 6, 2


class BernoulliDecoderModel(LocalParamsModule):
    def __init__(self):
        super().__init__()
        self.decoder = nn.Linear(LATENT, FEATURES)

    def forward(self, x, noise):
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(torch.zeros_like(noise), torch.ones_like(noise)).to_event(1)
            z = pyro.sample("z", prior)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class GivenNoiseGuide(LocalParamsModule):
    """A diagonal Gaussian guide whose standard-normal draw comes with each data point."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Linear(FEATURES, 2 * LATENT)

    def forward(self, x, noise):
        loc, raw_scale = self.encoder(x).chunk(2, -1)
        scale = nn.functional.softplus(raw_scale) + 1e-3
        z = loc + scale * noise
        log_q = dist.Normal(loc, scale).log_prob(z).sum(-1)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Delta(z, log_density=log_q, event_dim=1))


def training_data(points: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    x = torch.bernoulli(
        torch.full((points, FEATURES), 0.4, dtype=torch.float64), generator=generator
    )
    noise = torch.randn(points, LATENT, dtype=torch.float64, generator=generator)
    return x, noise


def train(compile_mode: str, checkpoint: Path | None = None, epochs: int = 3) -> dict:
    """Parameters and history after a short deterministic fit: 50 points in minibatches of
    15, 15, 15 and 5, so that two ranks get shards of unequal sizes (8 and 7, 3 and 2)."""
    torch.manual_seed(0)
    fitted = LatentVariableModel(BernoulliDecoderModel(), GivenNoiseGuide()).double()
    data, valid = training_data(50), training_data(1)  # one validation point: rank 1 idles
    history = fitted.fit(
        data,
        valid,
        checkpoint_path=checkpoint,
        epochs=epochs,
        batch_size=15,
        learning_rate=0.05,
        clip_norm=5.0,
        seed=0,
        compile=compile_mode,
        progress=False,
    )
    return {"state": fitted.state_dict(), "history": history.records}


def train_vae(checkpoint: Path, epochs: int, resume: bool) -> dict:
    """A small built-in VAE with real Monte Carlo noise and dynamic binarization (each rank
    draws from its own stream), checkpointed every epoch."""
    vae = VAE(VAEConfig(num_features=FEATURES, latent_dim=LATENT, hidden_sizes=(8,)), seed=3)
    x = torch.rand(40, FEATURES, generator=torch.Generator().manual_seed(5))
    history = vae.fit(
        x,
        checkpoint_path=checkpoint,
        resume=resume,
        epochs=epochs,
        batch_size=12,
        binarize="dynamic",
        seed=0,
        progress=False,
    )
    return {"state": vae.state_dict(), "history": history.records}


def evaluate() -> dict:
    """Per-datapoint evaluation of a small untrained VAE on 30 points in blocks of 7."""
    vae = VAE(VAEConfig(num_features=FEATURES, latent_dim=LATENT, hidden_sizes=(8,)), seed=3)
    vae = vae.double()
    x, _ = training_data(30)
    result = vae.evaluate(x, num_samples=50, ks=(1, 5), seed=11, max_pairs=50 * 7)
    return {"per_datapoint": result.per_datapoint, "latent": result.to_dict()["latent"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("task", choices=("train", "train-vae", "evaluate"))
    parser.add_argument("--compile", default="none")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--checkpoint", type=Path, default=None)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    init_from_environment()
    try:
        if args.task == "train":
            result = train(args.compile, args.checkpoint, args.epochs)
        elif args.task == "train-vae":
            result = train_vae(args.checkpoint, args.epochs, args.resume)
        else:
            result = evaluate()
        parallel = active_context()
        result["world_size"] = 1 if parallel is None else parallel.world_size
        if parallel is None or parallel.is_main:
            torch.save(result, args.out)
    finally:
        shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
