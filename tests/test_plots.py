"""Tests of the figures (pyrovae.plots), latent-space helpers and the `pyrovae plot` command."""

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from pyrovae import VAE, plots
from pyrovae.cli import main
from pyrovae.data import binarize, load_digits
from pyrovae.latent_space import apply_attribute, attribute_vector, interpolate

CLI_KINDS = ("samples", "reconstructions", "curves", "latent", "manifold", "interpolation")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """Two tiny models trained by `pyrovae train` on the digits: 2-D and 3-D latent."""
    dirs = {}
    for latent_dim, epochs in ((2, 2), (3, 1)):
        out = tmp_path_factory.mktemp(f"latent{latent_dim}")
        arguments = ["train", "--hidden", "32", "--latent-dim", str(latent_dim)]
        arguments += ["--epochs", str(epochs), "--batch-size", "64", "--binarize", "dynamic"]
        assert main([*arguments, "--quiet", "--out", str(out)]) == 0
        dirs[latent_dim] = out
    return dirs


@pytest.fixture(scope="module")
def vae2(model_dirs):
    return VAE.load(model_dirs[2] / "model.pt")


@pytest.fixture(scope="module")
def vae3(model_dirs):
    return VAE.load(model_dirs[3] / "model.pt")


@pytest.fixture(scope="module")
def test_data():
    """Binarized digits test split and its labels."""
    digits = load_digits()
    return binarize(digits.test, generator=torch.Generator().manual_seed(0)), digits.test_labels


def grid_shape(count: int, columns: int, size: int = 8) -> tuple[int, int]:
    rows = math.ceil(count / columns)
    return rows * (size + 1) + 1, columns * (size + 1) + 1


# ----------------------------------------------------------------------------- figures


def test_prior_samples_figure(vae2):
    figure = plots.prior_samples_figure(vae2, num=10, seed=1)
    assert isinstance(figure, Figure)
    (ax,) = figure.axes
    assert "prior" in ax.get_title() and "E[x|z]" in ax.get_title()
    assert ax.images[0].get_array().shape == grid_shape(10, 4)
    observation = plots.prior_samples_figure(vae2, num=4, kind="observation")
    assert "p(x|z)" in observation.axes[0].get_title()
    values = np.unique(observation.axes[0].images[0].get_array())
    assert set(values) <= {0.0, 1.0, plots.GAP_VALUE}
    with pytest.raises(ValueError, match="kind"):
        plots.prior_samples_figure(vae2, kind="median")
    with pytest.raises(ValueError, match="num"):
        plots.prior_samples_figure(vae2, num=0)


def test_reconstruction_figure_rows(vae2, test_data):
    x, _ = test_data
    figure = plots.reconstruction_figure(vae2, x, num=5)
    top, bottom = figure.axes
    assert top.get_ylabel() == "data x"
    assert bottom.get_ylabel().startswith("reconstruction")
    shown = top.images[0].get_array()
    assert shown.shape == grid_shape(5, 5)
    np.testing.assert_array_equal(shown[1:9, 1:9], x[0].reshape(8, 8).numpy())
    expected = vae2.reconstruct(x[:5])[4].reshape(8, 8).numpy()
    np.testing.assert_allclose(bottom.images[0].get_array()[1:9, 37:45], expected, rtol=1e-6)
    assert plots.reconstruction_figure(vae2, x, num=20).axes[0].images[0].get_array().shape == (
        grid_shape(20, 16)
    )


def test_training_curves_figure(vae2):
    figure = plots.training_curves_figure(vae2.history_)
    (ax,) = figure.axes
    assert ax.get_xlabel() == "epoch"
    assert "nats per data point" in ax.get_ylabel()
    labels = [line.get_label() for line in ax.get_lines()]
    assert labels == [plots.CURVE_LABELS["train_elbo"], plots.CURVE_LABELS["valid_elbo"]]
    np.testing.assert_allclose(ax.get_lines()[1].get_ydata(), vae2.history_.column("valid_elbo"))


def test_training_curves_plot_iwae_and_clip_first_epochs():
    records = [
        {"epoch": e, "train_elbo": -30 + e, "valid_elbo": None, "valid_iwae_5": -29.5 + e}
        for e in range(1, 21)
    ]
    records[0]["train_elbo"] = -500.0
    (ax,) = plots.training_curves_figure(records).axes
    assert [line.get_label() for line in ax.get_lines()] == [
        plots.CURVE_LABELS["train_elbo"],
        "valid_iwae_5",
    ]
    assert "clipped" in ax.get_title()
    assert ax.get_ylim()[0] > -100
    (short,) = plots.training_curves_figure(records[:5]).axes
    assert "clipped" not in short.get_title()
    with pytest.raises(ValueError, match="no epochs"):
        plots.training_curves_figure([])


