"""Study: Kingma's M2 semi-supervised VAE on statically binarized MNIST (issue 22, item 6).

The model is p(y) p(z) p(x | y, z): y ~ Categorical(1/10) observed through ``obs_mask`` for
the labelled images and summed out exactly by pyrovae's parallel enumeration for the others,
z ~ N(0, I_L), x | y, z ~ Bernoulli(decoder([z, onehot(y)])) with an MLP decoder
(L+10)-H-784 (tanh). Labelled and unlabelled images train in one pass with
:meth:`LatentVariableModel.fit`, in one of two set-ups (``--guide``):

* ``amortize`` (default; Kingma et al.'s M2): :class:`~pyrovae.models.autoguide.AmortizedGuide`
  with ``discrete="amortize"``, a shared encoder of x with a categorical head q(y | x) and
  heads q(z | x, y) that see onehot(y) (the observed label of a labelled image, each value
  of y for an unlabelled one), trained with ``traceenum_elbo`` (Pyro's TraceEnum_ELBO, the
  label summed in the guide) plus the classification term alpha * log q(y_obs | x) on the
  labelled images (``--classification-weight``, default 46 as in Pyro's example). The
  classifier is q(y | x) (:meth:`AmortizedGuide.class_probabilities`).
* ``enumerate`` (the ELBO alone): the guide covers z only, q(z | x, onehot(y)) for
  labelled images and q(z | x, 0) for unlabelled ones, the label summed out in the model
  (``trace_meanfield_elbo``), no classification term; the classifier is the fitted model's
  own posterior p(y | x) by importance sampling with the label enumerated
  (:meth:`LatentVariableModel.discrete_posterior`).

Data. ``binarized_mnist.npz`` (Larochelle & Murray 2011) has labels for its test split only
(``test_labels``); its train and valid splits carry none, and the MNIST label file beside it
(``t10k-labels-idx1-ubyte.gz``) covers the test split only too. So: the 10000 labelled test
images are split once (permutation with seed 0) into a *labelled pool* of 5000 and a
*held-out test set* of 5000; each run draws its balanced labelled set (``n/10`` per class)
from the pool with the run's seed; the unlabelled images are the first ``--unlabelled`` of
a seed-0 permutation of the 50000 (label-free) training images, the same for every run.
Every number below is on the held-out 5000 (its first ``--test-points`` for the error, its
first ``--is-points`` for log p(x)).

Reported per run: classification error on the held-out test set (binomial SE), test
log p(x) by importance sampling with labels summed out (K = ``--is-samples``, mean over
images with its SE over images, and the mean Monte Carlo SE per image), wall times. Over the
seeds of one label count: mean error and log p(x) with their between-seed SEs.
``--label-copies r`` repeats each labelled image r times in the training set (weighting its
ELBO terms by r; not in Kingma et al.). Run (about 10 minutes on one thread)::

    OMP_NUM_THREADS=1 PYROVAE_DATA_DIR=../shared/data python experiments/ss_vae.py --threads 1
    OMP_NUM_THREADS=1 PYROVAE_DATA_DIR=../shared/data python experiments/ss_vae.py \
        --threads 1 --guide enumerate
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from pyrovae.data import load_binarized_mnist  # noqa: E402
from pyrovae.models.autoguide import AmortizedGuide  # noqa: E402
from pyrovae.models.latent_variable import LatentVariableModel  # noqa: E402

NUM_CLASSES = 10
POOL_SIZE = 5000


class M2(nn.Module):
    """The M2 model p(y) p(z) p(x | y, z) with an MLP decoder (L+10)-H-784 (tanh); the label
    y is observed where ``labelled`` and enumerated elsewhere."""

    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.latent = latent
        self.decoder = nn.Sequential(
            nn.Linear(latent + NUM_CLASSES, hidden), nn.Tanh(), nn.Linear(hidden, 784)
        )

    def forward(self, x, y, labelled):
        prior = torch.full((NUM_CLASSES,), 1.0 / NUM_CLASSES, dtype=x.dtype)
        with pyro.plate("data", x.shape[0]):
            label = pyro.sample("y", dist.Categorical(prior), obs=y, obs_mask=labelled)
            z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([self.latent]).to_event(1))
            onehot = F.one_hot(label, NUM_CLASSES).to(z.dtype)
            batch = torch.broadcast_shapes(z.shape[:-1], onehot.shape[:-1])
            inputs = torch.cat([z.expand(*batch, -1), onehot.expand(*batch, -1)], -1)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(inputs)).to_event(1), obs=x)


def encode(x, y, labelled):
    """The guide's input: the image and onehot(y) where the label is known, zeros elsewhere."""
    shown = torch.where(labelled[:, None], F.one_hot(y, NUM_CLASSES), 0).to(x.dtype)
    return torch.cat([x, shown], -1)


