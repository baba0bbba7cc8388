"""Deterministic autoencoders in plain PyTorch (no Pyro), as baselines for the VAE.

Every model maps x (N, D) to a code z = f(x) (N, L) with an encoder MLP and back to
x_hat = g(z) with a decoder MLP, and is fitted by minibatch Adam on the squared error
``||x - g(f(x))||^2`` summed over features and averaged over data points, plus the
variant's penalty:

================================  ==============================================================
:class:`LinearAutoencoder`        linear f and g; at the optimum g spans the top-L principal
                                  subspace of the data (Baldi & Hornik, 1989)
:class:`DeepAutoencoder`          MLP encoder and decoder, no penalty
:class:`SparseAutoencoder`        ``sparsity * sum_l |z_l|`` (L1 penalty on the codes)
:class:`DenoisingAutoencoder`     corrupts the inputs (masking or Gaussian noise) and
                                  reconstructs the clean ones (Vincent et al., 2008)
:class:`ContractiveAutoencoder`   ``contraction * ||df/dx||_F^2``, the squared Frobenius norm
                                  of the encoder Jacobian (Rifai et al., 2011), computed exactly
================================  ==============================================================

Constructors only store their arguments (scikit-learn style); :meth:`Autoencoder.fit`
validates them, builds the networks for the data's width and trains. Fitted state carries a
trailing underscore: ``encoder_``, ``decoder_``, ``num_features_``, ``history_``.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import nn
from torch.func import jacrev, vmap

from pyrovae.validation import as_data_tensor, check_data

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "identity": nn.Identity,
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
}
"""Activations the autoencoders accept, by name."""

NOISE_TYPES = ("gaussian", "masking")
"""Corruptions of :class:`DenoisingAutoencoder`."""


def _activation(name: str, field: str) -> nn.Module:
    if name not in ACTIVATIONS:
        valid = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown {field} {name!r}; valid names: {valid}")
    return ACTIVATIONS[name]()


def _mlp(sizes: list[int], activation: str, last_activation: str, field: str) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]``; ``activation`` between them and
    ``last_activation`` after the last one."""
    layers: list[nn.Module] = []
    for index, (width, size) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(width, size))
        last = index == len(sizes) - 2
        name, name_field = (last_activation, field) if last else (activation, "activation")
        layers.append(_activation(name, name_field))
    return nn.Sequential(*layers)