def test_latent_scatter_figure_2d_has_legend(vae2, test_data):
    x, labels = test_data
    figure = plots.latent_scatter_figure(vae2, x, labels)
    ax = figure.axes[0]
    assert ax.get_xlabel() == "$z_1$ (posterior mean)"
    assert ax.get_ylabel() == "$z_2$ (posterior mean)"
    (legend,) = figure.legends
    assert [text.get_text() for text in legend.get_texts()] == [str(d) for d in range(10)]
    np.testing.assert_allclose(ax.collections[0].get_offsets(), vae2.encode(x)[0].numpy())


def test_latent_scatter_figure_uses_pca_above_two_dimensions(vae3, test_data):
    x, labels = test_data
    ax = plots.latent_scatter_figure(vae3, x, labels).axes[0]
    assert ax.get_xlabel().startswith("PC 1 of the 3-D posterior means")
    assert ax.get_ylabel().startswith("PC 2 of the 3-D posterior means")
    assert "% of variance" in ax.get_xlabel()


def test_latent_scatter_figure_colour_bar_for_numeric_labels(vae2, test_data):
    x, _ = test_data
    figure = plots.latent_scatter_figure(vae2, x, np.linspace(0, 1, len(x)))
    assert len(figure.axes) == 2  # the scatter and its colour bar
    assert figure.axes[1].get_ylabel() == "label"
    with pytest.raises(ValueError, match="labels"):
        plots.latent_scatter_figure(vae2, x, np.zeros(3))


def test_manifold_figure(vae2, vae3):
    figure = plots.manifold_figure(vae2, grid=5)
    (ax,) = figure.axes
    assert ax.images[0].get_array().shape == grid_shape(25, 5)
    assert ax.get_xlabel().startswith("$z_1$") and ax.get_ylabel().startswith("$z_2$")
    # Tick labels are the prior quantiles 0.05 ... 0.95 (z_2 decreasing downwards).
    assert [t.get_text() for t in ax.get_xticklabels()] == [
        "\N{MINUS SIGN}1.6",
        "\N{MINUS SIGN}0.6",
        "0.0",
        "0.6",
        "1.6",
    ]
    assert ax.get_yticklabels()[0].get_text() == "1.6"
    with pytest.raises(ValueError, match="2-D latent space; this model has latent_dim=3"):
        plots.manifold_figure(vae3)
    with pytest.raises(ValueError, match="grid"):
        plots.manifold_figure(vae2, grid=1)


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_figure(vae3, test_data, method):
    x, _ = test_data
    figure = plots.interpolation_figure(vae3, x[:3], x[3:6], steps=6, method=method)
    left, middle, right = figure.axes
    assert left.get_title() == "$x_a$" and right.get_title() == "$x_b$"
    assert ("Linear" if method == "linear" else "slerp") in middle.get_title()
    assert middle.images[0].get_array().shape == grid_shape(18, 6)
    assert [t.get_text() for t in middle.get_xticklabels()][::5] == ["0.00", "1.00"]
    # The path's end tiles decode the endpoints' posterior means.
    end = vae3.decode(vae3.encode(x[3:4])[0])[0].reshape(8, 8).numpy()
    np.testing.assert_allclose(middle.images[0].get_array()[1:9, 46:54], end, rtol=1e-5)
    single = plots.interpolation_figure(vae3, x[0], x[1], steps=3)
    assert single.axes[1].images[0].get_array().shape == grid_shape(3, 3)


def test_arithmetic_figure(vae3, test_data):
    x, labels = test_data
    figure = plots.arithmetic_figure(vae3, x, labels, 1, 7, strengths=(0, 1, 2), num=4)
    left, right = figure.axes
    assert right.images[0].get_array().shape == grid_shape(12, 3)
    assert [t.get_text() for t in right.get_xticklabels()] == ["0", "1", "2"]
    assert "'7'" in right.get_title() and "'1'" in right.get_title()
    assert left.images[0].get_array().shape == grid_shape(4, 1)


