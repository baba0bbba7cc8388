"""Tutorial 1: fit a VAE to the 8x8 digits and read its bounds.

Run from anywhere (about 20 s on one CPU thread; nothing is written to disk)::

    python docs/tutorials/fit_vae_digits.py

Every number printed is in nats per data point. Bounds are lower bounds on log p(x), so
higher is better, and the gap log p_hat(x) - ELBO estimates KL(q(z|x) || p(z|x)).
"""

import math

import torch

from pyrovae import VAE
from pyrovae.data import binarize, load_digits

# -- 1. Data ----------------------------------------------------------------------------------
# scikit-learn's 1797 handwritten digits, 8x8 grey levels scaled to [0, 1], split 1297 / 250
# / 250 by a fixed permutation. A Bernoulli likelihood needs binary pixels: training draws a
# fresh binarization x ~ Bernoulli(grey level) for every batch ("dynamic"); for evaluation we
# fix one draw of the test images, so that every bound below refers to the same data.
digits = load_digits()
test = binarize(digits.test, generator=torch.Generator().manual_seed(1))
print(f"data: {len(digits.train)} train, {len(digits.valid)} valid, {len(test)} test images")

# -- 2. Model and fit -------------------------------------------------------------------------
# p(z) = N(0, I_8); p(x|z) = prod_d Bernoulli(x_d | sigmoid(l_d(z))) with a one-hidden-layer
# decoder; q(z|x) = N(mu(x), diag sigma(x)^2) with the mirror-image encoder. fit() runs SVI
# with Pyro's Trace_ELBO (one draw of z per data point and step) and Adam. VAE(seed=0) fixes
# the initial weights; fit(seed=0) the data order, the binarizations and the draws of z.
vae = VAE(num_features=64, latent_dim=8, hidden_sizes=(128,), likelihood="bernoulli", seed=0)
history = vae.fit(
    digits.train,
    digits.valid,
    binarize="dynamic",
    objective="trace_elbo",
    epochs=20,
    batch_size=64,
    learning_rate=1e-3,
    seed=0,
    device="cpu",
    progress=False,
)
last = history.records[-1]
print(
    f"after {last['epoch']} epochs: train ELBO {last['train_elbo']:.2f}, "
    f"valid ELBO {last['valid_elbo']:.2f} nats per image"
)

# -- 3. Bounds on the test images --------------------------------------------------------------
# K = 1000 draws z_k ~ q(z|x) per image give the log importance weights
# w_k = log p(x, z_k) - log q(z_k|x). From the same draws evaluate() reports the ELBO (mean of
# w_k; and with the closed-form KL), IWAE_k for k = 1, 10, 100 (disjoint groups of k draws),
# log p_hat(x) = log (1/K) sum_k exp(w_k) = IWAE_K, and the gap log p_hat(x) - ELBO, each
# per image; the table shows their means and the standard errors of those means over the
# 250 images. Below it: the Monte Carlo standard error of log p_hat(x), the effective sample
# size of the weights, the share of images whose Pareto k-hat exceeds 0.7, and latent use.
# max_pairs fixes the blocks of images (max_pairs // K each) whose draws are seeded from
# `seed` and the block's index, so the output does not depend on the machine's memory.
result = vae.evaluate(test, num_samples=1000, ks=(1, 10, 100), seed=0, max_pairs=50_000)
print()
print(result.table())
print()

# -- 4. Reading the numbers --------------------------------------------------------------------
column = result.per_datapoint
means = {name: float(column[name].mean()) for name in ("elbo", "iwae_10", "iwae_100", "log_px")}
# Because the groups of 1, 10, 100 and 1000 draws are nested, Jensen's inequality orders
# these estimates for every single image, not only on average.
ordered = bool(
    (column["elbo"] <= column["iwae_10"] + 1e-9).all()
    and (column["iwae_10"] <= column["iwae_100"] + 1e-9).all()
    and (column["iwae_100"] <= column["log_px"] + 1e-9).all()
)
print(f"ELBO <= IWAE_10 <= IWAE_100 <= log p_hat for every test image: {ordered}")
print("mean bounds: " + ", ".join(f"{name} {value:.3f}" for name, value in means.items()) + " nats")
gap = column["gap"]
print(
    f"ELBO gap (estimates KL(q(z|x) || p(z|x))): mean {gap.mean():.3f} nats, "
    f"median {float(torch.as_tensor(gap).median()):.3f}, max {gap.max():.3f}"
)
print(
    f"Monte Carlo error of log p_hat: mean SE {column['log_px_se'].mean():.4f} nats, "
    f"much smaller than the spread between images ({column['log_px'].std():.2f} nats)"
)
# Comparisons on the same images are paired: the SE of a difference is the SE of the mean of
# the per-image differences, much smaller than sqrt(se_a^2 + se_b^2) (which would apply to
# two independent sets of images) because most of the image-to-image spread is shared.
print("differences between bounds on the same images (mean, paired SE, unpaired SE):")
for upper, lower in (("iwae_10", "elbo"), ("iwae_100", "iwae_10"), ("log_px", "iwae_100")):
    difference = column[upper] - column[lower]
    paired = difference.std(ddof=1) / len(difference) ** 0.5
    unpaired = (
        (column[upper].var(ddof=1) + column[lower].var(ddof=1)) / len(difference)
    ) ** 0.5
    print(
        f"  {upper} - {lower}: {difference.mean():.4f}, paired SE {paired:.4f}, "
        f"unpaired {unpaired:.3f}"
    )
share = result.share_high_khat
print(f"share of test images with Pareto k-hat > 0.7: {share:.3f}")
# log_px is plain importance sampling: k-hat > 0.5 already means infinite weight variance
# there. For K draws, Vehtari et al. (2024) put the limit for Pareto-smoothed estimates at
# min(1 - 1/log10 K, 0.7), 0.667 for K = 1000.
khat = column["khat"]
threshold = min(1 - 1 / math.log10(result.num_samples), 0.7)
print(
    f"share with k-hat > 0.5: {(khat > 0.5).mean():.3f}; "
    f"with k-hat > {threshold:.3f}: {(khat > threshold).mean():.3f}"
)
use = result.latent["z"]
print(
    f"active units: {use.active_units} of {len(use.mean_variance)} latent dimensions "
    f"(Cov_x E[z_d|x] > 0.01); KL per dimension, nats: "
    + " ".join(f"{value:.2f}" for value in use.kl_per_dim)
)
