"""``pyrovae compare``: several saved models scored on the same points, with paired
differences; models that measure different things are refused unless asked for."""

from __future__ import annotations

import argparse
import csv
import os
import re
import time
from pathlib import Path

import torch

from pyrovae.cli.common import (
    CLIError,
    Output,
    apply_threads,
    check_device,
    check_out,
    data_inputs,
    dataset_of,
    elapsed,
    labels_of,
    load_data,
    model_file,
    prepare_data,
    write_out,
)
from pyrovae.cli.scoring import (
    ais_options,
    ais_settings_line,
    check_method_options,
    check_sizes,
    default_points,
    first_points,
    split_line,
)

_QUANTITY_FORMS = ("log_px", "elbo", "elbo_analytic")


def _check_quantity(quantity: str, method: str, num_samples: int) -> tuple[int, ...]:
    """The IWAE group sizes ``quantity`` needs; refuse a quantity the method does not give."""
    if method == "ais":
        if quantity != "log_px":
            raise CLIError(
                f"--quantity {quantity}: --method ais estimates log_px only; use --method is "
                "for ELBOs and IWAE bounds"
            )
        return ()
    if quantity in _QUANTITY_FORMS:
        return (1,)
    match = re.fullmatch(r"iwae_(\d+)", quantity)
    if match is None or int(match.group(1)) < 1:
        raise CLIError(
            f"--quantity {quantity!r} is not a quantity; use log_px, elbo, elbo_analytic or "
            "iwae_<k> (e.g. iwae_5)"
        )
    k = int(match.group(1))
    if k > num_samples:
        raise CLIError(
            f"--quantity {quantity}: k = {k} needs at least {k} draws per data point; raise "
            f"--num-samples to {k} or more"
        )
    return (k,)


def _binarize_mode(described: str) -> str:
    match = re.search(r"--binarize (\w+)", described)
    return match.group(1) if match else "?"


def _model_paths(models: list[Path]) -> dict[str, Path]:
    """Model files by the name given; the same file twice (also through a link) is refused."""
    if len(models) < 2:
        raise CLIError(
            f"pyrovae compare needs two or more models, got {len(models)}; name each "
            "model file (or run directory)"
        )
    paths: dict[str, Path] = {}
    seen: dict[tuple, str] = {}
    for given in models:
        name, path = str(given), model_file(given)
        info = os.stat(path)
        other = seen.setdefault((info.st_dev, info.st_ino), name)
        if other != name or name in paths:
            also = "" if other == name else f" (also as {other}: the same file)"
            raise CLIError(f"model {name} is given twice{also}; name each model once")
        paths[name] = path
    return paths


def _check_comparable(vaes: dict, allow: bool) -> None:
    """Refuse models whose log p(x) are not comparable unless --allow-different-likelihoods:
    likelihoods of different supports (a probability of {0, 1} values against a density on
    [0, 1] or the reals; Normal, Laplace and Student-t share one) or different conditioning."""
    features = {name: vae.config.num_features for name, vae in vaes.items()}
    if len(set(features.values())) > 1:
        listed = ", ".join(f"{name}: {size}" for name, size in features.items())
        raise CLIError(
            f"the models have different numbers of features ({listed}); a paired comparison "
            "needs models of the same data"
        )
    if allow:
        return
    from pyrovae.likelihoods import LIKELIHOODS

    for what, value in (
        ("likelihood families", lambda vae: LIKELIHOODS[vae.config.likelihood].support),
        ("conditioning (condition_dim)", lambda vae: vae.config.condition_dim),
    ):
        values = {name: value(vae) for name, vae in vaes.items()}
        if len(set(values.values())) > 1:
            listed = ", ".join(
                f"{name}: {vae.config.likelihood} on {values[name]}"
                if what.startswith("likelihood")
                else f"{name}: {values[name]}"
                for name, vae in vaes.items()
            )
            raise CLIError(
                f"the models have different {what} ({listed}), so their numbers measure "
                "different things (a probability against a density, or log p(x|y) against "
                "log p(x)); pass --allow-different-likelihoods if you know and want the "
                "comparison"
            )


