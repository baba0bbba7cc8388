"""``pyrovae sample``: an image grid of draws from the prior."""

from __future__ import annotations

import argparse

import torch

from pyrovae.cli.common import (
    CLIError,
    Output,
    apply_threads,
    check_image_model,
    image_paths,
    model_file,
    one_hot,
    write_images,
)
from pyrovae.cli.parser import SAMPLE_DEFAULT_FORMATS


def _sample_condition(vae, num: int, label: int | None) -> torch.Tensor | None:
    width = vae.config.condition_dim
    if not width:
        if label is not None:
            raise CLIError("--label applies to conditional models; this model is not one")
        return None
    if label is not None and not 0 <= label < width:
        raise CLIError(f"--label {label} is not a class of this model (0 to {width - 1})")
    classes = torch.full((num,), label) if label is not None else torch.arange(num) % width
    return one_hot(classes, width)


def run_sample(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.plots import image_grid_writer

    model_path = model_file(args.model)
    paths = image_paths(args, SAMPLE_DEFAULT_FORMATS, model_path)
    vae = VAE.load(model_path)
    check_image_model(vae, "pyrovae sample")
    apply_threads(args, vae, out)
    condition = _sample_condition(vae, args.num, args.label)
    means, observations = vae.sample(args.num, seed=args.seed, condition=condition)
    images = means if args.kind == "mean" else observations
    shape = vae.config.image_shape
    write_images(paths, lambda kind: image_grid_writer(images, shape, kind), out, model_path)
    return 0
