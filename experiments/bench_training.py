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
hand-written step.

Memory: each variant also runs alone in a fresh process (warm-up, then ``--steps`` steps).
The second table gives its peak resident set size above a baseline taken before the variant
is built, once over building and warm-up (tracing and compilation included) and once over
the steps after warm-up (Linux: the peak is reset through ``/proc/self/clear_refs``); on
CUDA also ``torch.cuda.max_memory_allocated`` over the same two spans. ``--no-memory``
skips these runs.

Run from a plain checkout::

    python experiments/bench_training.py --rounds 7 --steps 50 --out docs/bench_training_cpu.md
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
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


def load_batches(args) -> tuple[torch.Tensor, ...]:
    from pyrovae.data import load_binarized_mnist

    data = load_binarized_mnist(args.data_dir).train[: args.batch_size * 64]
    # The arrays load column-major; fit gathers each minibatch into a row-major tensor.
    return data.contiguous().to(args.device).split(args.batch_size)


def run(args) -> dict[str, list[float]]:
    device = args.device
    batches = load_batches(args)
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


def _status_kib(field: str) -> int | None:
    """A memory field (``VmRSS``, ``VmHWM``) of this process from /proc, in KiB."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size (VmHWM) to its current size (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def memory_probe(args) -> dict:
    """In a fresh process: build one variant, warm it up, run ``--steps`` steps; peak memory
    (MiB) of the build and warm-up (tracing, compilation) and of the steps, above a baseline."""
    device, name = args.device, args.memory_probe
    cuda = torch.device(device).type == "cuda"
    batches = load_batches(args)
    scratch = nn.Linear(FEATURES, HIDDEN).to(device)  # thread pools, BLAS buffers and lazily
    scratch(batches[0]).sum().backward()  # imported modules (autograd, Adam) belong to the
    torch.optim.Adam(scratch.parameters()).step()  # baseline
    del scratch
    synchronize(device)
    mib = 1024.0
    baseline = _status_kib("VmRSS")
    resettable = baseline is not None and _reset_peak_rss()

    def peak_above_baseline() -> float | None:
        return (_status_kib("VmHWM") - baseline) / mib if resettable else None

    step = variants(args.backends, device)[name]()
    for batch in batches[: args.warmup]:
        step(batch)
    synchronize(device)
    result = {"baseline_rss_mib": None if baseline is None else baseline / mib}
    result["build_peak_rss_mib"] = peak_above_baseline()
    if cuda:
        result["build_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / mib**2
        torch.cuda.reset_peak_memory_stats()
    resettable = resettable and _reset_peak_rss()
    for i in range(args.steps):
        step(batches[i % len(batches)])
    synchronize(device)
    result["steps_peak_rss_mib"] = peak_above_baseline()
    if cuda:
        result["steps_peak_allocated_mib"] = torch.cuda.max_memory_allocated() / mib**2
    return result


def measure_memory(args) -> dict[str, dict]:
    """Run :func:`memory_probe` for every variant, each in a fresh process."""
    results = {}
    for name in variants(args.backends, args.device):
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--memory-probe",
            name,
            "--device",
            args.device,
            "--batch-size",
            str(args.batch_size),
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--backends",
            ",".join(args.backends),
        ]
        if args.data_dir is not None:
            command += ["--data-dir", args.data_dir]
        output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(output.strip().splitlines()[-1])
    return results


def describe_device(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def memory_markdown(memory: dict[str, dict], args) -> str:
    cuda = torch.device(args.device).type == "cuda"
    columns = {
        "build_peak_rss_mib": "RSS peak, build + warm-up",
        "steps_peak_rss_mib": "RSS peak, steps",
    }
    if cuda:
        columns["build_peak_allocated_mib"] = "CUDA allocated peak, build + warm-up"
        columns["steps_peak_allocated_mib"] = "CUDA allocated peak, steps"
    baselines = [r["baseline_rss_mib"] for r in memory.values() if r["baseline_rss_mib"]]
    baseline = f"{statistics.median(baselines):.0f} MiB" if baselines else "n/a"
    lines = [
        f"Peak memory in MiB: each variant alone in a fresh process, {args.warmup} warm-up + "
        f"{args.steps} steps. RSS: peak resident set size above the baseline (after imports, "
        f"data and one Adam step of a scratch layer; median {baseline}); build + warm-up "
        "includes tracing and compilation; steps: the timed steps after warm-up (model, "
        "optimizer state and each step's memory).",
        "",
        "| variant | " + " | ".join(columns.values()) + " |",
        "| --- |" + " --- |" * len(columns),
    ]
    for name, record in memory.items():
        cells = ["n/a" if record[key] is None else f"{record[key]:.1f}" for key in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


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
    parser.add_argument(
        "--memory",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also measure each variant's peak memory in a fresh process",
    )
    parser.add_argument("--memory-probe", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for backend in args.backends:
        TrainConfig(compile=backend)  # validates the names
    if args.memory_probe is not None:
        print(json.dumps(memory_probe(args)))
        return
    table = markdown(run(args), args)
    if args.memory:
        table += "\n\n" + memory_markdown(measure_memory(args), args)
    print(table)
    if args.out is not None:
        args.out.write_text(table + "\n")


if __name__ == "__main__":
    main()