def run_compare(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from types import SimpleNamespace

    from pyrovae import VAE
    from pyrovae.evaluation.comparison import compare
    from pyrovae.evaluation.importance import data_fingerprint
    from pyrovae.training import resolve_device

    check_device(args.device)
    check_method_options(args, explicit, {"num_samples": "--num-samples"})
    paths = _model_paths(args.models)
    ks = _check_quantity(args.quantity, args.method, args.num_samples)
    inputs = [*paths.values(), *(data_inputs(args.dataset, args.data_dir) if args.dataset else [])]
    if args.out is not None:
        check_out(args.out, "csv", inputs)
    device = resolve_device(args.device)
    vaes = {name: VAE.load(path, device=device) for name, path in paths.items()}
    _check_comparable(vaes, args.allow_different_likelihoods)
    datasets = {name: dataset_of(vae, args.dataset) for name, vae in vaes.items()}
    if len(set(datasets.values())) > 1:
        listed = ", ".join(f"{name}: {dataset}" for name, dataset in datasets.items())
        raise CLIError(
            f"the models were trained on different datasets ({listed}); pass --dataset to "
            "score them all on one"
        )
    dataset_name = next(iter(datasets.values()))
    dataset = load_data(dataset_name, args.data_dir)
    prepared = {
        name: prepare_data(vae, dataset, args.split, args.binarize, args.seed)
        for name, vae in vaes.items()
    }
    (data, described), *others = prepared.values()
    if any(not torch.equal(data, other) for other, _ in others):
        listed = ", ".join(
            f"{name}: --binarize {_binarize_mode(text)}" for name, (_, text) in prepared.items()
        )
        raise CLIError(
            f"--binarize {args.binarize} prepares different data for the models ({listed}); "
            "pass --binarize threshold, sample or none to score them all on the same points"
        )
    total = data.shape[0]
    used = first_points(data, args.num_points, default_points(args.method))
    data = data[:used]
    for vae in vaes.values():
        check_sizes(args, explicit, vae, used)
    apply_threads(args, max(vaes.values(), key=_size), out)
    out.summary(split_line(args.split, dataset_name, used, total, described))
    if args.method == "ais":
        out.summary(ais_settings_line(args))
    else:
        out.summary(
            f"importance sampling: {args.num_samples} draws per data point from each model's "
            f"guide (--num-samples), seed {args.seed} for every model"
        )
    fingerprint = data_fingerprint(data)
    scored = {}
    for name, vae in vaes.items():
        condition = None
        if vae.config.condition_dim:
            condition = labels_of(dataset, args.split, vae.config.condition_dim)[:used]
        started = time.perf_counter()
        result = _score(vae, data, condition, args, explicit, ks, out)
        out.info(f"scored {name} in {elapsed(started)}")
        scored[name] = SimpleNamespace(
            per_datapoint=result.per_datapoint, data_fingerprint=fingerprint
        )
    comparison = compare(scored, data, quantity=args.quantity, pairs=args.pairs)
    out.summary(comparison.table())
    if args.method == "ais":
        out.summary("AIS log_px is a stochastic lower bound for every model: E[log_px] <= log p(x)")
    elif args.quantity == "log_px":
        out.summary(
            "log_px by importance sampling is a stochastic lower bound whose bias depends on "
            "each model's guide; --method ais makes it depend on it far less"
        )
    if args.out is not None:
        write_out(args.out, _comparison_writer(comparison), "csv", out, "the comparison", inputs)
    return 0


def _size(vae) -> int:
    return sum(p.numel() for p in vae.parameters())


def _score(vae, data, condition, args, explicit: set, ks: tuple, out: Output):
    if args.method == "ais":
        from pyrovae.evaluation.ais import ais

        return ais(
            vae.model,
            vae.guide,
            *vae.inputs(data, condition),
            progress=out.progress_bars,
            **ais_options(args, explicit),
        )
    return vae.evaluate(
        data,
        num_samples=args.num_samples,
        ks=ks,
        seed=args.seed,
        max_pairs=args.max_pairs,
        latent_diagnostics=False,
        progress=out.progress_bars,
        condition=condition,
    )


def _comparison_writer(comparison):
    """One row per model (mean, se) and one per difference (mean, paired se as se,
    unpaired se, z)."""

    def write(handle) -> None:
        writer = csv.writer(handle)
        writer.writerow(["kind", "first", "second", "mean", "se", "unpaired_se", "z"])
        for row in comparison.ranking():
            writer.writerow(
                ["model", row["model"], "", f"{row['mean']:.6f}", f"{row['se']:.6f}", "", ""]
            )
        for row in comparison.differences():
            writer.writerow(
                [
                    "difference",
                    row["first"],
                    row["second"],
                    f"{row['difference']:.6f}",
                    f"{row['paired_se']:.6f}",
                    f"{row['unpaired_se']:.6f}",
                    f"{row['z']:.6f}",
                ]
            )

    return write
