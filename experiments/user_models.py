"""Study: users' own Pyro models fitted with an automatically built amortized guide.

Two latent-variable models written as ordinary Pyro programs, each with local latent sites
in the plate ``"data"``:

* factor analysis with covariates: z_n ~ N(0, I_K), x_n | z_n, c_n ~ N(W z_n + B c_n + b,
  diag psi^2), on the 8x8 digits' grey levels with the digit label as covariate;
* Poisson matrix factorisation: theta_n ~ Gamma(2, 2)^K (positive loadings), x_n | theta_n ~
  Poisson(softplus(W theta_n + b)), on the digits' ink counts (grey level 0..16).

:class:`pyrovae.models.autoguide.AmortizedGuide` builds each guide from one trace of the
model; :class:`pyrovae.models.latent_variable.LatentVariableModel` fits it by SVI and
evaluates ELBO, IWAE_k and the importance-sampled log p(x) per data point.

Run::

    python experiments/user_models.py --epochs 30 --out runs/user_models
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

from pyrovae.data import load_digits  # noqa: E402
from pyrovae.models.autoguide import AmortizedGuide  # noqa: E402
from pyrovae.models.base import LocalParamsModule  # noqa: E402
from pyrovae.models.latent_variable import LatentVariableModel  # noqa: E402


class FactorAnalysisWithCovariates(LocalParamsModule):
    """x_n = W z_n + B c_n + b + noise, z_n ~ N(0, I), noise ~ N(0, diag psi^2)."""

    def __init__(self, num_features: int, latent_dim: int, num_covariates: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.loadings = nn.Parameter(0.1 * torch.randn(num_features, latent_dim))
        self.effects = nn.Parameter(torch.zeros(num_features, num_covariates))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.raw_noise = nn.Parameter(torch.zeros(num_features))

    def forward(self, x, covariates):
        with pyro.plate("data", x.shape[0]):
            prior = dist.Normal(x.new_zeros(self.latent_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior)
            mean = z @ self.loadings.T + covariates @ self.effects.T + self.bias
            noise = F.softplus(self.raw_noise) + 1e-3
            pyro.sample("x", dist.Normal(mean, noise).to_event(1), obs=x)


class PoissonFactorisation(LocalParamsModule):
    """x_nd ~ Poisson(softplus(sum_k W_dk theta_nk + b_d)), theta_nk ~ Gamma(2, 2)."""

    def __init__(self, num_features: int, latent_dim: int):
        super().__init__()
        self.latent_dim = latent_dim
        self.loadings = nn.Parameter(0.1 * torch.randn(num_features, latent_dim))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x):
        with pyro.plate("data", x.shape[0]):
            prior = dist.Gamma(x.new_full((self.latent_dim,), 2.0), 2.0).to_event(1)
            theta = pyro.sample("theta", prior)
            rate = F.softplus(theta @ self.loadings.T + self.bias) + 1e-3
            pyro.sample("x", dist.Poisson(rate).to_event(1), obs=x)


def concatenated(x, covariates):
    """Encoder input of the factor-analysis guide: pixels and covariates side by side."""
    return torch.cat([x, covariates], -1)


def factor_analysis(latent_dim: int = 5, seed: int = 0):
    digits = load_digits()
    covariates = [
        F.one_hot(labels, 10).float()
        for labels in (digits.train_labels, digits.valid_labels, digits.test_labels)
    ]
    data = list(zip((digits.train, digits.valid, digits.test), covariates, strict=True))
    torch.manual_seed(seed)
    model = FactorAnalysisWithCovariates(64, latent_dim, 10)
    guide = AmortizedGuide(model, *data[0], encoder_input=concatenated, hidden_sizes=(64,))
    return LatentVariableModel(model, guide), data


def poisson_factorisation(latent_dim: int = 4, seed: int = 0):
    digits = load_digits()
    data = [(torch.round(split * 16),) for split in (digits.train, digits.valid, digits.test)]
    torch.manual_seed(seed)
    model = PoissonFactorisation(64, latent_dim)
    guide = AmortizedGuide(model, *data[0], hidden_sizes=(64,))
    return LatentVariableModel(model, guide), data


STUDIES = {"factor_analysis": factor_analysis, "poisson_factorisation": poisson_factorisation}


def run(name: str, args) -> dict:
    fitted, (train, valid, test) = STUDIES[name](seed=args.seed)
    before = float(fitted.elbo(*test, num_samples=10, seed=args.seed).mean())
    history = fitted.fit(
        train,
        valid,
        epochs=args.epochs,
        batch_size=64,
        learning_rate=1e-2,
        seed=args.seed,
        progress=False,
    )
    result = fitted.evaluate(*test, num_samples=args.num_samples, ks=(1, 10, 100), seed=args.seed)
    summary = {row["quantity"]: row for row in result.summary()}
    return {
        "test_elbo_before": before,
        "epochs": len(history),
        **{f"test_{k}": v["mean"] for k, v in summary.items()},
        "test_log_px_se": summary["log_px"]["se"],
        "share_khat_above_0.7": result.share_high_khat,
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    results = {name: run(name, args) for name in STUDIES}
    text = json.dumps(results, indent=2)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
