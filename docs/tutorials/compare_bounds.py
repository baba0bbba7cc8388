"""Tutorial 3: compare bounds on a trained model and read the PSIS diagnostics.

Part 1 fits a small VAE to the 8x8 digits and compares the ELBO, IWAE_k for growing k and
log p_hat(x) on the test images, with the delta-method prediction of their spacing. Part 2
sorts the test images by Pareto k-hat, checks the reported Monte Carlo standard errors
against a second, independent evaluation, and measures how noisy k-hat itself is. Part 3
repeats the exercise on a linear-Gaussian model, where log p(x) is known exactly, with
guides that are too wide, right, and too narrow.

Every comparison of two numbers on the same points comes with a paired standard error: the
standard error of the mean of the per-point differences, sd(d_n) / sqrt(N).

Run from anywhere (about 40 s on one CPU thread; nothing is written to disk)::

    python docs/tutorials/compare_bounds.py
"""

import numpy as np
import torch
from scipy.stats import chi2

from pyrovae import VAE
from pyrovae.data import binarize, load_digits
from pyrovae.evaluation.importance import evaluate
from pyrovae.models.linear_gaussian import (
    LinearGaussianGuide,
    LinearGaussianModel,
    importance_weight_variance,
)

K = 2000  # draws z_k ~ q(z|x) per data point
KS = (1, 2, 5, 10, 50, 200, 1000)  # each divides K: the groups are nested

# -- Part 1: bounds of a trained VAE ------------------------------------------------------------
digits = load_digits()
test = binarize(digits.test, generator=torch.Generator().manual_seed(1))
vae = VAE(num_features=64, latent_dim=8, hidden_sizes=(128,), likelihood="bernoulli", seed=0)
vae.fit(
    digits.train,
    binarize="dynamic",
    epochs=20,
    batch_size=64,
    seed=0,
    device="cpu",
    progress=False,
)
# The data points are evaluated in blocks of max_pairs // K, each block's draws seeded from
# `seed` and the block's index: fixing max_pairs (below the memory budget's own limit) makes
# the draws, and so every number printed, independent of the machine's memory.
MAX_PAIRS = 50_000
first = vae.evaluate(test, num_samples=K, ks=KS, seed=0, max_pairs=MAX_PAIRS)
column = first.per_datapoint
log_px = column["log_px"]


def mean_se(values):
    """Mean over data points and its standard error, sd / sqrt(N). Applied to per-point
    differences between two estimates on the same points, this is the paired SE."""
    values = np.asarray(values, dtype=float)
    return values.mean(), values.std(ddof=1) / np.sqrt(len(values))


# Relative variance of the weights, V_n = Var(w) / p(x_n)^2, estimated per image from its
# own K weights as K / ESS_n - 1. The delta method predicts E[log p_hat_k] = log p(x) - V/(2k)
# + O(1/k^2) for each image, so IWAE_k should sit about V_n (1/2k - 1/2K) below log p_hat_K.
# The mean over images of that distance is predicted by the mean of V_n (not its median).
relative_variance = K / column["ess"] - 1
print(f"Part 1: VAE on the digits, {len(log_px)} test images, K = {K} draws each")
print(
    f"  {'bound':<11}{'mean':>9}{'below log p_hat':>16}{'SE':>8}"
    f"{'delta method':>13}{'obs - pred':>11}{'SE':>8}{'obs / pred':>11}"
)
below, se = mean_se(log_px - column["elbo"])
print(f"  {'ELBO':<11}{column['elbo'].mean():>9.3f}{below:>16.4f}{se:>8.4f}")
for k in KS:
    distance = log_px - column[f"iwae_{k}"]
    predicted = relative_variance * (1 / (2 * k) - 1 / (2 * K))
    below, se = mean_se(distance)
    miss, miss_se = mean_se(distance - predicted)
    print(
        f"  {f'IWAE_{k}':<11}{column[f'iwae_{k}'].mean():>9.3f}{below:>16.4f}{se:>8.4f}"
        f"{predicted.mean():>13.4f}{miss:>11.4f}{miss_se:>8.4f}{below / predicted.mean():>11.2f}"
    )
print(f"  {'log p_hat':<11}{log_px.mean():>9.3f}")
print(
    f"  V_n = K/ESS_n - 1 per image: mean {relative_variance.mean():.2f}, "
    f"median {np.median(relative_variance):.2f}"
)
print("  (delta method: mean over images of V_n (1/2k - 1/2K), which needs V_n/k small;")
print("   SE columns: paired standard errors over the images)")
print()

