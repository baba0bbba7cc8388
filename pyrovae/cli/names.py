"""Choices and defaults the argument parser shows, as plain constants: ``pyrovae --help``
and argument errors are answered without importing torch (or anything that imports it).

Each constant mirrors a registry or a dataclass default of the library;
``tests/test_cli_package.py`` checks that they agree."""

DATASETS = ("binarized-mnist", "digits", "mnist")  # pyrovae.data.DATASETS
SPLIT_NAMES = ("train", "valid", "test")  # pyrovae.data.SPLIT_NAMES
LIKELIHOODS = (  # pyrovae.likelihoods.LIKELIHOODS
    "bernoulli",
    "categorical-256",
    "continuous-bernoulli",
    "laplace",
    "negative-binomial",
    "normal",
    "normal-fixed",
    "normal-per-feature",
    "poisson",
    "student-t",
    "zero-inflated-negative-binomial",
)
ACTIVATIONS = ("elu", "gelu", "leaky_relu", "relu", "softplus", "tanh")  # pyrovae.networks
OBJECTIVES = (  # pyrovae.objectives.OBJECTIVES
    "annealed_meanfield_elbo",
    "dreg",
    "iwae",
    "renyi",
    "stl",
    "trace_elbo",
    "trace_meanfield_elbo",
    "traceenum_elbo",
)
POSTERIORS = ("diagonal", "flow", "full", "low-rank")  # pyrovae.posteriors.POSTERIORS
PRIORS = ("learned-normal", "mixture", "normal", "vamp")  # pyrovae.priors.PRIORS

VAE_DEFAULTS = {  # pyrovae.config.VAEConfig field defaults
    "latent_dim": 2,
    "hidden_sizes": (256, 256),
    "activation": "relu",
    "likelihood": "bernoulli",
    "prior": "normal",
    "prior_components": 10,
    "guide": "diagonal",
    "guide_rank": 2,
    "num_flows": 2,
    "network": "mlp",
    "top_latent_dim": None,
    "top_hidden_sizes": (100, 100),
}
TRAIN_DEFAULTS = {  # pyrovae.config.TrainConfig field defaults
    "objective": "trace_elbo",
    "num_particles": 1,
    "epochs": 10,
    "batch_size": 128,
    "learning_rate": 0.001,
    "clip_norm": None,
    "checkpoint_every": 1,
    "on_nonfinite": "raise",
    "compile": "auto",
    "renyi_alpha": 0.5,
    "beta": 1.0,
    "kl_warmup_epochs": 0,
    "free_bits": 0.0,
    "lr_schedule": "constant",
    "lr_decay": 0.5,
    "lr_patience": 10,
    "min_learning_rate": 1e-05,
}