def _require_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _require_nonnegative(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")


class Autoencoder:
    """Autoencoder with MLP encoder f and decoder g, trained on the squared error.

    Parameters
    ----------
    latent_dim : int
        Code width L.
    hidden_sizes : tuple of int
        Hidden widths of the encoder; the decoder uses them in reverse order. Empty for a
        single linear layer each way.
    activation : str
        Hidden activation, a key of :data:`ACTIVATIONS`.
    code_activation : str
        Activation applied to the code, e.g. ``"identity"`` or ``"relu"``.
    output_activation : str
        Activation of the decoder output, e.g. ``"sigmoid"`` for pixels in [0, 1].
    """

    def __init__(
        self,
        latent_dim: int = 2,
        hidden_sizes: tuple[int, ...] = (128,),
        activation: str = "tanh",
        code_activation: str = "identity",
        output_activation: str = "sigmoid",
    ):
        self.latent_dim = latent_dim
        self.hidden_sizes = hidden_sizes
        self.activation = activation
        self.code_activation = code_activation
        self.output_activation = output_activation

    # ------------------------------------------------------------------ parameters

    def get_params(self) -> dict:
        """Constructor arguments by name, as stored (scikit-learn style)."""
        names = inspect.signature(type(self).__init__).parameters
        return {name: getattr(self, name) for name in names if name != "self"}

    def __repr__(self) -> str:
        arguments = ", ".join(f"{name}={value!r}" for name, value in self.get_params().items())
        return f"{type(self).__name__}({arguments})"

    def _validate_params(self) -> None:
        _require_positive_int("latent_dim", self.latent_dim)
        for size in self.hidden_sizes:
            _require_positive_int("each hidden size", size)
        for field in ("activation", "code_activation", "output_activation"):
            _activation(getattr(self, field), field)

    def _build(self, num_features: int) -> None:
        hidden = [int(size) for size in self.hidden_sizes]
        self.encoder_ = _mlp(
            [num_features, *hidden, self.latent_dim],
            self.activation,
            self.code_activation,
            "code_activation",
        )
        self.decoder_ = _mlp(
            [self.latent_dim, *reversed(hidden), num_features],
            self.activation,
            self.output_activation,
            "output_activation",
        )
        self.num_features_ = num_features

    # ------------------------------------------------------------------ training

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Input the encoder sees during training; the identity except for denoising."""
        del generator
        return x

    def penalty(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Regulariser per data point, shape (N,); zero except for the penalised variants."""
        del x
        return codes.new_zeros(codes.shape[0])

    def loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Training loss per data point, averaged over the batch: squared error + penalty."""
        inputs = self.corrupt(x, generator)
        codes = self.encoder_(inputs)
        squared_error = (self.decoder_(codes) - x).pow(2).sum(-1)
        return (squared_error + self.penalty(inputs, codes)).mean()

    def fit(
        self,
        x,
        epochs: int = 100,
        batch_size: int | None = 64,
        lr: float = 1e-3,
        seed: int = 0,
    ) -> list[float]:
        """Initialise the networks and fit them by minibatch Adam.

        Parameters
        ----------
        x : array-like of shape (N, D)
            Training data.
        epochs : int
            Passes over the data.
        batch_size : int or None
            Data points per step; ``None`` (or a size >= N) trains on the full batch.
        lr : float
            Adam step size.
        seed : int
            Seeds the initialisation, the data order and the corruption; the global RNG
            state is left as it was.

        Returns
        -------
        list of float
            Training loss per data point (squared error plus penalty) averaged over each
            epoch's steps, one entry per epoch; also kept as ``history_``.
        """
        self._validate_params()
        _require_positive_int("epochs", epochs)
        if batch_size is not None:
            _require_positive_int("batch_size", batch_size)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not lr > 0:
            raise ValueError(f"lr must be a positive number, got {lr!r}")
        data = self._check(x, "training data", fitting=True)
        size = data.shape[0] if batch_size is None else min(batch_size, data.shape[0])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self._build(data.shape[1])
        self.encoder_.to(data.dtype)
        self.decoder_.to(data.dtype)
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.Adam(self._parameters(), lr=lr)
        self.history_ = [self._epoch(data, size, optimizer, generator) for _ in range(epochs)]
        return self.history_

    def _parameters(self) -> list[nn.Parameter]:
        return [*self.encoder_.parameters(), *self.decoder_.parameters()]

    def _epoch(self, data, batch_size: int, optimizer, generator) -> float:
        self.encoder_.train()
        self.decoder_.train()
        order = torch.randperm(data.shape[0], generator=generator)
        total = 0.0
        for index in order.split(batch_size):
            loss = self.loss(data[index], generator)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(index)
        if not math.isfinite(total):
            raise FloatingPointError(f"{type(self).__name__}: non-finite training loss; lower lr")
        return total / data.shape[0]

    # ------------------------------------------------------------------ inference

    def _check_fitted(self) -> None:
        if not hasattr(self, "encoder_"):
            raise RuntimeError(f"this {type(self).__name__} is not fitted yet; call fit first")

    def _check(self, x, name: str, fitting: bool = False) -> torch.Tensor:
        if not fitting:
            self._check_fitted()
        tensor = as_data_tensor(x, name)
        if fitting:
            features = tensor.shape[1] if tensor.dim() == 2 else 1
            return check_data(tensor, features, None, name).to(torch.get_default_dtype())
        dtype = next(self.encoder_.parameters()).dtype
        return check_data(tensor, self.num_features_, None, name).to(dtype)

    @torch.no_grad()
    def encode(self, x) -> torch.Tensor:
        """Codes z = f(x), shape (N, L)."""
        data = self._check(x, "x")
        return self.encoder_.eval()(data)

    @torch.no_grad()
    def decode(self, z) -> torch.Tensor:
        """Reconstructions g(z), shape (N, D)."""
        self._check_fitted()
        codes = as_data_tensor(z, "z")
        codes = check_data(codes, self.latent_dim, None, "z").to(self._dtype())
        return self.decoder_.eval()(codes)

    def _dtype(self) -> torch.dtype:
        return next(self.decoder_.parameters()).dtype

    @torch.no_grad()
    def reconstruct(self, x) -> torch.Tensor:
        """g(f(x)), shape (N, D)."""
        return self.decode(self.encode(x))

    @torch.no_grad()
    def reconstruction_error(self, x, target=None) -> torch.Tensor:
        """Squared error ``||target - g(f(x))||^2`` per data point, shape (N,);
        ``target`` defaults to ``x`` (pass the clean data to score denoising)."""
        target = self._check(x if target is None else target, "target")
        return (self.reconstruct(x) - target).pow(2).sum(-1)


class LinearAutoencoder(Autoencoder):
    """Linear encoder and decoder (with biases) trained on the squared error.

    Its global minima are exactly the maps whose decoder columns span the top-``latent_dim``
    principal subspace of the data (Baldi & Hornik, 1989); the codes themselves are any
    invertible linear mix of the principal components.

    Parameters
    ----------
    latent_dim : int
        Code width L.
    """

    def __init__(self, latent_dim: int = 2):
        super().__init__(latent_dim, (), "identity", "identity", "identity")

    @property
    def components_(self) -> torch.Tensor:
        """Decoder weight matrix, shape (D, L): its columns span the learned subspace."""
        return self.decoder_[0].weight.detach()


class DeepAutoencoder(Autoencoder):
    """MLP autoencoder without a penalty; see :class:`Autoencoder` for the parameters."""


class SparseAutoencoder(Autoencoder):
    """Autoencoder with an L1 penalty ``sparsity * sum_l |z_l|`` on the codes.

    Other parameters are those of :class:`Autoencoder`.

    Parameters
    ----------
    sparsity : float
        Weight of the L1 penalty (squared-error units per unit of code).
    code_activation : str
        Defaults to ``"relu"`` so that the penalty produces exact zeros.
    """

    def __init__(
        self,
        latent_dim: int = 2,
        hidden_sizes: tuple[int, ...] = (128,),
        activation: str = "tanh",
        code_activation: str = "relu",
        output_activation: str = "sigmoid",
        sparsity: float = 0.1,
    ):
        super().__init__(latent_dim, hidden_sizes, activation, code_activation, output_activation)
        self.sparsity = sparsity

    def _validate_params(self) -> None:
        super()._validate_params()
        _require_nonnegative("sparsity", self.sparsity)

    def penalty(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.sparsity * codes.abs().sum(-1)


class DenoisingAutoencoder(Autoencoder):
    """Autoencoder that reconstructs clean inputs from corrupted ones.

    Other parameters are those of :class:`Autoencoder`.

    Parameters
    ----------
    noise : float
        ``"masking"``: probability that each input feature is set to zero, in [0, 1);
        ``"gaussian"``: standard deviation of the added noise, in data units.
    noise_type : str
        ``"masking"`` or ``"gaussian"``.
    """

    def __init__(
        self,
        latent_dim: int = 2,
        hidden_sizes: tuple[int, ...] = (128,),
        activation: str = "tanh",
        code_activation: str = "identity",
        output_activation: str = "sigmoid",
        noise: float = 0.3,
        noise_type: str = "masking",
    ):
        super().__init__(latent_dim, hidden_sizes, activation, code_activation, output_activation)
        self.noise = noise
        self.noise_type = noise_type

    def _validate_params(self) -> None:
        super()._validate_params()
        if self.noise_type not in NOISE_TYPES:
            raise ValueError(
                f"unknown noise_type {self.noise_type!r}; valid names: {', '.join(NOISE_TYPES)}"
            )
        _require_nonnegative("noise", self.noise)
        if self.noise_type == "masking" and not self.noise < 1:
            raise ValueError(f"masking noise must be a probability below 1, got {self.noise!r}")

    def corrupt(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return corrupt(x, self.noise, self.noise_type, generator)


def corrupt(
    x: torch.Tensor, noise: float, noise_type: str = "masking", generator=None
) -> torch.Tensor:
    """Masking noise (each feature zeroed with probability ``noise``) or additive Gaussian
    noise (standard deviation ``noise``) on ``x``; a new tensor of the same shape."""
    if noise_type == "masking":
        keep = torch.rand(x.shape, generator=generator, dtype=x.dtype) >= noise
        return x * keep
    if noise_type == "gaussian":
        return x + noise * torch.randn(x.shape, generator=generator, dtype=x.dtype)
    raise ValueError(f"unknown noise_type {noise_type!r}; valid names: {', '.join(NOISE_TYPES)}")


class ContractiveAutoencoder(Autoencoder):
    """Autoencoder penalised by ``contraction * ||df/dx||_F^2``, the squared Frobenius norm
    of the encoder Jacobian at each training point (Rifai et al., 2011).

    The Jacobian is computed exactly (``torch.func.vmap(jacrev(f))``), for any encoder.

    Other parameters are those of :class:`Autoencoder`.

    Parameters
    ----------
    contraction : float
        Weight of the penalty (squared-error units per unit of squared Jacobian norm).
    """

    def __init__(
        self,
        latent_dim: int = 2,
        hidden_sizes: tuple[int, ...] = (128,),
        activation: str = "tanh",
        code_activation: str = "identity",
        output_activation: str = "sigmoid",
        contraction: float = 0.1,
    ):
        super().__init__(latent_dim, hidden_sizes, activation, code_activation, output_activation)
        self.contraction = contraction

    def _validate_params(self) -> None:
        super()._validate_params()
        _require_nonnegative("contraction", self.contraction)

    def penalty(self, x: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        return self.contraction * _squared_jacobian_norm(self.encoder_, x)


def _squared_jacobian_norm(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``||d encoder / dx||_F^2`` per row of x, shape (N,); differentiable in the weights."""
    jacobians = vmap(jacrev(encoder))(x)  # (N, L, D)
    return jacobians.pow(2).sum((-2, -1))


@torch.no_grad()
def jacobian_frobenius(model, x, squared: bool = False) -> torch.Tensor:
    """Frobenius norm of the encoder Jacobian dz/dx at each data point, computed exactly.

    Parameters
    ----------
    model : Autoencoder or callable
        A fitted autoencoder (its ``encoder_`` is differentiated), or any function mapping a
        tensor of shape (N, D) to codes of shape (N, L) row by row, e.g. a VAE's posterior
        mean ``lambda x: vae.guide.encoder(x)[0]``.
    x : array-like of shape (N, D)
        Points where the Jacobian is taken.
    squared : bool
        Return ``||J||_F^2`` instead of ``||J||_F``.

    Returns
    -------
    torch.Tensor
        Shape (N,), in code units per data unit.
    """
    if isinstance(model, Autoencoder):
        data, encoder = model._check(x, "x"), model.encoder_.eval()
    elif callable(model):
        data, encoder = as_data_tensor(x, "x"), model
        if data.dim() != 2:
            raise ValueError(f"x must be a matrix of shape (N, D); got {tuple(data.shape)}")
    else:
        raise TypeError(f"model must be an Autoencoder or a callable, got {type(model).__name__}")
    squared_norm = _squared_jacobian_norm(encoder, data)
    return squared_norm if squared else squared_norm.sqrt()
