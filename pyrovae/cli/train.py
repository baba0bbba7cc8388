"""``pyrovae train``: fit a VAE by SVI into a run directory (lock, resume, --force)."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
from pathlib import Path

import numpy as np
import torch

from pyrovae.cli.common import (
    MODEL_FILE,
    NORMAL,
    CLIError,
    Output,
    apply_threads,
    check_device,
    class_count,
    labels_of,
    load_data,
    needs_binary,
    one_line,
    readable_file,
    write_failure,
    write_out,
)
from pyrovae.cli.rundir import (
    HISTORY_FILES,
    RunLock,
    check_free_space,
    check_not_replacing,
    check_run_dir,
    check_writable_dir,
    describe_replaced,
    remove_aside,
    set_aside,
)
from pyrovae.cli.train_options import MODEL_OPTIONS, RUN_OPTIONS, TRAIN_OPTIONS, destination

_MODEL_FLAGS = {field: destination(flag) for flag, field, *_ in MODEL_OPTIONS}
"""VAEConfig field: argparse destination."""
_TRAIN_FLAGS = {
    **{field: destination(flag) for flag, field, *_ in (*TRAIN_OPTIONS, *RUN_OPTIONS)},
    "seed": "seed",
    "device": "device",
}
"""TrainConfig field: argparse destination."""


def read_spec(path: Path) -> dict:
    """The mapping of VAEConfig fields in a spec file (``num_features`` and ``image_shape``
    may be left out: the dataset gives them)."""
    from pyrovae.spec import FORMATS as SPEC_FORMATS
    from pyrovae.spec import read_spec_values

    suffix = path.suffix.lower()
    if suffix not in SPEC_FORMATS:
        raise CLIError(f"--spec {path}: unknown format {suffix!r}; use {', '.join(SPEC_FORMATS)}")
    readable_file(path, "--spec", "pass a spec file written by pyrovae.spec.save_spec or by hand")
    try:
        return read_spec_values(path)
    except (OSError, UnicodeDecodeError, ValueError) as error:
        if "mapping" in str(error):
            raise CLIError(f"--spec {path} does not hold a mapping of VAEConfig options") from None
        raise CLIError(f"--spec {path} is not valid {suffix[1:]}: {one_line(str(error))}") from None


def _resume_payload(path: Path) -> dict:
    """The checkpoint a ``--resume`` continues, checked to the last field before anything
    runs: a malformed training state is one error line, not a traceback after loading."""
    from pyrovae.checkpoint import read_checkpoint
    from pyrovae.config import TrainConfig, VAEConfig

    if not path.exists():
        raise CLIError(
            f"cannot resume: {path} does not exist; train without --resume to start the run"
        )
    readable_file(path, "--out model file", "remove it and train afresh")
    payload = read_checkpoint(path)
    fix = "restore the file from a backup, or start afresh with --force"
    try:
        state = payload.get("training_state")
        if not isinstance(state, dict):
            raise CLIError(
                f"cannot resume: {path} holds no training state (a model saved without one); "
                "train afresh with --force, or into another --out"
            )
        _check_training_state(payload, state)
        VAEConfig.from_dict(payload["config"])
        TrainConfig.from_dict(payload["train_config"])
    except CLIError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, RuntimeError) as error:
        what = f"{type(error).__name__}: {one_line(str(error))}"
        raise CLIError(
            f"cannot resume: {path} holds a malformed training state ({what}); {fix}"
        ) from None
    return payload


def _check_training_state(payload: dict, state: dict) -> None:
    """Raise unless every part a resumed fit restores can be restored (tried on scratch
    objects: no global random stream changes)."""
    from pyrovae import VAE
    from pyrovae.config import VAEConfig

    epoch = state["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise ValueError(f"epoch is {epoch!r}, not a non-negative integer")
    history = payload["history"]
    if not isinstance(history, list) or len(history) != epoch:
        raise ValueError(f"history holds {len(history)} epochs, the training state {epoch}")
    if not all(isinstance(record, dict) and "epoch" in record for record in history):
        raise ValueError("history records are not per-epoch mappings")
    rngs = [state["rng"], *state.get("rng_of_ranks", [])]
    for rng in rngs:
        torch.Generator().set_state(rng["torch"])
        python = rng["python"]
        random.Random().setstate((python["version"], tuple(python["internal"]), python["gauss"]))
        numpy = rng["numpy"]
        np.random.RandomState().set_state(
            (
                numpy["name"],
                numpy["keys"].numpy().astype(np.uint32),
                numpy["position"],
                numpy["has_gauss"],
                numpy["cached"],
            )
        )
        if not isinstance(rng["cuda"], list):
            raise TypeError("rng['cuda'] is not a list")
        if "generator" in rng and not isinstance(rng["generator"], torch.Tensor):
            raise TypeError("rng['generator'] is not a tensor")
    if "schedule" in state and not isinstance(state["schedule"], dict):
        raise TypeError("schedule state is not a mapping")
    with torch.random.fork_rng(devices=[]):
        vae = VAE(VAEConfig.from_dict(payload["config"]))
    vae.load_state_dict(payload["model_state"])
    optimizer = torch.optim.Adam(vae.parameters())
    optimizer.load_state_dict(payload["optimizer_state"])


def _model_values(args, explicit: set, saved: dict | None, spec: dict | None) -> dict:
    """VAEConfig fields: command line over spec file over a resumed run's over defaults."""
    values = dict(saved["config"]) if saved is not None else {}
    if spec is not None:
        values.update(spec)
    for field, dest in _MODEL_FLAGS.items():
        if dest in explicit or field not in values:
            values[field] = getattr(args, dest)
    return values


