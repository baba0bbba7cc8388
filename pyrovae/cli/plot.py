"""``pyrovae plot``: one figure of a saved model."""

from __future__ import annotations

import argparse

from pyrovae.cli.common import (
    CLIError,
    Output,
    apply_threads,
    check_image_model,
    dataset_of,
    image_paths,
    load_data,
    model_file,
    prepare_data,
    write_images,
)
from pyrovae.cli.parser import PLOT_DEFAULT_FORMATS


def _check_kind(kind: str, vae, model_path) -> None:
    """Refuse a figure this model cannot give, in the command line's words."""
    if kind != "curves":
        check_image_model(vae, f"pyrovae plot {kind}")
    if kind == "manifold" and vae.config.latent_dim != 2:
        raise CLIError(
            f"'pyrovae plot manifold' draws a 2-D latent space; this model has latent_dim="
            f"{vae.config.latent_dim}. Use 'pyrovae plot latent' (posterior means) or "
            "'pyrovae plot interpolation'"
        )
    if kind == "curves" and vae.history_ is None:
        raise CLIError(
            f"{model_path} holds no training history; 'pyrovae plot curves' needs a model "
            "written by 'pyrovae train'"
        )
    if vae.config.condition_dim and kind != "curves":
        raise CLIError(
            f"'pyrovae plot {kind}' does not take a condition; for this conditional model use "
            "'pyrovae plot curves' or 'pyrovae sample' (--label)"
        )


def run_plot(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae import VAE
    from pyrovae.plots import DATA_FIGURE_KINDS, figure_writer, model_figure

    model_path = model_file(args.model)
    paths = image_paths(args, PLOT_DEFAULT_FORMATS, model_path)
    vae = VAE.load(model_path)
    kind = args.kind
    _check_kind(kind, vae, model_path)
    apply_threads(args, vae, out)
    data = labels = None
    if kind in DATA_FIGURE_KINDS:
        name = dataset_of(vae, args.dataset)
        dataset = load_data(name, args.data_dir)
        data, described = prepare_data(vae, dataset, args.split, args.binarize, args.seed)
        out.info(f"{args.split} split of {name}: {described}")
        if kind == "latent":
            labels = dataset.split(args.split)[1]
            if labels is None:
                raise CLIError(
                    f"the {args.split} split of {name} has no labels, which 'pyrovae plot "
                    "latent' colours the points by; choose another --split (e.g. test)"
                )
        if kind == "interpolation" and 2 * (args.num or 4) > data.shape[0]:
            raise CLIError(
                f"--num {args.num or 4} interpolation pairs need {2 * (args.num or 4)} data "
                f"points; the {args.split} split has {data.shape[0]}"
            )
    figure = model_figure(kind, vae, data, labels, num=args.num, seed=args.seed, method=args.method)
    write_images(paths, lambda extension: figure_writer(figure, extension), out, model_path)
    return 0
