"""The command line as a package (issue 24): ``--help`` and argument errors without torch,
choices and defaults that mirror the library, no module over 600 lines, integers beyond
their range refused with the option's name, ``-v`` worded per command."""

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from pyrovae.cli import main

PACKAGE = Path(__file__).resolve().parents[1] / "pyrovae" / "cli"


def test_help_and_argument_errors_do_not_import_torch():
    code = (
        "import sys\n"
        "from pyrovae.cli import main\n"
        "for argv in (['--help'], ['train', '--help'], ['gaps', '--help'],\n"
        "             ['evaluate', '--model', 'm.pt', '--ais-steps', '0']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit as stop:\n"
        "        assert stop.code == (0 if argv[-1] == '--help' else 2), (argv, stop.code)\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'pyro', 'numpy'))\n"
        "assert not loaded, loaded[:5]\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_names_mirror_the_library():
    from pyrovae.cli import names
    from pyrovae.config import TrainConfig, VAEConfig
    from pyrovae.data import DATASETS, SPLIT_NAMES
    from pyrovae.likelihoods import LIKELIHOODS
    from pyrovae.networks import ACTIVATIONS
    from pyrovae.objectives import OBJECTIVES
    from pyrovae.posteriors import POSTERIORS
    from pyrovae.priors import PRIORS

    for mirror, registry in (
        (names.DATASETS, DATASETS),
        (names.LIKELIHOODS, LIKELIHOODS),
        (names.ACTIVATIONS, ACTIVATIONS),
        (names.OBJECTIVES, OBJECTIVES),
        (names.POSTERIORS, POSTERIORS),
        (names.PRIORS, PRIORS),
    ):
        assert mirror == tuple(sorted(registry))
    assert names.SPLIT_NAMES == tuple(SPLIT_NAMES)
    for mirror, config in ((names.VAE_DEFAULTS, VAEConfig), (names.TRAIN_DEFAULTS, TrainConfig)):
        defaults = {field.name: field.default for field in dataclasses.fields(config)}
        assert mirror == {name: defaults[name] for name in mirror}


def test_the_package_has_a_module_per_command_none_over_600_lines():
    modules = {path.stem: len(path.read_text().splitlines()) for path in PACKAGE.glob("*.py")}
    assert {"train", "evaluate", "compare", "gaps", "sample", "plot"} <= set(modules)
    assert max(modules.values()) <= 600, modules


@pytest.mark.parametrize(
    "argv, option",
    [
        (["train", "--seed", str(2**64)], "--seed"),
        (["evaluate", "--model", "m.pt", "--ais-steps", str(2**63)], "--ais-steps"),
        (["gaps", "--model", "m.pt", "--steps", str(2**63)], "--steps"),
        (["train", "--latent-dim", str(2**70)], "--latent-dim"),
    ],
)
def test_integers_beyond_range_are_refused_with_the_options_name(argv, option, tmp_path, capsys):
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert stop.value.code == 2 and option in err and "beyond the largest value" in err


def test_verbose_speaks_of_epochs_only_for_train(capsys):
    texts = {}
    for command in ("train", "evaluate", "sample"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        texts[command] = " ".join(capsys.readouterr().out.split())
    verbose = {c: t[t.index("--verbose") :][:160] for c, t in texts.items()}
    assert "one line per epoch" in verbose["train"]
    assert "epoch" not in verbose["evaluate"] and "epoch" not in verbose["sample"]


def test_python_evaluate_uses_one_thread_for_a_small_model_unless_chosen(monkeypatch):
    """The library's own default never oversubscribes: one torch thread for a small model
    during evaluate, torch's setting restored afterwards; a user's choice is kept."""
    import pyro
    import pyro.distributions as dist
    import torch

    from pyrovae import training
    from pyrovae.models.autoguide import AmortizedGuide
    from pyrovae.models.latent_variable import LatentVariableModel

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(0.0, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    x = torch.randn(10)
    guide = AmortizedGuide(model, x[:3], encoder_input=lambda x: x[:, None])
    fitted = LatentVariableModel(model, guide)
    seen = []
    original = fitted.evaluate_of

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return original(*args, **kwargs)

    monkeypatch.setattr(fitted, "evaluate_of", record)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(training, "_TORCH_DEFAULT_THREADS", 4)
    monkeypatch.setattr(training, "_chosen_threads", None)
    before = torch.get_num_threads()
    torch.set_num_threads(4)  # torch's default on a 4-core machine, say
    try:
        fitted.evaluate(x, num_samples=5, ks=(1,), latent_diagnostics=False)
        assert seen == [1] and torch.get_num_threads() == 4
        torch.set_num_threads(3)  # a choice of the user's: kept
        fitted.evaluate(x, num_samples=5, ks=(1,), latent_diagnostics=False)
        assert seen == [1, 3]
    finally:
        torch.set_num_threads(before)
