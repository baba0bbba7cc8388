"""Benchmark: milliseconds per training step of the same VAE, side by side in one process.

Model: MLP 784-400-50 (ReLU), Bernoulli likelihood, standard Normal prior, diagonal Gaussian
guide, Adam (lr 1e-3), batch 128 of statically binarized MNIST, data resident on the device.

Variants
--------
handwritten            plain PyTorch: reparameterization, analytic KL, BCE, one Adam
pyro_example           Pyro's VAE example: ``pyro.module`` in model/guide functions,
                       ``SVI(Trace_ELBO)`` with ``pyro.optim.Adam``
pyrovae_<objective>_<compile>
                       the library's own step (``pyrovae.training.train_step``: loss,
                       gradients, gradient norm, non-finite guard, Adam) on its Pyro model and
                       guide, objective ``mc`` (Trace_ELBO) or ``analytic`` (TraceMeanField_ELBO),
                       eager (``none``), replayed ATen graph (``graph``) or ``torch.compile``d
                       graph (``inductor``)

Each round runs ``--steps`` steps of every variant (rotating the order between rounds) after
a warm-up; the table reports the median over rounds and the spread, and the ratio to the
hand-written step. Run from a plain checkout::

    python experiments/bench_training.py --rounds 7 --steps 50 --out docs/bench_training_cpu.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyrovae import VAE, TrainConfig  # noqa: E402
from pyrovae.compiled import CompiledStep  # noqa: E402
from pyrovae.objectives import make_objective  # noqa: E402
from pyrovae.training import train_step  # noqa: E402

LATENT, HIDDEN, FEATURES = 50, 400, 784


class Networks(nn.Module):
    """The encoder (trunk, loc and scale heads) and decoder every baseline shares."""

    def __init__(self):
        super().__init__()
        self.encoder = nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU())
        self.loc, self.raw_scale = nn.Linear(HIDDEN, LATENT), nn.Linear(HIDDEN, LATENT)
        self.decoder = nn.Sequential(
            nn.Linear(LATENT, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, FEATURES)
        )


class HandwrittenVAE(Networks):
    def loss(self, x):
        hidden = self.encoder(x)
        loc, scale = self.loc(hidden), F.softplus(self.raw_scale(hidden)) + 1e-4
        z = loc + scale * torch.randn_like(loc)
        log_lik = -F.binary_cross_entropy_with_logits(self.decoder(z), x, reduction="sum")
        kl = 0.5 * (scale.square() + loc.square() - 1 - 2 * scale.log()).sum()
        return -(log_lik - kl) / x.shape[0]


def handwritten(device):
    model = HandwrittenVAE().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step(batch):
        optimizer.zero_grad(set_to_none=True)
        model.loss(batch).backward()
        optimizer.step()

    return step


class PyroExample(Networks):
    """Pyro's examples/vae/vae.py structure: model and guide functions with pyro.module."""

    def model(self, x):
        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(x.shape[0], LATENT), x.new_ones(x.shape[0], LATENT))
            z = pyro.sample("z", prior.to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("encoder", self.encoder)
        pyro.module("loc", self.loc)
        pyro.module("raw_scale", self.raw_scale)
        with pyro.plate("data", x.shape[0]):
            hidden = self.encoder(x)
            scale = F.softplus(self.raw_scale(hidden)) + 1e-4
            pyro.sample("z", dist.Normal(self.loc(hidden), scale).to_event(1))


def pyro_example(device):
    pyro.clear_param_store()
    vae = PyroExample().to(device)
    svi = pyro.infer.SVI(
        vae.model, vae.guide, pyro.optim.Adam({"lr": 1e-3}), loss=pyro.infer.Trace_ELBO()
    )
    return lambda batch: svi.step(batch)


def pyrovae_variant(objective: str, backend: str, device):
    vae = VAE(num_features=FEATURES, latent_dim=LATENT, hidden_sizes=(HIDDEN,)).to(device)
    name = {"mc": "trace_elbo", "analytic": "trace_meanfield_elbo"}[objective]
    loss_module = make_objective(name, 1, traceable=backend != "none")(vae.model, vae.guide)
    if backend != "none":
        loss_module = CompiledStep(loss_module, backend=backend)
    optimizer = torch.optim.Adam(vae.parameters(), lr=1e-3)
    guard = torch.device(device).type == "cpu"  # what fit() does: host checks only on CPU
    return lambda batch: train_step(loss_module, optimizer, batch, guard=guard)


def variants(backends, device) -> dict:
    table = {
        "handwritten": lambda: handwritten(device),
        "pyro_example": lambda: pyro_example(device),
    }
    for backend in backends:
        for objective in ("mc", "analytic"):
            table[f"pyrovae_{objective}_{backend}"] = lambda o=objective, b=backend: (
                pyrovae_variant(o, b, device)
            )
    return table


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def run(args) -> dict[str, list[float]]:
    from pyrovae.data import load_binarized_mnist

    device = args.device
    data = load_binarized_mnist(args.data_dir).train[: args.batch_size * 64].to(device)
    batches = data.split(args.batch_size)
    steps = {name: build() for name, build in variants(args.backends, device).items()}
    for step in steps.values():  # warm-up: first-step validation, tracing, compilation
        for batch in batches[: args.warmup]:
            step(batch)
    synchronize(device)
    timings = {name: [] for name in steps}
    names = list(steps)
    for round_index in range(args.rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            for i in range(args.steps):
                steps[name](batches[i % len(batches)])
            synchronize(device)
            timings[name].append((time.perf_counter() - started) / args.steps * 1000)
    return timings


def describe_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(timings: dict[str, list[float]], args) -> str:
    reference = statistics.median(timings["handwritten"])
    lines = [
        f"batch {args.batch_size}, {args.rounds} rounds x {args.steps} steps, device "
        f"{describe_device(args.device)}, torch {torch.__version__}, pyro {pyro.__version__}",
        "",
        "| variant | ms/step (median) | min-max | relative to hand-written |",
        "| --- | --- | --- | --- |",
    ]
    for name, values in timings.items():
        median = statistics.median(values)
        lines.append(
            f"| {name} | {median:.2f} | {min(values):.2f}-{max(values):.2f} | "
            f"{median / reference:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=["none", "graph"],
        help="comma-separated compile backends of the pyrovae variants",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    for backend in args.backends:
        TrainConfig(compile=backend)  # validates the names
    table = markdown(run(args), args)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
