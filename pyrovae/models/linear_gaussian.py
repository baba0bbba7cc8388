"""An exact reference model: linear-Gaussian factor analysis (probabilistic PCA when the
noise is isotropic), written as an ordinary Pyro model, with an amortized Gaussian guide.

Generative model, for each data point n (site names in quotes, inside the plate ``"data"``)::

    "z":  z_n ~ Normal(0, I_L)
    "x":  x_n | z_n ~ Normal(W z_n + b, diag(psi^2))

Everything a general-purpose estimator can only approximate is known here in closed form:
the marginal p(x) = N(b, W W^T + diag(psi^2)), the posterior p(z | x) = N(mu(x), Sigma), and
the KL divergence from any Gaussian guide to that posterior, and every moment of the
normalized importance weights p(z|x) / q(z|x). That makes the model a ground truth for the
importance-sampled bounds of :mod:`pyrovae.evaluation`: E[ELBO] = log p(x) - KL(q(z|x) ||
p(z|x)) exactly, log p_hat(x) has standard error ~ sqrt(V / K) and IWAE_k has bias
~ V / (2k), with V the exact variance of the normalized weights.

Units: log densities and KL divergences are in nats, per data point. All computations use
the dtype and device of the parameters (use float64 for reference values).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import MultivariateNormal

from pyrovae.models.base import LocalParamsModule
from pyrovae.models.vae import DATA_PLATE


def _generator(seed: int | None, generator: torch.Generator | None) -> torch.Generator | None:
    """A generator from a seed, the given generator, or ``None`` (torch's global RNG)."""
    if seed is not None and generator is not None:
        raise ValueError("pass either seed or generator, not both")
    if seed is not None:
        return torch.Generator().manual_seed(seed)
    return generator


def _inverse_softplus(value: torch.Tensor) -> torch.Tensor:
    """y with softplus(y) = value, for value > 0 (stable for small and large values)."""
    return value + torch.log(-torch.expm1(-value))


def _cholesky_logdet(tril: torch.Tensor) -> torch.Tensor:
    """log det(L L^T) from a Cholesky factor L of shape (..., L, L)."""
    return 2.0 * tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def gaussian_kl(
    q_loc: torch.Tensor, q_cov: torch.Tensor, p_loc: torch.Tensor, p_cov: torch.Tensor
) -> torch.Tensor:
    """Closed-form KL(N(q_loc, q_cov) || N(p_loc, p_cov)) between full-covariance Gaussians.

    KL = 0.5 [tr(P^-1 Q) + (mu_p - mu_q)^T P^-1 (mu_p - mu_q) - L + log det P - log det Q],
    computed with Cholesky factors and triangular solves (no explicit inverse).

    Parameters
    ----------
    q_loc, p_loc : torch.Tensor of shape (..., L)
        Means; leading dimensions broadcast against each other and the covariances' batch.
    q_cov, p_cov : torch.Tensor of shape (..., L, L)
        Symmetric positive-definite covariances, e.g. one (L, L) matrix shared by a batch.

    Returns
    -------
    torch.Tensor of shape (...)
        The KL divergence in nats, one value per broadcast batch element.
    """
    dim = q_loc.shape[-1]
    for name, value in (("p_loc", p_loc), ("q_cov", q_cov), ("p_cov", p_cov)):
        if value.shape[-1] != dim or (name.endswith("cov") and value.shape[-2] != dim):
            raise ValueError(f"{name} has shape {tuple(value.shape)}; the event size is {dim}")
    q_tril = torch.linalg.cholesky(q_cov)
    p_tril = torch.linalg.cholesky(p_cov)
    # tr(P^-1 Q) = || L_p^-1 L_q ||_F^2
    trace = torch.linalg.solve_triangular(p_tril, q_tril, upper=False).pow(2).sum((-2, -1))
    # (mu_p - mu_q)^T P^-1 (mu_p - mu_q) = || L_p^-1 (mu_p - mu_q) ||^2
    diff = (p_loc - q_loc).unsqueeze(-1)
    batch = torch.broadcast_shapes(diff.shape[:-2], p_tril.shape[:-2])
    whitened = torch.linalg.solve_triangular(
        p_tril.expand(*batch, dim, dim), diff.expand(*batch, dim, 1), upper=False
    )
    mahalanobis = whitened.pow(2).sum((-2, -1))
    log_det_ratio = _cholesky_logdet(p_tril) - _cholesky_logdet(q_tril)
    return 0.5 * (trace + mahalanobis - dim + log_det_ratio)


class LinearGaussianModel(LocalParamsModule):
    """Factor analysis as a Pyro model: z ~ N(0, I_L), x | z ~ N(W z + b, diag(psi^2)).

    ``forward(x)`` scores data x of shape (N, D) (sites ``"z"`` and ``"x"`` inside the plate
    ``"data"``); ``forward(None, num_samples=n)`` generates n data points.

    Parameters
    ----------
    weight : torch.Tensor of shape (D, L)
        Loading matrix W (units of x per unit of z).
    bias : torch.Tensor of shape (D,)
        Mean b of x (units of x).
    noise_scale : torch.Tensor of shape (D,)
        Observation noise standard deviation psi per feature (units of x), positive.

    All three are stored as ``torch.nn.Parameter`` s (copies) named ``weight``, ``bias`` and
    ``noise_scale``, so the model can be trained or differentiated; keep ``noise_scale``
    positive when training it.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, noise_scale: torch.Tensor):
        super().__init__()
        weight, bias, noise_scale = (torch.as_tensor(v) for v in (weight, bias, noise_scale))
        if weight.dim() != 2 or bias.shape != weight.shape[:1] or noise_scale.shape != bias.shape:
            raise ValueError(
                "expected weight (D, L), bias (D,) and noise_scale (D,), got "
                f"{tuple(weight.shape)}, {tuple(bias.shape)} and {tuple(noise_scale.shape)}"
            )
        if not bool((noise_scale > 0).all()):
            raise ValueError("noise_scale must be positive")
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone().to(weight))
        self.noise_scale = nn.Parameter(noise_scale.detach().clone().to(weight))

    @classmethod
    def random(
        cls,
        num_features: int,
        latent_dim: int,
        noise_scale: float | torch.Tensor | None = None,
        seed: int | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float64,
    ) -> LinearGaussianModel:
        """A random instance: W and b with standard normal entries.

        Parameters
        ----------
        num_features, latent_dim : int
            D and L.
        noise_scale : float or torch.Tensor of shape (D,), optional
            psi; by default drawn uniformly from [0.3, 1.0) per feature (heteroscedastic, so
            that the posterior covariance is not diagonal in general).
        seed, generator : optional
            Source of randomness (one of them); torch's global RNG when both are omitted.
        dtype : torch.dtype
            Dtype of the parameters (float64 by default, for reference computations).
        """
        rng = _generator(seed, generator)
        weight = torch.randn(num_features, latent_dim, generator=rng, dtype=dtype)
        bias = torch.randn(num_features, generator=rng, dtype=dtype)
        if noise_scale is None:
            noise_scale = 0.3 + 0.7 * torch.rand(num_features, generator=rng, dtype=dtype)
        noise_scale = torch.as_tensor(noise_scale, dtype=dtype).expand(num_features)
        return cls(weight, bias, noise_scale)

    @property
    def num_features(self) -> int:
        """D, the dimension of x."""
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        """L, the dimension of z."""
        return self.weight.shape[1]

    def prior(self) -> dist.TorchDistribution:
        """p(z) = N(0, I_L), event dimension 1, in the parameters' dtype and device."""
        zero = self.weight.new_zeros(())
        return dist.Normal(zero, zero + 1.0).expand([self.latent_dim]).to_event(1)

    def observation(self, z: torch.Tensor) -> dist.TorchDistribution:
        """p(x | z) = N(W z + b, diag(psi^2)) for z of shape (..., L); event dimension 1."""
        return dist.Normal(z @ self.weight.T + self.bias, self.noise_scale).to_event(1)

    def forward(self, x: torch.Tensor | None = None, num_samples: int | None = None):
        size = x.shape[0] if x is not None else num_samples
        with pyro.plate(DATA_PLATE, size):
            z = pyro.sample("z", self.prior())
            return pyro.sample("x", self.observation(z), obs=x)

    def marginal_covariance(self) -> torch.Tensor:
        """Cov(x) = W W^T + diag(psi^2), shape (D, D), in squared units of x."""
        return self.weight @ self.weight.T + torch.diag(self.noise_scale**2)

    def marginal(self) -> MultivariateNormal:
        """The exact marginal p(x) = N(b, W W^T + diag(psi^2)), event shape (D,)."""
        return MultivariateNormal(self.bias, covariance_matrix=self.marginal_covariance())

    def log_marginal(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log p(x) in nats for x of shape (N, D); returns shape (N,)."""
        return self.marginal().log_prob(x)

    def posterior_precision(self) -> torch.Tensor:
        """Lambda = I + W^T diag(psi^-2) W, the precision of p(z | x), shape (L, L)."""
        scaled = self.weight / self.noise_scale.unsqueeze(-1)
        return torch.eye(self.latent_dim).to(scaled) + scaled.T @ scaled

    def posterior_covariance(self) -> torch.Tensor:
        """Sigma = Lambda^-1, the covariance of p(z | x) (the same for every x), shape (L, L)."""
        return torch.cholesky_inverse(torch.linalg.cholesky(self.posterior_precision()))

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """mu(x) = Sigma W^T diag(psi^-2) (x - b) for x of shape (N, D); returns (N, L)."""
        projected = ((x - self.bias) / self.noise_scale**2) @ self.weight  # (N, L)
        tril = torch.linalg.cholesky(self.posterior_precision())
        return torch.cholesky_solve(projected.unsqueeze(-1), tril).squeeze(-1)

    def posterior(self, x: torch.Tensor) -> MultivariateNormal:
        """The exact posterior p(z | x): loc (N, L), one covariance (L, L) shared by all x."""
        return MultivariateNormal(
            self.posterior_mean(x), covariance_matrix=self.posterior_covariance()
        )

    @torch.no_grad()
    def sample_data(
        self,
        num_points: int,
        seed: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Draw x ~ p(x) (through z ~ p(z), x ~ p(x | z)); returns (num_points, D)."""
        rng = _generator(seed, generator)
        like = {"dtype": self.weight.dtype, "generator": rng}
        z = torch.randn(num_points, self.latent_dim, **like).to(self.weight.device)
        noise = torch.randn(num_points, self.num_features, **like).to(self.weight.device)
        return z @ self.weight.T + self.bias + noise * self.noise_scale


class LinearGaussianGuide(LocalParamsModule):
    """Amortized diagonal Gaussian guide q(z | x) = N(A x + c, diag(s^2)), site ``"z"``.

    Parameters
    ----------
    weight : torch.Tensor of shape (L, D)
        A (units of z per unit of x).
    bias : torch.Tensor of shape (L,)
        c (units of z).
    scale : torch.Tensor of shape (L,)
        s, the standard deviations of q (units of z, positive; the same for every x).

    Stored as ``torch.nn.Parameter`` s ``weight``, ``bias`` and ``raw_scale``, with
    s = softplus(raw_scale) so that s stays positive under training.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        weight, bias, scale = (torch.as_tensor(v) for v in (weight, bias, scale))
        if weight.dim() != 2 or bias.shape != weight.shape[:1] or scale.shape != bias.shape:
            raise ValueError(
                "expected weight (L, D), bias (L,) and scale (L,), got "
                f"{tuple(weight.shape)}, {tuple(bias.shape)} and {tuple(scale.shape)}"
            )
        if not bool((scale > 0).all()):
            raise ValueError("scale must be positive")
        self.weight = nn.Parameter(weight.detach().clone())
        self.bias = nn.Parameter(bias.detach().clone().to(weight))
        self.raw_scale = nn.Parameter(_inverse_softplus(scale.detach().clone().to(weight)))

    @classmethod
    def optimal_for(cls, model: LinearGaussianModel) -> LinearGaussianGuide:
        """The diagonal Gaussian guide closest to the exact posterior in KL(q || p(z|x)).

        Its mean is the exact posterior mean (A = Sigma W^T diag(psi^-2), c = -A b) and its
        scales are s_l = 1 / sqrt(Lambda_ll), the inverse square roots of the diagonal of the
        posterior precision; the remaining KL, 0.5 (sum_l log Lambda_ll - log det Lambda),
        is the same for every x and vanishes only when Lambda is diagonal.
        """
        with torch.no_grad():
            precision = model.posterior_precision()
            tril = torch.linalg.cholesky(precision)
            loading = (model.weight / model.noise_scale.unsqueeze(-1) ** 2).T  # (L, D)
            weight = torch.cholesky_solve(loading, tril)
            bias = -weight @ model.bias
            scale = precision.diagonal().rsqrt()
        return cls(weight, bias, scale)

    @property
    def scale(self) -> torch.Tensor:
        """s = softplus(raw_scale), shape (L,)."""
        return F.softplus(self.raw_scale)

    def perturbed(
        self, scale_factor: float = 1.0, shift: float | torch.Tensor = 0.0
    ) -> LinearGaussianGuide:
        """A new guide with scales multiplied by ``scale_factor`` and means moved by ``shift``.

        Parameters
        ----------
        scale_factor : float
            Factor applied to s (> 1 widens q, which keeps importance weights well-behaved).
        shift : float or torch.Tensor of shape (L,)
            Added to c, i.e. to the mean of q(z | x) for every x (units of z).
        """
        if not scale_factor > 0:
            raise ValueError(f"scale_factor must be positive, got {scale_factor!r}")
        with torch.no_grad():
            return type(self)(self.weight, self.bias + shift, self.scale * scale_factor)

    def loc(self, x: torch.Tensor) -> torch.Tensor:
        """A x + c for x of shape (N, D); returns (N, L)."""
        return x @ self.weight.T + self.bias

    def distribution(self, x: torch.Tensor) -> dist.TorchDistribution:
        """q(z | x) as an Independent Normal, batch shape (N,), event shape (L,)."""
        loc = self.loc(x)
        return dist.Normal(loc, self.scale.expand_as(loc)).to_event(1)

    def forward(self, x: torch.Tensor, num_samples: int | None = None):
        with pyro.plate(DATA_PLATE, x.shape[0]):
            return pyro.sample("z", self.distribution(x))


def exact_posterior_kl(
    model: LinearGaussianModel, guide: LinearGaussianGuide, x: torch.Tensor
) -> torch.Tensor:
    """Exact KL(q(z | x) || p(z | x)) in nats per data point, for x of shape (N, D): (N,).

    Differentiable in the parameters of both the model and the guide.
    """
    q_cov = torch.diag(guide.scale**2)
    return gaussian_kl(guide.loc(x), q_cov, model.posterior_mean(x), model.posterior_covariance())


def importance_weight_log_moment(
    model: LinearGaussianModel, guide: LinearGaussianGuide, x: torch.Tensor, order: float
) -> torch.Tensor:
    """Exact log E_q[r^order] per data point, r = p(z | x) / q(z | x) with z ~ q(z | x).

    r = w / p(x) is the normalized importance weight (mean 1), so ``order=2`` gives the
    relative variance V = E_q[r^2] - 1 of the weights, which sets the asymptotic Monte Carlo
    standard error sqrt(V / K) of log p_hat(x) and the asymptotic bias V / (2k) of IWAE_k.
    (Up to a factor 1 / (order - 1) it is the Renyi divergence of order ``order``.)

    With Lambda and Q the precisions of p(z|x) and q(z|x), delta the difference of their
    means, a = order and A = a Lambda + (1 - a) Q, the closed form is

        0.5 [a log det Lambda + (1 - a) log det Q - log det A
             - a (1 - a) delta^T Lambda A^-1 Q delta]

    when A is positive definite, and +inf (the moment diverges) otherwise.

    Parameters
    ----------
    model, guide : LinearGaussianModel, LinearGaussianGuide
    x : torch.Tensor of shape (N, D)
    order : float
        The moment's order (any real number; 0 and 1 give 0).

    Returns
    -------
    torch.Tensor of shape (N,)
        The log-moment, dimensionless.
    """
    precision = model.posterior_precision()
    guide_precision = torch.diag(guide.scale**-2)
    combined = order * precision + (1 - order) * guide_precision
    tril, info = torch.linalg.cholesky_ex(combined)
    delta = model.posterior_mean(x) - guide.loc(x)  # (N, L)
    if int(info) != 0:
        return torch.full_like(delta[:, 0], float("inf"))
    solved = torch.cholesky_solve((delta @ guide_precision).unsqueeze(-1), tril).squeeze(-1)
    quadratic = ((delta @ precision) * solved).sum(-1)
    log_dets = (
        order * torch.logdet(precision)
        + (1 - order) * guide_precision.diagonal().log().sum()
        - _cholesky_logdet(tril)
    )
    return 0.5 * (log_dets - order * (1 - order) * quadratic)


def importance_weight_variance(
    model: LinearGaussianModel, guide: LinearGaussianGuide, x: torch.Tensor
) -> torch.Tensor:
    """V = Var_q[p(z|x) / q(z|x)] per data point (N,), dimensionless; +inf if it diverges."""
    return torch.expm1(importance_weight_log_moment(model, guide, x, 2.0))
