"""Model specifications as files: a :class:`pyrovae.config.VAEConfig` written to and read
from JSON, TOML or YAML (chosen by the file extension), and the model's plate diagram.

Reading a file builds the config through ``VAEConfig.from_dict``, so unknown keys and
invalid combinations are refused with the same messages as in Python.
"""

from __future__ import annotations

import json
from pathlib import Path

import tomllib

from pyrovae.config import VAEConfig

FORMATS = (".json", ".toml", ".yaml", ".yml")


def _plain(config: VAEConfig) -> dict:
    """The config as JSON-like values: tuples as lists, ``None`` values left out (TOML has no
    null; omitted keys take their defaults, which is what ``None`` means here)."""
    return {
        key: list(value) if isinstance(value, tuple) else value
        for key, value in config.to_dict().items()
        if value is not None
    }


def _toml(values: dict) -> str:
    def literal(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return json.dumps(value)
        if isinstance(value, list):
            return "[" + ", ".join(literal(v) for v in value) + "]"
        return repr(value)

    return "".join(f"{key} = {literal(value)}\n" for key, value in values.items())


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ValueError(
            f"unknown spec format {suffix!r} of {path}; use one of {', '.join(FORMATS)}"
        )
    return suffix


def save_spec(config: VAEConfig, path: str | Path) -> Path:
    """Write ``config`` to ``path`` (``.json``, ``.toml``, ``.yaml`` or ``.yml``)."""
    path = Path(path)
    suffix, values = _format(path), _plain(config)
    if suffix == ".json":
        text = json.dumps(values, indent=2) + "\n"
    elif suffix == ".toml":
        text = _toml(values)
    else:
        import yaml

        text = yaml.safe_dump(values, sort_keys=False)
    from pyrovae.outputs import write_text

    return write_text(path, text).path


def load_spec(path: str | Path) -> VAEConfig:
    """Read a config written by :func:`save_spec` (or by hand) and validate it."""
    return VAEConfig.from_dict(read_spec_values(path))


def read_spec_values(path: str | Path) -> dict:
    """The mapping of VAEConfig fields a spec file holds (not yet validated).

    Raises
    ------
    ValueError
        An unknown format, text that is not valid JSON, TOML or YAML, or no mapping.
    """
    path = Path(path)
    suffix, text = _format(path), path.read_text()
    try:
        if suffix == ".json":
            values = json.loads(text)
        elif suffix == ".toml":
            values = tomllib.loads(text)
        else:
            import yaml

            values = yaml.safe_load(text)
    except ValueError:  # JSON and TOML errors are ValueErrors
        raise
    except Exception as error:  # yaml.YAMLError
        raise ValueError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} does not hold a mapping of options")
    return values


def render(vae, path: str | Path | None = None, filename_format: str = "png"):
    """Plate diagram of ``vae``'s Pyro model (``pyro.render_model``), on a few zero inputs.

    Needs the ``graphviz`` Python package and Graphviz's ``dot`` program. Returns the
    ``graphviz.Digraph``; with ``path``, also writes it there.
    """
    import pyro
    import torch

    width = vae.config.num_features
    x = torch.zeros(2, width, dtype=next(vae.parameters()).dtype)
    args = vae.inputs(
        x, torch.zeros(2, vae.config.condition_dim) if vae.config.condition_dim else None
    )
    graph = pyro.render_model(vae.model, model_args=args, render_distributions=True)
    if path is not None:
        path = Path(path)
        graph.render(path.with_suffix(""), format=filename_format, cleanup=True)
    return graph
