"""Tutorial 5: discrete latent variables, summed out exactly.

Two models whose log-likelihood is known in closed form, so that every estimate can be checked:

1. A Gaussian mixture written the Pyro way, with ``config_enumerate``: per data point a
   component y ~ Categorical(w), a latent z | y ~ N(mu_y, 1), an observation x | z ~ N(z, s^2).
   p(x) = sum_y w_y N(x; mu_y, 1 + s^2).
2. Kingma's M2 structure with labels observed for half of the points (``obs_mask``): y ~
   Categorical(pi) observed where labelled, z ~ N(0, I), x | y, z ~ N(z + b_y, s^2 I). For an
   unlabelled point p(x) = sum_y pi_y N(x; b_y, (1 + s^2) I); for a labelled one the joint
   p(x, y).

pyrovae enumerates the discrete site inside every importance weight (one variable per data
point), so fit, the objectives and evaluate need no guide for it; ``AmortizedGuide`` guides
only z. Run from anywhere (about 15 s on one CPU thread; nothing is written to disk)::

    python docs/tutorials/discrete_global.py
"""

import math

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.infer import config_enumerate

from pyrovae.models.autoguide import AmortizedGuide
from pyrovae.models.latent_variable import LatentVariableModel

torch.set_default_dtype(torch.float64)
NOISE = 0.5


# -- 1. A Gaussian mixture --------------------------------------------------------------------
WEIGHTS = torch.tensor([0.3, 0.7])
MEANS = torch.tensor([-2.0, 2.0])


@config_enumerate
def mixture(x):
    with pyro.plate("data", x.shape[0]):
        y = pyro.sample("y", dist.Categorical(WEIGHTS))
        z = pyro.sample("z", dist.Normal(MEANS[y], 1.0))
        pyro.sample("x", dist.Normal(z, NOISE), obs=x)


def mixture_log_px(x):
    components = dist.Normal(MEANS, math.sqrt(1 + NOISE**2)).log_prob(x[:, None])
    return torch.logsumexp(WEIGHTS.log() + components, -1)


def as_column(x):
    return x[:, None]


def mixture_study(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    y = torch.multinomial(WEIGHTS, 300, replacement=True)
    x = MEANS[y] + torch.randn(300) * math.sqrt(1 + NOISE**2)
    train, test = x[:200], x[200:]
    guide = AmortizedGuide(mixture, train[:4], encoder_input=as_column, hidden_sizes=(32,))
    fitted = LatentVariableModel(mixture, guide)
    fitted.fit(train, test, epochs=60, batch_size=50, learning_rate=1e-2, seed=seed,
               progress=False)
    result = fitted.evaluate(test, num_samples=2000, ks=(1, 20), seed=seed,
                             latent_diagnostics=False)
    difference = result.per_datapoint["log_px"] - mixture_log_px(test).numpy()
    return {
        "log_px": result.per_datapoint["log_px"].mean(),
        "exact": float(mixture_log_px(test).mean()),
        "difference": difference.mean(),
        "difference_se": difference.std(ddof=1) / math.sqrt(len(difference)),
        "elbo": result.per_datapoint["elbo"].mean(),
        "training_path": fitted.training_path_,
    }


# -- 2. M2 with partial labels ------------------------------------------------------------------
PRIOR = torch.tensor([0.2, 0.5, 0.3])
OFFSETS = torch.tensor([[-0.8, 0.0], [0.0, 0.8], [0.8, -0.4]])


def m2(x, y, labelled):
    with pyro.plate("data", x.shape[0]):
        label = pyro.sample("y", dist.Categorical(PRIOR), obs=y, obs_mask=labelled)
        z = pyro.sample("z", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
        pyro.sample("x", dist.Normal(z + OFFSETS[label], NOISE).to_event(1), obs=x)


def encode(x, y, labelled):
    """The guide sees the label where it is known, zeros elsewhere."""
    shown = torch.where(labelled[:, None], F.one_hot(y, 3), 0).to(x.dtype)
    return torch.cat([x, shown], -1)


def m2_exact(x, y, labelled):
    joint = PRIOR.log() + dist.Normal(OFFSETS, math.sqrt(1 + NOISE**2)).log_prob(
        x[:, None, :]
    ).sum(-1)
    return torch.where(labelled, joint[torch.arange(len(x)), y], torch.logsumexp(joint, -1))


def m2_study(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    y = torch.multinomial(PRIOR, 400, replacement=True)
    x = torch.randn(400, 2) * math.sqrt(1 + NOISE**2) + OFFSETS[y]
    labelled = torch.rand(400) < 0.5
    data = (x, y, labelled)
    train = tuple(t[:300] for t in data)
    test = tuple(t[300:] for t in data)
    guide = AmortizedGuide(m2, *(t[:4] for t in train), encoder_input=encode,
                           hidden_sizes=(32,))
    fitted = LatentVariableModel(m2, guide)
    fitted.fit(train, test, epochs=60, batch_size=50, learning_rate=1e-2, seed=seed,
               progress=False)
    result = fitted.evaluate(*test, num_samples=2000, ks=(1,), seed=seed,
                             latent_diagnostics=False)
    difference = result.per_datapoint["log_px"] - m2_exact(*test).numpy()
    unlabelled = ~test[2].numpy()
    return {
        "difference_unlabelled": difference[unlabelled].mean(),
        "se_unlabelled": difference[unlabelled].std(ddof=1) / math.sqrt(unlabelled.sum()),
        "difference_labelled": difference[~unlabelled].mean(),
        "se_labelled": difference[~unlabelled].std(ddof=1) / math.sqrt((~unlabelled).sum()),
        "guided_sites": [s.name for s in guide.sites],
    }


def main() -> None:
    torch.set_num_threads(1)
    mixture_numbers = mixture_study()
    print("1. Gaussian mixture (config_enumerate), 100 test points, K = 2000")
    print(f"   training path: {mixture_numbers['training_path']}")
    print(f"   exact log p(x):       {mixture_numbers['exact']:.4f} nats per point")
    print(f"   IS log p_hat(x):      {mixture_numbers['log_px']:.4f}")
    print(f"   difference:           {mixture_numbers['difference']:.4f}"
          f" (SE {mixture_numbers['difference_se']:.4f})")
    print(f"   ELBO:                 {mixture_numbers['elbo']:.4f}")
    m2_numbers = m2_study()
    print("2. M2 with half the labels observed, 100 test points, K = 2000")
    print(f"   guided sites: {m2_numbers['guided_sites']} (the label is enumerated)")
    print(f"   unlabelled: log p_hat(x) - exact = {m2_numbers['difference_unlabelled']:.4f}"
          f" (SE {m2_numbers['se_unlabelled']:.4f})")
    print(f"   labelled:   log p_hat(x, y) - exact = {m2_numbers['difference_labelled']:.4f}"
          f" (SE {m2_numbers['se_labelled']:.4f})")


if __name__ == "__main__":
    main()
