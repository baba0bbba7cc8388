"""Study: wall time to reach a test ELBO of -100 nats per data point (issue 7).

Statically binarized MNIST (50000 training images), the architecture of Burda et al. (2016):
MLP 784-200-200-50 with tanh, Bernoulli likelihood, diagonal Gaussian guide, standard Normal
prior; Adam (lr 1e-3), batch 128, one draw of z per data point. Every variant starts from the
same initial weights, visits the data in the same order, draws the same noise (seeded as
``fit`` seeds it) and trains the same objective (analytic KL by default), so the runs differ
only by floating-point rounding:

handwritten     plain PyTorch loop: reparameterization, closed-form KL, BCE with logits, Adam
eager           ``pyrovae.VAE.fit`` on the library's Pyro model and guide
graph/inductor  ``VAE.fit(compile="graph")`` / ``VAE.fit(compile="inductor")``

After every epoch the test ELBO is estimated on all 10000 test images with one estimator,
the same code for every variant: one reparameterized draw per image from a fixed generator
(the same draws for every variant and epoch), the KL in closed form. Its time is excluded
from the training time and reported separately. A variant stops after the first epoch whose
test ELBO reaches the threshold, or at ``--max-epochs``.

The variants run interleaved: each in its own thread, one epoch at a time in turn, so that
load from other processes falls on all of them alike (each keeps its own RNG state across
turns). Training time is the wall time of the variant's training loop (for ``VAE.fit``: the
whole call, including its input validation and, in the first epoch, tracing or compilation)
minus its evaluations and its waits for the other variants; s/epoch is the median epoch
time (for ``fit``, from its history).

``VAE.fit`` has no per-epoch callback; it calls ``save`` after every epoch when given a
checkpoint path, so a subclass of :class:`pyrovae.VAE` evaluates there (between epochs,
outside fit's epoch timer; nothing is written) and stops the fit at the threshold.

Example (from a plain checkout)::

    PYROVAE_DATA_DIR=../shared/data python experiments/time_to_quality.py \\
        --out docs/time_to_quality_cpu.md
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyrovae import VAE, VAEConfig  # noqa: E402
from pyrovae.data import load_binarized_mnist  # noqa: E402
from pyrovae.networks import MIN_SCALE  # noqa: E402

ARCHITECTURE = {
    "latent_dim": 50,
    "hidden_sizes": (200, 200),
    "activation": "tanh",
    "likelihood": "bernoulli",
}
OBJECTIVES = {"analytic": "trace_meanfield_elbo", "mc": "trace_elbo"}
VARIANTS = ("handwritten", "eager", "graph", "inductor")
HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


def initial_vae(args) -> VAE:
    """The library's VAE with the initial weights every variant starts from."""
    return VAE(VAEConfig(num_features=784, **ARCHITECTURE), seed=args.seed)


