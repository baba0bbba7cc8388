"""``pyrovae evaluate``: log p(x) per data point of a saved model, by importance sampling
(with ELBOs and IWAE bounds) or by annealed importance sampling (with a BDMC check)."""

from __future__ import annotations

import argparse
import time

from pyrovae.cli.common import CLIError, Output, apply_threads, data_inputs, elapsed, write_out
from pyrovae.cli.scoring import (
    ais_options,
    ais_settings_line,
    check_not_parallel,
    check_sizes,
    default_points,
    estimate_ais_time,
    load_scored,
)

BDMC_WIDTH_LIMIT = 1.0
"""Mean BDMC sandwich width (nats) above which --ais-steps is reported as too few."""


def dropped_ks_note(requested_ks, num_samples: int, result) -> str | None:
    """The CLI skips the k above K before evaluating; say so (the table's own notes cover
    k-hat from too few draws)."""
    dropped = [k for k in requested_ks if k > num_samples]
    if not dropped or getattr(result, "dropped_ks", None):
        return None
    listed = ", ".join(map(str, dropped))
    return (
        f"note: IWAE_k for k = {listed} not computed: k must be at most K = {num_samples} "
        f"draws per data point (raise --num-samples to {max(dropped)} or more to get it)"
    )


def _run_bdmc(vae, args: argparse.Namespace, explicit: set, out: Output) -> None:
    from pyrovae.evaluation.ais import bdmc

    started = time.perf_counter()
    sandwich = bdmc(
        vae.model,
        vae.guide,
        num_points=args.bdmc_points,
        progress=out.progress_bars,
        on_block=out.detail,
        **ais_options(args, explicit),
    )
    out.summary("")
    out.summary(
        f"BDMC: forward and reverse AIS with the same settings on {args.bdmc_points} data "
        f"points simulated from the model (--bdmc-points), {elapsed(started)}:"
    )
    out.summary(sandwich.table())
    width = sandwich.mean_width
    if width > BDMC_WIDTH_LIMIT:
        out.summary(
            f"mean width {width:.3f} nats is above ~{BDMC_WIDTH_LIMIT:g} nat: AIS with "
            f"{args.ais_steps} steps may understate log p(x) by about that much; raise "
            f"--ais-steps (e.g. {4 * args.ais_steps})"
        )
    else:
        out.summary(
            f"mean width {width:.3f} nats is below ~{BDMC_WIDTH_LIMIT:g} nat: {args.ais_steps} "
            "steps are enough for this model's simulated data (real data may be harder; if "
            "the mean width is above ~1 nat, raise --ais-steps)"
        )


def run_evaluate(args: argparse.Namespace, explicit: set, out: Output) -> int:
    if args.method == "ais":
        check_not_parallel("--method ais")
    scored = load_scored(args, explicit, out, default_points(args.method))
    vae = scored.vae
    if args.bdmc and vae.config.condition_dim:
        raise CLIError(
            "--bdmc simulates data from the model, which this conditional model (condition "
            "labels) cannot do without a condition; drop --bdmc"
        )
    check_sizes(args, explicit, vae, scored.data.shape[0])
    apply_threads(args, vae, out)
    out.summary(scored.split_line(args.split))
    if args.method == "ais":
        return _evaluate_ais(scored, args, explicit, out)
    ks = tuple(k for k in args.ks if k <= args.num_samples)
    result = vae.evaluate(
        scored.data,
        num_samples=args.num_samples,
        ks=ks,
        seed=args.seed,
        max_pairs=args.max_pairs,
        progress=out.progress_bars,
        condition=scored.condition,
    )
    if not out.main:
        return 0
    out.summary(result.table())
    note = dropped_ks_note(args.ks, args.num_samples, result)
    if note is not None:
        out.summary(note)
    write_results(result.per_datapoint, args, scored, out)
    return 0


def write_results(per_datapoint: dict, args, scored, out: Output, what="per-datapoint results"):
    """--out: the per-datapoint columns as CSV, through the guarded writer (never over the
    model or data files read)."""
    if args.out is None:
        return
    from pyrovae.evaluation.importance import per_datapoint_csv_writer

    inputs = [scored.path, *data_inputs(scored.name, args.data_dir)]
    write_out(args.out, per_datapoint_csv_writer(per_datapoint), "csv", out, what, inputs)


def _evaluate_ais(scored, args, explicit: set, out: Output) -> int:
    from pyrovae.evaluation.ais import ais

    vae = scored.vae
    out.summary(ais_settings_line(args))
    estimate_ais_time(vae, scored.inputs, args, explicit, out, scored.data.shape[0])
    started = time.perf_counter()
    result = ais(
        vae.model,
        vae.guide,
        *vae.inputs(*scored.inputs),
        progress=out.progress_bars,
        on_block=out.detail,
        **ais_options(args, explicit),
    )
    out.summary(result.table())
    out.summary(f"AIS took {elapsed(started)} for {result.num_points} data points")
    write_results(result.per_datapoint, args, scored, out)
    if args.bdmc:
        _run_bdmc(vae, args, explicit, out)
    return 0