def _fill_data_shape(values: dict, dataset, origin: str) -> None:
    for field, actual in (
        ("num_features", dataset.num_features),
        ("image_shape", tuple(dataset.image_shape)),
    ):
        given = values.get(field)
        if given is None:
            values[field] = actual
        elif (tuple(given) if isinstance(given, list) else given) != actual:
            raise CLIError(
                f"{origin} has {field}={given!r} but dataset {dataset.name} has {actual!r}; "
                "use a matching --dataset or remove the field"
            )


def _resolve_binarize(requested: str, likelihood: str, dataset) -> tuple[str, str]:
    """Training binarization and a sentence saying what it does to the data."""
    mode = requested
    if requested == "auto":
        mode = "dynamic" if needs_binary(likelihood) and not dataset.binary else "none"
    values = "0/1 values" if dataset.binary else "grey levels in [0, 1]"
    why = (
        f", chosen by auto: the {likelihood} likelihood needs 0/1 values"
        if requested == "auto"
        else ""
    )
    text = {
        "dynamic": f"{values} binarized by a fresh Bernoulli draw of every minibatch "
        f"(--binarize dynamic{why}; validation data: one draw seeded with --seed + 1)",
        "static": f"{values} thresholded at 0.5 once (--binarize static)",
        "none": f"{values}, used as they are (--binarize none"
        + (", auto" if requested == "auto" else "")
        + ")",
    }[mode]
    return mode, text


def run_train(args: argparse.Namespace, explicit: set, out: Output) -> int:
    run_dir: Path = args.out
    check_device(args.device)
    check_run_dir(run_dir)
    check_not_replacing(run_dir, args.resume, args.force)
    spec = read_spec(args.spec) if getattr(args, "spec", None) is not None else None
    lock = RunLock(run_dir) if out.main else None
    with lock if lock is not None else contextlib.nullcontext():
        if lock is not None and lock.took_over:
            out.info(f"note: took over the stale lock {lock.path} of {lock.took_over}")
        check_not_replacing(run_dir, args.resume, args.force)  # again, now that we hold it
        return _train_locked(args, explicit, out, spec)


def _settings(args, explicit: set, out: Output, saved: dict | None, spec: dict | None):
    """The dataset, VAEConfig, TrainConfig, metadata, condition and a sentence on the data,
    from command line, spec file, resumed run and defaults (in that order)."""
    from pyrovae.config import TrainConfig, VAEConfig

    dataset_name = args.dataset
    if saved is not None and "dataset" not in explicit:
        dataset_name = (saved.get("metadata") or {}).get("dataset", dataset_name)
    dataset = load_data(dataset_name, args.data_dir)
    values = _model_values(args, explicit, saved, spec)
    origin = f"--spec {args.spec}" if spec is not None else str(args.out / MODEL_FILE)
    _fill_data_shape(values, dataset, origin)
    metadata = {"dataset": dataset_name}
    condition = args.condition
    if saved is not None and "condition" not in explicit:
        condition = (saved.get("metadata") or {}).get("condition", "none")
    if spec is not None and values.get("condition_dim") and "condition" not in explicit:
        condition = "labels"
    if condition == "labels":
        classes = class_count(dataset)
        if values.get("condition_dim", classes) not in (0, classes):
            raise CLIError(
                f"condition_dim={values['condition_dim']} does not match the {classes} classes "
                f"of {dataset_name}, which --condition labels gives one-hot"
            )
        values["condition_dim"] = classes
        metadata["condition"] = "labels"
    elif values.get("condition_dim"):
        raise CLIError(
            "the model is conditional (condition_dim > 0); pass --condition labels, or set "
            "condition_dim to 0"
        )
    config = VAEConfig.from_dict(values)
    train_values = dict(saved["train_config"]) if saved is not None else {}
    for field, dest in _TRAIN_FLAGS.items():
        if dest in explicit or field not in train_values:
            train_values[field] = getattr(args, dest)
    requested = args.binarize
    if "binarize" not in explicit and "binarize" in train_values:
        requested = train_values["binarize"]
    train_values["binarize"], described = _resolve_binarize(requested, config.likelihood, dataset)
    train_values["progress"] = out.level >= NORMAL and out.main
    return dataset, config, TrainConfig.from_dict(train_values), metadata, condition, described


