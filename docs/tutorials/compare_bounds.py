"""Tutorial 3: compare bounds on a trained model and read the PSIS diagnostics.

Part 1 fits a small VAE to the 8x8 digits and compares the ELBO, IWAE_k for growing k and
log p_hat(x) on the test images, with the delta-method prediction of their spacing. Part 2
sorts the test images by Pareto k-hat and checks the reported Monte Carlo standard errors
against a second, independent evaluation. Part 3 repeats the exercise on a linear-Gaussian
model, where log p(x) is known exactly, with guides that are too wide, right, and too narrow.

Run from anywhere (about 25 s on two CPU cores; nothing is written to disk)::

    python docs/tutorials/compare_bounds.py
"""

import numpy as np
import torch

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
first = vae.evaluate(test, num_samples=K, ks=KS, seed=0)
column = first.per_datapoint
log_px = column["log_px"]
# Relative variance of the weights, V = Var(w) / p(x)^2, estimated per image from its own
# K weights as K / ESS - 1. The delta method predicts E[log p_hat_k] = log p(x) - V / (2k)
# + O(1/k^2), so IWAE_k should sit about V/(2k) - V/(2K) below log p_hat_K.
relative_variance = K / column["ess"] - 1
print(f"Part 1: VAE on the digits, {len(log_px)} test images, K = {K} draws each")
print(f"  {'bound':<14}{'mean':>10}{'below log p_hat':>17}{'delta method':>14}")
print(f"  {'ELBO':<14}{column['elbo'].mean():>10.3f}{(log_px - column['elbo']).mean():>17.3f}")
for k in KS:
    below = (log_px - column[f"iwae_{k}"]).mean()
    predicted = np.median(relative_variance) * (1 / (2 * k) - 1 / (2 * K))
    print(f"  {f'IWAE_{k}':<14}{column[f'iwae_{k}'].mean():>10.3f}{below:>17.3f}{predicted:>14.3f}")
print(f"  {'log p_hat':<14}{log_px.mean():>10.3f}{0.0:>17.3f}")
print(f"  median estimated V = K/ESS - 1: {np.median(relative_variance):.2f}")
print("  (delta-method column: median V times (1/2k - 1/2K); it needs V/k small)")
print()

# -- Part 2: Pareto k-hat and whether the standard errors can be trusted -----------------------
# A second evaluation with other draws gives an independent log p_hat per image. If the
# reported standard errors are right, z = (a - b) / sqrt(se_a^2 + se_b^2) is roughly N(0, 1).
second = vae.evaluate(test, num_samples=K, ks=(1,), seed=1, latent_diagnostics=False)
khat = column["khat"]
z = (log_px - second.per_datapoint["log_px"]) / np.sqrt(
    column["log_px_se"] ** 2 + second.per_datapoint["log_px_se"] ** 2
)
print("Part 2: Pareto k-hat of the importance weights, per test image")
print(
    "  k-hat quantiles (10%, 50%, 90%, max): "
    + ", ".join(f"{q:.2f}" for q in np.quantile(khat, [0.1, 0.5, 0.9, 1.0]))
)
print(f"  {'k-hat':<12}{'images':>7}{'median ESS':>12}{'mean SE':>9}{'RMS z':>7}{'mean gap':>10}")
for name, low, high in (("< 0.5", -np.inf, 0.5), ("0.5 to 0.7", 0.5, 0.7), ("> 0.7", 0.7, np.inf)):
    chosen = (khat > low) & (khat <= high)
    ess, se, rms_z, gap = (
        (
            np.median(column["ess"][chosen]),
            column["log_px_se"][chosen].mean(),
            np.sqrt(np.mean(z[chosen] ** 2)),
            column["gap"][chosen].mean(),
        )
        if chosen.any()
        else (np.nan,) * 4  # no image in this class
    )
    print(f"  {name:<12}{int(chosen.sum()):>7}{ess:>12.0f}{se:>9.4f}{rms_z:>7.2f}{gap:>10.3f}")
correlation = np.corrcoef(khat, column["gap"])[0, 1]
print(f"  correlation of k-hat with the ELBO gap: {correlation:.2f}")
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
    f"  {'guide scale':<12}{'exact V':>10}{'share k>0.7':>12}{'mean SE':>9}"
    f"{'RMS error':>10}{'mean error':>11}"
)
for factor in (2.0, 1.0, 0.7, 0.5):
    guide = best.perturbed(scale_factor=factor)
    with torch.no_grad():
        variance = float(importance_weight_variance(model, guide, x).mean())
    result = evaluate(model, guide, x, num_samples=K, ks=(1,), seed=0, latent_diagnostics=False)
    error = result.per_datapoint["log_px"] - exact
    print(
        f"  {f'x {factor}':<12}{variance:>10.3g}{result.share_high_khat:>12.2f}"
        f"{result.per_datapoint['log_px_se'].mean():>9.4f}"
        f"{np.sqrt(np.mean(error**2)):>10.4f}{error.mean():>11.4f}"
    )
print("  (error = log p_hat - exact log p(x); a too-narrow guide has infinite V: its reported")
print("   SE is far below its actual error, and k-hat is what gives it away)")