# -- Part 2: Pareto k-hat and whether the standard errors can be trusted -----------------------
# A second evaluation with other draws gives an independent log p_hat per image. If the
# reported standard errors are right, z = (a - b) / sqrt(se_a^2 + se_b^2) is roughly N(0, 1).
second = vae.evaluate(
    test, num_samples=K, ks=(1,), seed=1, max_pairs=MAX_PAIRS, latent_diagnostics=False
)
khat = column["khat"]
z = (log_px - second.per_datapoint["log_px"]) / np.sqrt(
    column["log_px_se"] ** 2 + second.per_datapoint["log_px_se"] ** 2
)
CLASSES = (("< 0.5", -np.inf, 0.5), ("0.5 to 0.7", 0.5, 0.7), ("> 0.7", 0.7, np.inf))
print("Part 2: Pareto k-hat of the importance weights, per test image")
print(
    "  k-hat quantiles (10%, 50%, 90%, max): "
    + ", ".join(f"{q:.2f}" for q in np.quantile(khat, [0.1, 0.5, 0.9, 1.0]))
)
print(
    f"  {'k-hat':<12}{'images':>7}{'median ESS':>12}{'mean SE':>9}{'RMS z':>7}"
    f"{'if SE honest':>14}{'mean gap':>10}{'SE':>7}"
)
for name, low, high in CLASSES:
    chosen = (khat > low) & (khat <= high)
    n = int(chosen.sum())
    ess, se, rms_z, gap, gap_se = (
        (
            np.median(column["ess"][chosen]),
            column["log_px_se"][chosen].mean(),
            np.sqrt(np.mean(z[chosen] ** 2)),
            *mean_se(column["gap"][chosen]),
        )
        if n > 1
        else (np.nan,) * 5  # fewer than two images in this class: no standard error
    )
    # If the SEs are honest, n RMS(z)^2 ~ chi^2_n: the central 95% range of RMS z.
    honest = np.sqrt(chi2.ppf([0.025, 0.975], max(n, 1)) / max(n, 1))
    print(
        f"  {name:<12}{n:>7}{ess:>12.0f}{se:>9.4f}{rms_z:>7.2f}"
        f"{f'{honest[0]:.2f}-{honest[1]:.2f}':>14}{gap:>10.3f}{gap_se:>7.3f}"
    )
# Different images fall in different classes: their gaps are compared unpaired (Welch).
low_gap = column["gap"][khat <= 0.5]
mid_gap = column["gap"][(khat > 0.5) & (khat <= 0.7)]
difference = mid_gap.mean() - low_gap.mean()
difference_se = np.sqrt(low_gap.var(ddof=1) / len(low_gap) + mid_gap.var(ddof=1) / len(mid_gap))
print(
    f"  mean gap, k-hat 0.5 to 0.7 minus k-hat < 0.5: {difference:.3f} "
    f"(SE {difference_se:.3f}, unpaired)"
)
correlation = np.corrcoef(khat, column["gap"])[0, 1]
half_width = 1.96 / np.sqrt(len(khat) - 3)  # Fisher's z transform
low, high = np.tanh(np.arctanh(correlation) + np.array([-half_width, half_width]))
print(
    f"  correlation of k-hat with the ELBO gap: {correlation:.2f} "
    f"(95% interval {low:.2f} to {high:.2f})"
)
# For plain importance sampling (what log_px is) k > 0.5 already means infinite variance;
# the PSIS paper's threshold for Pareto-smoothed estimates depends on K.
threshold = min(1 - 1 / np.log10(K), 0.7)
print(
    f"  share with k-hat > 0.5: {np.mean(khat > 0.5):.3f}; > min(1 - 1/log10 K, 0.7) = "
    f"{threshold:.3f}: {np.mean(khat > threshold):.3f}"
)
# k-hat is itself an estimate, from the largest ~3 sqrt(K) weights: compare the two runs.
other = second.per_datapoint["khat"]
noise = np.std(khat - other, ddof=1) / np.sqrt(2)
classes = np.digitize(khat, [0.5, 0.7], right=True)
other_classes = np.digitize(other, [0.5, 0.7], right=True)
print(
    f"  k-hat of two independent evaluations: correlation {np.corrcoef(khat, other)[0, 1]:.2f};"
    f" noise of one k-hat {noise:.3f}"
)
print(
    f"  (sd of the differences / sqrt 2); {int(np.sum(classes != other_classes))} of "
    f"{len(khat)} images change k-hat class between the two"
)
print()

# -- Part 3: an exact model, and guides of the wrong width ------------------------------------
# Factor analysis with D = 10 features and L = 3 factors: log p(x) is known in closed form,
# and so is V (finite only if 2 Lambda - Q is positive definite, Lambda and Q the posterior
# and guide precisions). The best diagonal Gaussian guide is widened or narrowed.
model = LinearGaussianModel.random(num_features=10, latent_dim=3, seed=0)
x = model.sample_data(200, seed=1)
exact = model.log_marginal(x).detach().numpy()
best = LinearGaussianGuide.optimal_for(model)
print("Part 3: factor analysis, exact log p(x) known; 200 data points, K = 2000")
print(
    f"  {'guide scale':<12}{'exact V':>8}{'ESS':>6}{'k>0.5':>7}{'k>0.7':>7}{'mean SE':>9}"
    f"{'RMS error':>10}{'mean error':>11}{'SE':>7}"
)
for factor in (2.0, 1.0, 0.7, 0.5):
    guide = best.perturbed(scale_factor=factor)
    with torch.no_grad():
        variance = float(importance_weight_variance(model, guide, x).mean())
    result = evaluate(
        model,
        guide,
        x,
        num_samples=K,
        ks=(1,),
        seed=0,
        max_pairs=MAX_PAIRS,
        latent_diagnostics=False,
    )
    error = result.per_datapoint["log_px"] - exact
    bias, bias_se = mean_se(error)  # paired: estimate and truth on the same points
    print(
        f"  {f'x {factor}':<12}{variance:>8.3g}{np.median(result.per_datapoint['ess']):>6.0f}"
        f"{np.mean(result.per_datapoint['khat'] > 0.5):>7.2f}"
        f"{result.share_high_khat:>7.2f}{result.per_datapoint['log_px_se'].mean():>9.4f}"
        f"{np.sqrt(np.mean(error**2)):>10.4f}{bias:>11.4f}{bias_se:>7.4f}"
    )
print("  (ESS: median Kish effective sample size of the K draws; error = log p_hat - exact")
print("   log p(x), per point; SE: paired standard error of the mean error. A too-narrow")
print("   guide has infinite V: its reported SE understates its actual error)")