def build(args, train):
    """A fresh (untrained) M2 model and its guide for ``train`` = (x, y, labelled): with
    ``--guide amortize`` the encoder reads x alone (q(y | x) must not see the label) and the
    label reaches q(z | x, y) through the guide's onehot(y); with ``--guide enumerate`` it
    reads [x, shown label]."""
    model = M2(args.latent, args.hidden)
    if args.guide == "amortize":
        options = dict(discrete="amortize", classification_weight=args.classification_weight)
    else:
        options = dict(encoder_input=encode)
    guide = AmortizedGuide(
        model, *(t[:4] for t in train), hidden_sizes=(args.hidden,), activation="tanh",
        **options,
    )
    return model, guide


def objective(args) -> str:
    """The training objective: ``--objective``, else the one each guide needs."""
    if args.objective:
        return args.objective
    return "traceenum_elbo" if args.guide == "amortize" else "trace_meanfield_elbo"


def split_data(data_dir, unlabelled: int):
    """(pool_x, pool_y), (test_x, test_y), unlabelled_x as float32 / int64 tensors."""
    splits = load_binarized_mnist(data_dir, download=False)
    if splits.test_labels is None:
        raise ValueError("binarized_mnist.npz has no test_labels: the study needs them")
    order = torch.from_numpy(np.random.default_rng(0).permutation(len(splits.test)))
    pool, held_out = order[:POOL_SIZE], order[POOL_SIZE:]
    x, y = splits.test.float(), splits.test_labels.long()
    train_order = torch.from_numpy(np.random.default_rng(0).permutation(len(splits.train)))
    unlabelled_x = splits.train[train_order[:unlabelled]].float()
    return (x[pool], y[pool]), (x[held_out], y[held_out]), unlabelled_x


