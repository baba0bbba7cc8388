"""``pyrovae gaps``: the inference gap of a saved model split into approximation and
amortization gaps, with the per-point optimization's convergence stated."""

from __future__ import annotations

import argparse
import time

from pyrovae.cli.common import CLIError, Output, apply_threads, elapsed
from pyrovae.cli.evaluate import write_results
from pyrovae.cli.parser import GAPS_DEFAULT_POINTS
from pyrovae.cli.scoring import (
    ais_options,
    ais_settings_line,
    check_sizes,
    estimate_ais_time,
    load_scored,
)


def run_gaps(args: argparse.Namespace, explicit: set, out: Output) -> int:
    from pyrovae.evaluation.gaps import decompose_gaps, local_guide

    scored = load_scored(args, explicit, out, GAPS_DEFAULT_POINTS, is_only={})
    vae, inputs = scored.vae, scored.inputs
    try:  # refuse an unsupported guide before any draw
        local_guide(vae.guide, *vae.inputs(*(t[:1] for t in inputs)), data_plate=vae.data_plate)
    except ValueError as error:
        raise CLIError(
            f"pyrovae gaps cannot decompose {scored.path} (guide {vae.config.guide!r}"
            f"{', two stochastic layers' if vae.config.top_latent_dim else ''}): {error}"
        ) from None
    check_sizes(args, explicit, vae, scored.data.shape[0])
    apply_threads(args, vae, out)
    out.summary(scored.split_line(args.split))
    started = time.perf_counter()
    log_px = None
    if args.method == "ais":
        from pyrovae.evaluation.ais import ais

        out.summary(ais_settings_line(args))
        estimate_ais_time(vae, inputs, args, explicit, out, scored.data.shape[0])
        log_px = ais(
            vae.model,
            vae.guide,
            *vae.inputs(*inputs),
            progress=out.progress_bars,
            **ais_options(args, explicit),
        )
    result = decompose_gaps(
        vae,
        *inputs,
        log_px=log_px,
        num_samples=args.num_samples,
        steps=args.steps,
        max_pairs=args.max_pairs,
        seed=args.seed,
    )
    if log_px is not None:
        result.log_px_source = (
            f"AIS with {args.ais_steps} steps and {args.ais_chains} chains (a stochastic lower "
            "bound: the approximation gap is understated by its bias)"
        )
    out.summary(result.table())
    out.summary(
        "inference gap = approximation gap (the guide's family) + amortization gap (the "
        f"encoder); {elapsed(started)}"
    )
    if not result.convergence.converged:
        out.summary(
            "warning: the per-point optimization has NOT converged: the amortization gap is "
            f"understated; raise --steps (now {args.steps})"
        )
    write_results(result.per_datapoint, args, scored, out, "per-datapoint gaps")
    return 0