def _train_locked(args, explicit: set, out: Output, spec: dict | None) -> int:
    from pyrovae import VAE

    run_dir: Path = args.out
    model_path = run_dir / MODEL_FILE
    saved = _resume_payload(model_path) if args.resume else None
    done = len(saved["history"]) if saved is not None else 0
    dataset, config, train_config, metadata, condition, described = _settings(
        args, explicit, out, saved, spec
    )
    train, valid = dataset.train, dataset.valid
    if condition == "labels":
        train = (train, labels_of(dataset, "train", config.condition_dim))
        valid = (valid, labels_of(dataset, "valid", config.condition_dim))
    out.info(
        f"data: {dataset.name}, {dataset.train.shape[0]} training and {dataset.valid.shape[0]} "
        f"validation points of {dataset.num_features} features; {described}"
    )
    out.detail(f"model: {json.dumps(config.to_dict())}")
    out.detail(f"training: {json.dumps(train_config.to_dict())}")
    if run_dir.is_dir():
        check_writable_dir(run_dir)
    vae = VAE(config, seed=train_config.seed)
    vae.metadata_ = metadata
    apply_threads(args, vae, out)
    if out.main:
        check_free_space(run_dir, vae)
    aside = set_aside(run_dir) if args.force and out.main else None
    if aside is not None:
        out.summary(describe_replaced(aside))
        _remove_after_first_checkpoint(vae, aside)
    try:
        history = vae.fit(
            train, valid, checkpoint_path=model_path, resume=args.resume, **train_config.to_dict()
        )
    except OSError as error:
        raise CLIError(write_failure(error, model_path, resumable=True)) from None
    if not out.main:
        return 0
    writers = (_jsonl_writer(history), _csv_writer(history))
    for name, write in zip(HISTORY_FILES, writers, strict=True):
        write_out(run_dir / name, write, name.rsplit(".", 1)[1], None, name)
    out.summary(_trained_line(history, done, vae, train_config))
    written = ", ".join(str(p) for p in (model_path, *(run_dir / f for f in HISTORY_FILES)))
    out.summary(f"wrote {written}")
    return 0


def _remove_after_first_checkpoint(vae, aside: Path) -> None:
    """Remove the set-aside old run once the new run's first checkpoint is on disk."""
    save = vae.save

    def save_then_remove(*arguments, **options):
        written = save(*arguments, **options)
        remove_aside(aside)
        vae.save = save
        return written

    vae.save = save_then_remove


def _jsonl_writer(history):
    return lambda handle: handle.writelines(json.dumps(r) + "\n" for r in history.records)


def _csv_writer(history):
    from pyrovae.training import write_history_csv

    return lambda handle: write_history_csv(history, handle)


def _trained_line(history, done: int, vae, train_config) -> str:
    ran = len(history) - done
    epochs = f"{ran} epoch{'' if ran == 1 else 's'}"
    if done:
        epochs += f" (epochs {done + 1} to {len(history)}; {done} before the resume)"
    seconds = sum(history.column("seconds")[done:])
    path_taken = getattr(vae, "training_path_", None)
    taken = "" if path_taken is None else f" ({path_taken} path, --compile {train_config.compile})"
    last = history.records[-1]
    objective = "train ELBO" if "train_elbo" in last else f"train {train_config.objective}"
    value = last.get("train_elbo", last.get("train_objective"))
    return (
        f"trained {epochs} in {seconds:.1f} s{taken}; {objective} {value:.2f}, validation "
        f"ELBO {last['valid_elbo']:.2f} nats per data point"
    )