def test_comparison_figures(test_data):
    x, labels = test_data
    rows = {"data": x[:6], "model A": x[:6] * 0.5, "model B": x[:3]}
    figure = plots.image_rows_figure(rows, (8, 8), title="reconstructions")
    assert [ax.get_ylabel() for ax in figure.axes] == list(rows)
    assert figure.get_suptitle() == "reconstructions"
    codes = {"2-D": np.random.default_rng(0).normal(size=(len(x), 2)), "4-D": x[:, :4]}
    figure = plots.latent_comparison_figure(codes, labels)
    visible = [ax for ax in figure.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["2-D", "4-D"]
    assert visible[1].get_xlabel().startswith("PC 1 of the 4-D codes")
    with pytest.raises(ValueError, match="empty"):
        plots.image_rows_figure({}, (8, 8))


def test_save_figure_writes_png_and_pdf(vae2, tmp_path):
    figure = plots.prior_samples_figure(vae2, num=4)
    paths = plots.save_figure(figure, tmp_path / "sub" / "samples.png", dpi=50)
    assert paths == [tmp_path / "sub" / "samples.png", tmp_path / "sub" / "samples.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert paths[1].read_bytes()[:5] == b"%PDF-"
    only_png = plots.save_figure(figure, tmp_path / "x.v1", formats=("png",), dpi=50)
    assert only_png == [tmp_path / "x.v1.png"]
    with pytest.raises(ValueError, match="formats"):
        plots.save_figure(figure, tmp_path / "y", formats=("svg",))


def test_import_leaves_matplotlib_global_state_alone():
    # The raw rcParams entry: matplotlib.get_backend() would itself import pyplot.
    code = (
        "import sys, matplotlib;"
        "backend = lambda: dict.__getitem__(matplotlib.rcParams, 'backend');"
        "before = backend();"
        "import pyrovae.plots, pyrovae.latent_space, pyrovae.baselines, pyrovae.cli;"
        "from pyrovae.plots import _new_figure;"
        "_new_figure(1, 1).savefig('/dev/null', format='png');"
        "assert 'matplotlib.pyplot' not in sys.modules, 'pyplot imported';"
        "assert 'torchvision' not in sys.modules, 'torchvision imported';"
        "assert backend() == before, (before, backend())"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ----------------------------------------------------------------------------- command line


@pytest.mark.parametrize("kind", CLI_KINDS)
def test_cli_plot_writes_each_kind(model_dirs, tmp_path, capsys, kind):
    out = tmp_path / kind
    arguments = ["plot", kind, "--model", str(model_dirs[2] / "model.pt"), "--out", str(out)]
    assert main([*arguments, "--num", "4"]) == 0
    for suffix in (".png", ".pdf"):
        assert out.with_suffix(suffix).stat().st_size > 1000
    assert f"wrote {out}.png, {out}.pdf" in capsys.readouterr().out


def test_cli_plot_options_and_errors(model_dirs, tmp_path, capsys):
    model3 = str(model_dirs[3] / "model.pt")
    assert main(["plot", "manifold", "--model", model3, "--out", str(tmp_path / "m")]) == 2
    assert "2-D latent space" in capsys.readouterr().err
    assert not (tmp_path / "m.png").exists()
    arguments = ["plot", "interpolation", "--model", model3, "--out", str(tmp_path / "i")]
    arguments += ["--method", "spherical", "--dataset", "digits", "--split", "valid"]
    assert main([*arguments, "--formats", "png", "--seed", "3"]) == 0
    assert (tmp_path / "i.png").is_file() and not (tmp_path / "i.pdf").exists()
    with pytest.raises(SystemExit):
        main(["plot", "latent", "--model", model3, "--out", str(tmp_path / "l"), "--num", "0"])
    with pytest.raises(SystemExit):
        main(["plot", "histogram", "--model", model3, "--out", str(tmp_path / "h")])


def test_model_figure_checks_its_inputs(vae2):
    with pytest.raises(ValueError, match="unknown kind"):
        plots.model_figure("bars", vae2)
    with pytest.raises(ValueError, match="needs data"):
        plots.model_figure("latent", vae2)
    with pytest.raises(ValueError, match="labels"):
        plots.model_figure("latent", vae2, data=torch.zeros(3, 64))
    with pytest.raises(ValueError, match="pairs"):
        plots.model_figure("interpolation", vae2, data=torch.zeros(3, 64), num=2)


# ----------------------------------------------------------------------------- latent space


@pytest.mark.parametrize("method", ["linear", "spherical"])
def test_interpolation_endpoints_are_the_inputs(method):
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(2, 5, generator=generator)
    path = interpolate(a, b, steps=7, method=method)
    assert path.shape == (7, 5)
    assert torch.equal(path[0], a) and torch.equal(path[-1], b)
    batch_a, batch_b = torch.randn(2, 3, 5, generator=generator)
    paths = interpolate(batch_a, batch_b, steps=4, method=method)
    assert paths.shape == (3, 4, 5)
    assert torch.equal(paths[:, 0], batch_a) and torch.equal(paths[:, -1], batch_b)
    for row in range(3):
        torch.testing.assert_close(paths[row], interpolate(batch_a[row], batch_b[row], 4, method))


def test_linear_interpolation_is_evenly_spaced():
    path = interpolate(torch.zeros(2), torch.tensor([1.0, -2.0]), steps=5)
    torch.testing.assert_close(path[:, 0], torch.linspace(0, 1, 5))
    torch.testing.assert_close(path[:, 1], torch.linspace(0, -2, 5))


def test_slerp_preserves_norm_of_equal_norm_endpoints():
    generator = torch.Generator().manual_seed(1)
    a, b = torch.randn(2, 16, generator=generator, dtype=torch.float64)
    b = b * (a.norm() / b.norm())
    path = interpolate(a, b, steps=11, method="spherical")
    torch.testing.assert_close(path.norm(dim=-1), a.norm().expand(11))
    # Equal angular steps: consecutive points are equally far apart.
    gaps = (path[1:] - path[:-1]).norm(dim=-1)
    torch.testing.assert_close(gaps, gaps[0].expand(10))
    # Linear interpolation cuts through the ball instead.
    assert interpolate(a, b, 11)[5].norm() < 0.95 * a.norm()


def test_slerp_falls_back_to_lerp_for_parallel_endpoints():
    a = torch.tensor([1.0, 2.0, -1.0])
    for b in (2.0 * a, a.clone(), a + 1e-9):
        spherical = interpolate(a, b, steps=5, method="spherical")
        assert torch.isfinite(spherical).all()
        torch.testing.assert_close(spherical, interpolate(a, b, steps=5, method="linear"))


def test_interpolate_checks_its_arguments():
    with pytest.raises(ValueError, match="method"):
        interpolate(torch.zeros(2), torch.ones(2), method="cubic")
    with pytest.raises(ValueError, match="steps"):
        interpolate(torch.zeros(2), torch.ones(2), steps=1)
    with pytest.raises(ValueError, match="differ in shape"):
        interpolate(torch.zeros(2), torch.ones(3))
    with pytest.raises(ValueError, match="shape"):
        interpolate(torch.zeros(1, 2, 3), torch.ones(1, 2, 3))


class LinearEncoder:
    """Stand-in model: the posterior mean is a fixed linear map of x."""

    def __init__(self, weight: torch.Tensor):
        self.weight = weight

    def encode(self, x):
        loc = torch.as_tensor(x, dtype=torch.float64) @ self.weight
        return loc, torch.ones_like(loc)


def test_attribute_vector_points_from_one_group_to_the_other():
    generator = torch.Generator().manual_seed(2)
    direction = torch.tensor([3.0, -1.0, 0.5, 0.0], dtype=torch.float64)
    base = torch.randn(400, 4, generator=generator, dtype=torch.float64)
    labels = np.array(["plain"] * 200 + ["smiling"] * 200)
    x = base + torch.from_numpy(labels == "smiling")[:, None] * direction
    identity = LinearEncoder(torch.eye(4, dtype=torch.float64))
    vector = attribute_vector(identity, x, labels, "plain", "smiling")
    # Exactly the difference of the group means of the codes ...
    torch.testing.assert_close(vector, x[200:].mean(0) - x[:200].mean(0))
    # ... which recovers the planted direction up to sampling noise.
    cosine = torch.nn.functional.cosine_similarity(vector, direction, dim=0)
    assert cosine > 0.99
    torch.testing.assert_close(attribute_vector(identity, x, labels, "smiling", "plain"), -vector)
    # Codes of a linear encoder move by the mapped direction.
    weight = torch.randn(4, 2, generator=generator, dtype=torch.float64)
    mapped = attribute_vector(LinearEncoder(weight), x, labels, "plain", "smiling")
    torch.testing.assert_close(mapped, vector @ weight)
    with pytest.raises(ValueError, match="no data point has label 'frowning'"):
        attribute_vector(identity, x, labels, "plain", "frowning")
    with pytest.raises(ValueError, match="one per data point"):
        attribute_vector(identity, x, labels[:10], "plain", "smiling")


def test_apply_attribute():
    z = torch.zeros(3, 2)
    vector = torch.tensor([1.0, -2.0])
    torch.testing.assert_close(apply_attribute(z, vector, 0.5), z + 0.5 * vector)
    moved = apply_attribute(z, vector, [0.0, 1.0, 2.0])
    assert moved.shape == (3, 3, 2)
    torch.testing.assert_close(moved[:, 2], z + 2 * vector)
    assert apply_attribute(torch.zeros(2), vector, [1.0, 3.0]).shape == (2, 2)
    with pytest.raises(ValueError, match="vector"):
        apply_attribute(z, torch.ones(3))
