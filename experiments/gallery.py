"""Regenerate the figure gallery: ``docs/gallery.md`` and the PNG files in ``docs/figures/``.

Trains (or loads) two VAEs on scikit-learn's 8x8 digits, one with a 2-D latent space and one
with a larger one, draws every figure kind of ``pyrovae plot`` with the command line itself
(so each caption's command is exactly what produced the image), adds the figures that only
the Python API draws (sampled observations, attribute arithmetic), runs the autoencoder
comparison (``experiments/autoencoders_vs_vae.py``) and writes the page.

Run from the repository root (about 2 minutes on 2 CPU cores)::

    python experiments/gallery.py
    python experiments/gallery.py --model runs/gallery/vae-2d/model.pt \\
        --model runs/gallery/vae-8d/model.pt          # reuse trained models

Only PNG files go to ``docs/figures`` (to keep the repository small); PDFs of the same
figures come from ``pyrovae plot ... --formats pdf`` or ``plots.save_figure``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import autoencoders_vs_vae  # noqa: E402  (next to this file)
import torch  # noqa: E402

from pyrovae import VAE  # noqa: E402
from pyrovae.cli import main as cli  # noqa: E402

SIZE_BUDGET = 3 * 2**20
"""Largest total size of the PNG files in the figures directory, in bytes."""


@dataclass
class Entry:
    """One figure of the gallery."""

    title: str
    path: Path
    caption: str
    command: str
    language: str = "bash"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        action="append",
        default=[],
        help="a saved VAE to use instead of training one (the one with a 2-D latent space "
        "draws the manifold); repeat for both",
    )
    parser.add_argument("--latent-dim", type=int, default=8, help="the larger latent space")
    parser.add_argument("--epochs", type=int, default=100, help="VAE training epochs")
    parser.add_argument("--runs", type=Path, default=Path("runs/gallery"))
    parser.add_argument("--docs", type=Path, default=Path("docs"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny networks)")
    return parser.parse_args(argv)


def command(arguments: list[str]) -> str:
    return shlex.join(["pyrovae", *arguments])


def run_cli(arguments: list[str]) -> str:
    """Run ``pyrovae ARGUMENTS`` in-process; return the command line."""
    if cli(arguments) != 0:
        raise RuntimeError(f"failed: {command(arguments)}")
    return command(arguments)


def run_cli_process(arguments: list[str], threads: int) -> str:
    """Run ``pyrovae ARGUMENTS`` in a fresh process, as a user would (a VAE's initial
    weights come from the global RNG, whose state a fresh process fixes); return the
    command line."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    root = str(Path(__file__).resolve().parents[1])
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    runner = [sys.executable, "-m", "pyrovae.cli", *arguments]
    subprocess.run(runner, check=True, env=environment)
    return command(arguments)


# ----------------------------------------------------------------------------- models


def models(args) -> tuple[dict[int, Path], dict[int, str]]:
    """Model files by latent dimension (2 and ``args.latent_dim``) and how each was made."""
    found, how = {}, {}
    for path in args.model:
        latent_dim = VAE.load(path).config.latent_dim
        found[latent_dim], how[latent_dim] = path, f"loaded from `{path}`"
    for latent_dim in (2, args.latent_dim):
        if latent_dim in found:
            continue
        out = args.runs / f"vae-{latent_dim}d"
        arguments = ["train", "--dataset", "digits", "--binarize", "dynamic"]
        arguments += ["--latent-dim", str(latent_dim), "--hidden", "256,256"]
        arguments += ["--epochs", str(args.epochs), "--batch-size", "64", "--quiet"]
        line = run_cli_process([*arguments, "--out", str(out)], args.threads)
        how[latent_dim] = f"trained by `{line}`"
        found[latent_dim] = out / "model.pt"
    return found, how


# ----------------------------------------------------------------------------- figures


def cli_figures(files: dict[int, Path], large: int, figures: Path) -> list[Entry]:
    """Every kind of ``pyrovae plot``, drawn by the command line."""
    plans = [
        ("samples", large, [], "Samples from the prior", "samples",
         f"Decoder means E[x|z] for 64 draws z ~ N(0, I) of the {large}-D model."),
        ("reconstructions", large, [], "Reconstructions", "reconstructions",
         "Test images (one fixed Bernoulli draw of the grey levels, the binarization the "
         "model was trained with) above E[x | z = mu(x)]."),
        ("curves", large, [], "Training curves", "curves",
         "Train and validation ELBO per epoch, nats per image; the y-axis is clipped when "
         "the first epochs would flatten the rest (the title says so)."),
        ("latent", 2, [], "Posterior means, 2-D latent space", "latent_2d",
         "Posterior means of the test images, coloured by digit."),
        ("latent", large, [], f"Posterior means, {large}-D latent space", f"latent_{large}d",
         "First two principal components of the posterior means of the test images."),
        ("manifold", 2, [], "Learned manifold (Kingma & Welling, 2014, fig. 4)", "manifold",
         "Decoder means on a 15 x 15 grid of prior quantiles 0.05 ... 0.95 per coordinate "
         "(equal steps of prior mass)."),
        ("interpolation", large, [], "Linear interpolation", "interpolation_linear",
         "Decoded straight paths between the posterior means of random test pairs."),
        ("interpolation", large, ["--method", "spherical"], "Spherical interpolation",
         "interpolation_spherical",
         "The same pairs along great circles (slerp), which keep the norm of equal-norm "
         "endpoints, where a Gaussian prior puts its mass in high dimension."),
    ]  # fmt: skip
    entries = []
    for kind, latent_dim, extra, title, name, caption in plans:
        path = figures / name
        arguments = ["plot", kind, "--model", str(files[latent_dim]), "--out", str(path)]
        line = run_cli([*arguments, *extra, "--formats", "png"])
        entries.append(Entry(title, path.with_suffix(".png"), caption, line))
    return entries


