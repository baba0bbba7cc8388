"""Compare two fitted models: paired importance-sampling and AIS differences, and how to
report them (docs/tutorials/compare_models.md). Runs in about a minute on one CPU thread."""

import time

import numpy as np
import torch

from pyrovae import VAE
from pyrovae.data import load_digits, threshold
from pyrovae.evaluation.ais import ais
from pyrovae.evaluation.comparison import compare

torch.set_num_threads(1)
digits = load_digits()
test = threshold(digits.test)  # one fixed preparation of the 250 test images, for both models

# Two models of the same architecture, fitted by different objectives, one seed each.
models = {}
for name, objective, particles in (("vae", "trace_meanfield_elbo", 1), ("iwae5", "iwae", 5)):
    model = VAE(num_features=64, latent_dim=8, hidden_sizes=(128,), seed=0)
    model.fit(digits.train, digits.valid, binarize="dynamic", epochs=30, batch_size=64,
              objective=objective, num_particles=particles, seed=0, progress=False)
    models[name] = model

# 1. Importance sampling: the same images and the same seed for both models.
results = {name: model.evaluate(test, num_samples=1000, seed=0) for name, model in models.items()}
for name, result in results.items():
    khat = result.per_datapoint["khat"]
    print(f"{name}: k-hat > 0.5 for {np.mean(khat > 0.5):.1%} of the images, "
          f"> 0.7 for {np.mean(khat > 0.7):.1%}")
print()
comparison = compare(results, test)
print(comparison.table())
is_difference = comparison.difference("iwae5", "vae")

# 2. AIS on the first 50 test images, from each model's guide (a better estimate of each
#    log p(x), whose bias depends less on the guide), then the same paired comparison.
points = 50
ais_log_px = {}
for name, model in models.items():
    started = time.perf_counter()
    run = ais(model.model, model.guide, model.inputs(test[:points])[0],
              num_steps=200, num_chains=16, seed=0)
    seconds = time.perf_counter() - started
    ais_log_px[name] = run.log_px
    print(f"\nAIS {name}, T=200, 16 chains, {points} images: {seconds / points * 5:.2f} s per "
          f"image per 1000 steps (one thread)")

rng = np.random.default_rng(0)
for name in models:
    correction = ais_log_px[name] - results[name].per_datapoint["log_px"][:points]
    means = correction[rng.integers(0, points, (10000, points))].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    print(f"{name}: AIS - IS on the same {points} images: mean {correction.mean():.3f}, "
          f"95% bootstrap interval [{low:.3f}, {high:.3f}]")

ais_comparison = compare(ais_log_px)
ais_difference = ais_comparison.difference("iwae5", "vae")
is_same_images = compare({n: r.per_datapoint["log_px"][:points] for n, r in results.items()})
is_difference_50 = is_same_images.difference("iwae5", "vae")

# 3. The report: estimate, paired SE, what it was measured on, and what it does not cover.
print("\nreport:")
for label, row, where in (
    ("IS, K=1000", is_difference, f"all {len(test)} test images"),
    ("IS, K=1000", is_difference_50, f"first {points} test images"),
    ("AIS, T=200", ais_difference, f"first {points} test images"),
):
    print(f"  iwae5 - vae by {label}, {where}: {row['difference']:.3f}, paired SE "
          f"{row['paired_se']:.3f} (unpaired {row['unpaired_se']:.3f})")
print("  one training seed per model: these SEs cover test images and Monte Carlo draws, "
      "not training runs")