class Handwritten(nn.Module):
    """The same networks as the library's VAE, written out: encoder trunk with loc and scale
    heads, decoder trunk with a logits head."""

    def __init__(self, hidden: int = 200, latent: int = 50, features: int = 784):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(features, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.loc, self.raw_scale = nn.Linear(hidden, latent), nn.Linear(hidden, latent)
        self.decoder = nn.Sequential(
            nn.Linear(latent, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh()
        )
        self.head = nn.Linear(hidden, features)

    def copy_from(self, vae: VAE) -> Handwritten:
        encoder = vae.guide.encoder
        pairs = [
            (self.trunk, encoder.trunk),
            (self.loc, encoder.loc),
            (self.raw_scale, encoder.raw_scale),
            (self.decoder, vae.model.decoder),
            (self.head, vae.model.likelihood.logits),
        ]
        for mine, theirs in pairs:
            mine.load_state_dict(theirs.state_dict())
        return self

    def encode(self, x):
        hidden = self.trunk(x)
        return self.loc(hidden), F.softplus(self.raw_scale(hidden)) + MIN_SCALE

    def logits(self, z):
        return self.head(self.decoder(z))

    def loss(self, x, objective: str):
        """Minus the ELBO per data point, one draw of z per point."""
        loc, scale = self.encode(x)
        noise = torch.randn_like(loc)
        z = loc + scale * noise
        log_lik = -F.binary_cross_entropy_with_logits(self.logits(z), x, reduction="sum")
        if objective == "analytic":
            kl = 0.5 * (scale.square() + loc.square() - 1 - 2 * scale.log()).sum()
        else:  # log q(z|x) - log p(z) at the draw
            kl = (0.5 * z.square() - 0.5 * noise.square() - scale.log()).sum()
        return -(log_lik - kl) / x.shape[0]


def test_elbo(encode, logits, x: torch.Tensor, seed: int, chunk: int = 2000) -> float:
    """ELBO per data point (nats): one draw z = loc + scale * eps per point, eps from a
    generator seeded with ``seed`` (the same draws on every call), the KL in closed form."""
    generator = torch.Generator(device=x.device).manual_seed(seed)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    with torch.no_grad():
        for part in x.split(chunk):
            loc, scale = encode(part)
            noise = torch.randn(loc.shape, generator=generator, device=x.device, dtype=loc.dtype)
            z = loc + scale * noise
            log_lik = -F.binary_cross_entropy_with_logits(logits(z), part, reduction="none")
            kl = 0.5 * (scale.square() + loc.square() - 1 - 2 * scale.log())
            total += (log_lik.sum(-1) - kl.sum(-1)).double().sum()
    return float(total) / x.shape[0]


class Turns:
    """Round-robin turns of the variants, each in its own thread: one runs at a time, for one
    epoch (and its evaluation), so that load from other processes falls on all variants
    alike. Each variant's torch RNG state is kept across turns, as if it ran alone."""

    def __init__(self, names: list[str], device: torch.device):
        self.names, self.cuda = list(names), device.type == "cuda"
        self.current, self.finished = 0, set()
        self.states: dict[str, tuple] = {}
        self.condition = threading.Condition()

    def wait(self, name: str) -> None:
        with self.condition:
            self.condition.wait_for(lambda: self.names[self.current] == name)
        if name in self.states:
            cpu, cuda = self.states[name]
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state(cuda)

    def pass_on(self, name: str, finished: bool = False) -> None:
        cuda = torch.cuda.get_rng_state() if self.cuda else None
        self.states[name] = (torch.get_rng_state(), cuda)
        with self.condition:
            if finished:
                self.finished.add(name)
            if len(self.finished) < len(self.names):
                position = self.current
                while True:
                    position = (position + 1) % len(self.names)
                    if self.names[position] not in self.finished:
                        break
                self.current = position
            self.condition.notify_all()


class Evaluator:
    """After each epoch: runs :func:`test_elbo`, keeps the records, then hands the turn on.
    ``seconds`` is the evaluation time; ``paused`` all time spent here (evaluations and
    waiting for the other variants), which the training time excludes."""

    def __init__(self, name: str, test: torch.Tensor, turns: Turns, args):
        self.name, self.test, self.turns, self.args = name, test, turns, args
        self.records: list[dict] = []
        self.seconds = self.paused = 0.0

    def __call__(self, epoch: int, epoch_seconds: float, encode, logits) -> bool:
        """Record epoch ``epoch``; return whether the threshold is reached."""
        started = time.perf_counter()
        elbo = test_elbo(encode, logits, self.test, self.args.seed + 1)
        self.seconds += time.perf_counter() - started
        self.records.append({"epoch": epoch, "seconds": epoch_seconds, "test_elbo": elbo})
        if not self.args.quiet:
            print(
                f"{self.name}: epoch {epoch} test ELBO {elbo:.2f} ({epoch_seconds:.1f} s)",
                flush=True,
            )
        reached = elbo >= self.args.threshold
        if not reached:
            self.turns.pass_on(self.name)
            self.turns.wait(self.name)
        self.paused += time.perf_counter() - started
        return reached


def run_handwritten(evaluator: Evaluator, train, args) -> dict:
    device = torch.device(args.device)
    model = Handwritten().copy_from(initial_vae(args)).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    train = train.to(device)
    pyro.set_rng_seed(args.seed)  # what fit does: the draws of z come from the global stream
    generator = torch.Generator(device=device).manual_seed(args.seed)  # fit's data order
    started = time.perf_counter()
    for epoch in range(1, args.max_epochs + 1):
        epoch_started = time.perf_counter()
        order = torch.randperm(train.shape[0], device=device, generator=generator)
        for index in order.split(args.batch_size):
            optimizer.zero_grad(set_to_none=True)
            model.loss(train[index], args.objective).backward()
            optimizer.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if evaluator(epoch, time.perf_counter() - epoch_started, model.encode, model.logits):
            break
    return summary(evaluator, time.perf_counter() - started, args)


class _ThresholdReached(Exception):
    pass


class EvaluatedVAE(VAE):
    """A VAE whose per-epoch checkpoint write (``fit`` calls ``save`` after every epoch when
    given a checkpoint path) evaluates the test ELBO instead, and stops the fit at the
    threshold."""

    evaluator: Evaluator

    def save(self, path, metadata=None, training_state=None):
        record = self.history_.records[-1]
        encoder, model = self.guide.encoder, self.model
        reached = self.evaluator(
            record["epoch"],
            record["seconds"],
            encoder,
            lambda z: model.likelihood.logits(model.decoder(z)),
        )
        if reached:
            raise _ThresholdReached


def run_fit(evaluator: Evaluator, train, args) -> dict:
    compile_mode = "none" if evaluator.name == "eager" else evaluator.name
    vae = EvaluatedVAE(VAEConfig(num_features=784, **ARCHITECTURE))
    vae.load_state_dict(initial_vae(args).state_dict())
    vae.evaluator = evaluator
    options = {
        "objective": OBJECTIVES[args.objective],
        "epochs": args.max_epochs,
        "batch_size": args.batch_size,
        "learning_rate": args.lr,
        "seed": args.seed,
        "device": args.device,
        "compile": compile_mode,
        "progress": False,
        "checkpoint_every": 1,
    }
    with tempfile.TemporaryDirectory() as scratch:  # fit needs a path; nothing is written
        started = time.perf_counter()
        try:
            vae.fit(train, None, checkpoint_path=Path(scratch) / "unused.pt", **options)
        except _ThresholdReached:
            pass
        elapsed = time.perf_counter() - started
    return summary(vae.evaluator, elapsed, args)


def summary(evaluator: Evaluator, elapsed: float, args) -> dict:
    records = evaluator.records
    reached = [r["epoch"] for r in records if r["test_elbo"] >= args.threshold]
    return {
        "epochs": len(records),
        "epochs_to_threshold": reached[0] if reached else None,
        "train_seconds": elapsed - evaluator.paused,
        "seconds_per_epoch": statistics.median(r["seconds"] for r in records),
        "first_epoch_seconds": records[0]["seconds"],
        "eval_seconds": evaluator.seconds,
        "final_test_elbo": records[-1]["test_elbo"],
        "records": records,
    }


def run_in_turns(variants: list[str], train, test, args) -> dict:
    """Run every variant in its own thread, one epoch at a time in turn (see :class:`Turns`)."""
    device = torch.device(args.device)
    turns = Turns(variants, device)
    results, errors = {}, {}

    def work(name: str) -> None:
        try:
            turns.wait(name)
            evaluator = Evaluator(name, test.to(device), turns, args)
            run = run_handwritten if name == "handwritten" else run_fit
            results[name] = run(evaluator, train, args)
        except BaseException as error:  # re-raised in the main thread
            errors[name] = error
        finally:
            turns.pass_on(name, finished=True)

    threads = [threading.Thread(target=work, args=(name,), name=name) for name in variants]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for name, error in errors.items():
        raise RuntimeError(f"variant {name!r} failed") from error
    return {name: results[name] for name in variants}


def hardware(device: str) -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def markdown(results: dict, args, command: str) -> str:
    lines = [
        f"Test ELBO threshold {args.threshold} nats per data point (10000 test images, one draw "
        f"per image, closed-form KL); objective {args.objective}; batch {args.batch_size}, "
        f"Adam lr {args.lr}, seed {args.seed}, at most {args.max_epochs} epochs; device "
        f"{hardware(args.device)}, torch {torch.__version__}, pyro {pyro.__version__}.",
        "",
        f"`{command}`",
        "",
        "| variant | epochs to threshold | training s | s/epoch (median) | first epoch s | "
        "evaluation s | final test ELBO |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        epochs = r["epochs_to_threshold"]
        reached = str(epochs) if epochs is not None else f"not reached in {r['epochs']}"
        lines.append(
            f"| {name} | {reached} | {r['train_seconds']:.1f} | {r['seconds_per_epoch']:.2f} | "
            f"{r['first_epoch_seconds']:.2f} | {r['eval_seconds']:.1f} | "
            f"{r['final_test_elbo']:.2f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--variants",
        default="handwritten,eager,inductor",
        help=f"comma-separated, from {', '.join(VARIANTS)} (inductor: the faster compiled "
        "path on CPU once its compilation, about 10 s, is paid)",
    )
    parser.add_argument("--threshold", type=float, default=-100.0)
    parser.add_argument("--max-epochs", type=int, default=300)
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="analytic")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument(
        "--train-points", type=int, default=None, help="use only this many training images"
    )
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown table; per-epoch records beside it"
    )
    args = parser.parse_args(argv)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; valid: {', '.join(VARIANTS)}")
    data = load_binarized_mnist(args.data_dir)
    train = data.train if args.train_points is None else data.train[: args.train_points]
    # The arrays load column-major; every variant gathers its minibatches from row-major copies.
    train, test = train.contiguous(), data.test.contiguous()
    results = run_in_turns(variants, train, test, args)
    command = "python experiments/time_to_quality.py " + " ".join(
        sys.argv[1:] if argv is None else argv
    )
    table = markdown(results, args, command.strip())
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