API_FIGURES = [
    (
        "Sampled observations",
        "samples_observations",
        "One draw x ~ p(x|z) per z ~ N(0, I) ({large}-D model): binary images; compare with "
        "the decoder means above.",
        "figure = plots.prior_samples_figure(vae, num=64, kind='observation', seed=0)",
    ),
    (
        "Attribute arithmetic: from 1 to 7",
        "arithmetic_1_to_7",
        "v = mean posterior mean of the training images of 7 minus that of the images of 1 "
        "(White, 2016); decoding mu(x) + s v moves images of 1 towards 7, growing the top bar.",
        "from pyrovae.cli import evaluation_data\n"
        "from pyrovae.data import load_digits\n"
        "\n"
        "digits = load_digits()\n"
        "x = evaluation_data(vae, 'digits', None, 'train', seed=0)  # binarized as in training\n"
        "figure = plots.arithmetic_figure(vae, x, digits.train_labels, 1, 7, num=6)",
    ),
]
"""Figures that only the Python API draws: title, file name, caption, code making
``figure`` from ``vae``."""


def api_figures(files: dict[int, Path], large: int, figures: Path) -> list[Entry]:
    """Figures that only the Python API draws; each code shown is the code run."""
    entries = []
    for title, name, caption, body in API_FIGURES:
        code = "\n".join(
            [
                "from pyrovae import VAE, plots",
                f"vae = VAE.load({str(files[large])!r})",
                body,
                f"plots.save_figure(figure, {str(figures / name)!r}, formats=('png',))",
            ]
        )
        exec(compile(code, f"<gallery: {name}>", "exec"), {})  # the code shown on the page
        path = (figures / name).with_suffix(".png")
        entries.append(Entry(title, path, caption.format(large=large), code, "python"))
    return entries


def autoencoder_figures(args, figures: Path) -> tuple[list[Entry], str]:
    """The autoencoder comparison: its figures and results table."""
    arguments = ["--out", str(args.runs / "autoencoders"), "--figures-dir", str(figures)]
    arguments += ["--prefix", "autoencoders_", "--formats", "png", "--dpi", "120"]
    results = autoencoders_vs_vae.run(autoencoders_vs_vae.parse_args(arguments))
    line = shlex.join(["python", "experiments/autoencoders_vs_vae.py", *arguments])
    captions = {
        "reconstructions": (
            "Autoencoders vs VAE: reconstructions",
            "Held-out digits (binarized at 0.5) and each model's reconstruction.",
        ),
        "generation": (
            "Autoencoders vs VAE: decoding random codes",
            "An autoencoder has no prior: its codes are drawn from a Gaussian fitted to its "
            "training codes. The VAE decodes draws from its prior.",
        ),
        "latents": (
            "Autoencoders vs VAE: codes of held-out digits",
            "First two principal components of each model's 8-D codes.",
        ),
    }
    entries = [
        Entry(title, results["figures"][name][0], caption, line)
        for name, (title, caption) in captions.items()
    ]
    return entries, results["table"]


# ----------------------------------------------------------------------------- page


def page(entries: list[Entry], how: dict[int, str], table: str, docs: Path) -> str:
    lines = [
        "# Gallery",
        "",
        "Figures of VAEs fitted to scikit-learn's 8x8 digits, and of the autoencoder "
        "baselines. Regenerate everything (models, figures, this page) with "
        "`python experiments/gallery.py` from the repository root; each figure's command is "
        "given below it. `pyrovae plot` writes PNG and PDF unless `--formats` says otherwise; "
        "only PNGs are kept here.",
        "",
        "Models:",
        "",
    ]
    lines += [f"* {latent_dim}-D latent space: {text}" for latent_dim, text in how.items()]
    for entry in entries:
        link = Path(os.path.relpath(entry.path, docs)).as_posix()
        lines += ["", f"## {entry.title}", "", f"![{entry.title}]({link})", "", entry.caption]
        lines += ["", f"```{entry.language}", entry.command, "```"]
        if entry.title.endswith("codes of held-out digits"):
            lines += ["", "### Autoencoders vs VAE: measures", "", table.rstrip()]
    return "\n".join(lines) + "\n"


def check_sizes(figures: Path, gallery: str) -> None:
    files = sorted(figures.glob("*.png"))
    total = sum(path.stat().st_size for path in files)
    print(f"{len(files)} PNG files in {figures}: {total / 2**20:.2f} MiB")
    if total > SIZE_BUDGET:
        print(f"warning: over the budget of {SIZE_BUDGET / 2**20:.0f} MiB")
    stale = [path.name for path in files if path.name not in gallery]
    if stale:
        print(f"warning: not on the page (stale?): {', '.join(stale)}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    figures = args.docs / "figures"
    files, how = models(args)
    entries = cli_figures(files, args.latent_dim, figures)
    entries += api_figures(files, args.latent_dim, figures)
    autoencoder_entries, table = autoencoder_figures(args, figures)
    gallery = page(entries + autoencoder_entries, how, table, args.docs)
    (args.docs / "gallery.md").write_text(gallery)
    print(f"wrote {args.docs / 'gallery.md'} in {time.perf_counter() - started:.0f} s")
    check_sizes(figures, gallery)
    return 0


if __name__ == "__main__":
    sys.exit(main())