def balanced_labels(pool_y: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    """Indices of ``count / 10`` pool images of each class, drawn with ``seed``."""
    if count % NUM_CLASSES:
        raise ValueError(f"label count {count} is not a multiple of {NUM_CLASSES}")
    rng = np.random.default_rng(seed)
    chosen = []
    for digit in range(NUM_CLASSES):
        members = np.flatnonzero(pool_y.numpy() == digit)
        if len(members) < count // NUM_CLASSES:
            raise ValueError(f"the pool has only {len(members)} images of digit {digit}")
        chosen.append(rng.choice(members, count // NUM_CLASSES, replace=False))
    return torch.from_numpy(np.concatenate(chosen))


def training_set(pool, unlabelled_x, count: int, seed: int, copies: int = 1):
    """(x, y, labelled): the ``count`` labelled pool images (each ``copies`` times, which
    weights their ELBO terms by ``copies``) then the unlabelled images."""
    if copies < 1:
        raise ValueError(f"label copies must be at least 1, not {copies}")
    chosen = balanced_labels(pool[1], count, seed).repeat(copies)
    x = torch.cat([pool[0][chosen], unlabelled_x])
    y = torch.cat([pool[1][chosen], torch.zeros(len(unlabelled_x), dtype=torch.long)])
    labelled = torch.cat([torch.ones(len(chosen), dtype=torch.bool),
                          torch.zeros(len(unlabelled_x), dtype=torch.bool)])
    return x, y, labelled


def unlabelled_inputs(x: torch.Tensor):
    """Model inputs with every label hidden (summed out)."""
    return x, torch.zeros(len(x), dtype=torch.long), torch.zeros(len(x), dtype=torch.bool)


def train_one(args, pool, unlabelled_x, count: int, seed: int):
    """Train one M2 model (or load its file from ``--models``): (fitted, fit seconds, whether
    the file was reused)."""
    train = training_set(pool, unlabelled_x, count, seed, args.label_copies)
    torch.manual_seed(seed)
    model, guide = build(args, train)
    copies = f"_copies{args.label_copies}" if args.label_copies > 1 else ""
    if args.guide == "amortize":
        copies += f"_amortized_alpha{args.classification_weight:g}"
    name = f"m2_labels{count}{copies}_seed{seed}.pt"
    path = args.models / name if args.models else None
    if path is not None and path.exists():
        fitted = LatentVariableModel.load(path, model, guide)
        return fitted, fitted.metadata_["fit_seconds"], True
    fitted = LatentVariableModel(model, guide)
    start = time.perf_counter()
    fitted.fit(train, objective=objective(args), epochs=args.epochs, batch_size=args.batch_size,
               learning_rate=args.learning_rate, seed=seed, progress=False, compile=args.compile)
    seconds = time.perf_counter() - start
    if path is not None:
        fitted.save(path, metadata={"fit_seconds": seconds}, include_training_state=False)
    return fitted, seconds, False


def labelled_images(pool, count: int, seed: int):
    """The run's labelled images and their labels (each once)."""
    chosen = balanced_labels(pool[1], count, seed)
    return pool[0][chosen], pool[1][chosen]


def classification_error(args, fitted, images, labels, seed: int):
    """Per-image 0/1 loss of the classifier (labels hidden from model and guide) and its
    per-image largest class probability: q(y | x) of the amortized guide, or the model's
    p(y | x) by importance sampling with the label enumerated."""
    inputs = unlabelled_inputs(images)
    if args.guide == "amortize":
        with torch.no_grad():
            probabilities = fitted.guide.class_probabilities(*inputs, site="y")
    else:
        probabilities = fitted.discrete_posterior(*inputs, site="y",
                                                  num_samples=args.posterior_samples, seed=seed)
    return (probabilities.argmax(-1) != labels).double(), probabilities.max(-1).values.double()


def measure(args, fitted, test, labelled, seed: int) -> dict:
    """Classification error on the held-out test set and on the run's own labelled images
    (shown without their labels), and the IS log p(x) of test images, labels summed out."""
    start = time.perf_counter()
    wrong, confidence = classification_error(args, fitted, test[0][: args.test_points],
                                 test[1][: args.test_points], seed)
    classify_seconds = time.perf_counter() - start
    train_wrong, _ = classification_error(args, fitted, *labelled, seed)
    start = time.perf_counter()
    result = fitted.evaluate(*unlabelled_inputs(test[0][: args.is_points]),
                             num_samples=args.is_samples, ks=(1,), seed=seed,
                             latent_diagnostics=False)
    log_px = np.asarray(result.per_datapoint["log_px"], dtype=np.float64)
    return {
        "error": float(wrong.mean()),
        "error_se": float(wrong.std() / math.sqrt(len(wrong))),
        "labelled_error": float(train_wrong.mean()),
        "confidence": float(confidence.mean()),
        "log_px": float(log_px.mean()),
        "log_px_se": float(log_px.std(ddof=1) / math.sqrt(len(log_px))),
        "mc_se": float(np.mean(result.per_datapoint["log_px_se"])),
        "elbo": float(np.mean(result.per_datapoint["elbo"])),
        "classify_seconds": classify_seconds,
        "is_seconds": time.perf_counter() - start,
    }


def between_seed(rows: list[dict]) -> tuple[float, float]:
    """Mean error over seeds and its between-seed standard error (nan for one seed)."""
    errors = np.array([r["error"] for r in rows])
    se = errors.std(ddof=1) / math.sqrt(len(errors)) if len(errors) > 1 else float("nan")
    return float(errors.mean()), float(se)


def parse_runs(text: str) -> list[tuple[int, int]]:
    """'100:0,100:1,3000:0' -> [(100, 0), (100, 1), (3000, 0)]."""
    try:
        runs = [tuple(int(v) for v in item.split(":")) for item in text.split(",")]
    except ValueError:
        runs = []
    if not runs or any(len(run) != 2 for run in runs):
        raise argparse.ArgumentTypeError(f"runs must look like 100:0,3000:0, not {text!r}")
    return runs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=parse_runs, default=parse_runs("100:0,100:1,100:2,3000:0"),
                   help="label-count:seed pairs")
    p.add_argument("--unlabelled", type=int, default=20000)
    p.add_argument("--label-copies", type=int, default=1,
                   help="repeat each labelled image this many times in the training set")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--latent", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--guide", choices=("amortize", "enumerate"), default="amortize",
                   help="amortize: q(y|x) q(z|x,y) with the classification term; enumerate:"
                        " the label summed out in the model, ELBO only")
    p.add_argument("--classification-weight", type=float, default=46.0,
                   help="alpha of alpha * log q(y_obs | x) (--guide amortize)")
    p.add_argument("--objective", default=None,
                   help="default: traceenum_elbo (amortize) or trace_meanfield_elbo")
    p.add_argument("--compile", default="none",
                   help="auto falls back to eager Pyro here (the obs_mask site does not trace)")
    p.add_argument("--test-points", type=int, default=POOL_SIZE,
                   help="held-out test images classified (the first of them)")
    p.add_argument("--posterior-samples", type=int, default=10)
    p.add_argument("--is-points", type=int, default=500)
    p.add_argument("--is-samples", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--models", type=Path, default=None,
                   help="folder for the model files (reused when present)")
    p.add_argument("--data-dir", default=None)
    return p


def main(argv=None) -> list[dict]:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.models is not None:
        args.models.mkdir(parents=True, exist_ok=True)
    pool, test, unlabelled_x = split_data(args.data_dir, args.unlabelled)
    print(f"torch {torch.__version__}, pyro {pyro.__version__}, threads {torch.get_num_threads()}")
    print(f"data: {len(unlabelled_x)} unlabelled training images, labelled pool {len(pool[0])}"
          f" and held-out test {len(test[0])} (halves of the labelled test split)")
    if args.guide == "amortize":
        classifier = (f"guide q(y|x) q(z|x,y), alpha {args.classification_weight:g};"
                      " classifier q(y|x)")
    else:
        classifier = ("label enumerated in the model; classifier p(y|x) by IS with"
                      f" K = {args.posterior_samples}")
    print(f"M2: latent {args.latent}, hidden {args.hidden}, {objective(args)},"
          f" {args.epochs} epochs, batch {args.batch_size}, lr {args.learning_rate},"
          f" each labelled image {args.label_copies} time(s) in the training set; {classifier}"
          f" on {min(args.test_points, len(test[0]))} test images;"
          f" log p(x) by IS with K = {args.is_samples} on"
          f" {args.is_points} test images")
    started = time.perf_counter()
    trained = []
    for count, seed in args.runs:
        fitted, seconds, reused = train_one(args, pool, unlabelled_x, count, seed)
        last = fitted.history_.column("train_elbo")[-1]
        print(f"labels {count:5d} seed {seed}: {'file reused, ' if reused else ''}trained in"
              f" {seconds:.0f} s, last epoch's training objective {last:.2f}", flush=True)
        trained.append((count, seed, fitted, seconds))
    rows = []
    for count, seed, fitted, seconds in trained:
        row = {"labels": count, "seed": seed, "fit_seconds": seconds,
               **measure(args, fitted, test, labelled_images(pool, count, seed), seed)}
        rows.append(row)
        print(f"labels {count:5d} seed {seed}: error {100 * row['error']:.2f}%"
              f" (SE {100 * row['error_se']:.2f}; on its own labelled images with the labels"
              f" hidden {100 * row['labelled_error']:.2f}%; mean max class probability"
              f" {row['confidence']:.2f}), log p(x) {row['log_px']:.2f}"
              f" (SE {row['log_px_se']:.2f} over images, MC SE {row['mc_se']:.3f}),"
              f" ELBO {row['elbo']:.2f}; classify {row['classify_seconds']:.0f} s,"
              f" IS {row['is_seconds']:.0f} s", flush=True)
    for count in sorted({r["labels"] for r in rows}):
        group = [r for r in rows if r["labels"] == count]
        mean, se = between_seed(group)
        log_px = np.array([r["log_px"] for r in group])
        log_px_se = log_px.std(ddof=1) / math.sqrt(len(log_px)) if len(log_px) > 1 else math.nan
        print(f"summary labels {count}: {len(group)} seed(s), error {100 * mean:.2f}%"
              f" (between-seed SE {100 * se:.2f}), log p(x) {log_px.mean():.2f}"
              f" (between-seed SE {log_px_se:.2f})")
    print(f"total wall time {time.perf_counter() - started:.0f} s")
    return rows


if __name__ == "__main__":
    main()
