"""The documentation builds without a single warning and renders what it promises.

Sphinx runs in a subprocess, as a user would run it (``python -m sphinx -W --keep-going``),
into a temporary directory. The checks then read the HTML: every page of the table of contents
exists, equations reach MathJax, every cross-reference from the theory and tutorial pages to
pyrovae's code resolves to the API reference, and the tutorial pages show their scripts and
outputs.
"""

from __future__ import annotations

import html
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
THEORY_PAGES = (
    "models",
    "elbo",
    "reparameterization",
    "kl",
    "decoders",
    "importance-sampling",
    "objectives",
    "autoencoders",
)
TUTORIALS = ("fit_vae_digits", "custom_model", "compare_bounds", "compare_models")
GUIDE_PAGES = (
    "index",
    "getting_started",
    "own_model",
    "glossary",
    "pitfalls",
    "reporting",
    "exporting",
    "cli",
)
API_PAGES = ("models", "components", "training", "objectives", "evaluation", "data", "baselines")

MISSING = [name for name in ("sphinx", "myst_parser") if importlib.util.find_spec(name) is None]
pytestmark = pytest.mark.skipif(
    bool(MISSING),
    reason=f"documentation tools not installed ({', '.join(MISSING)}): pip install -e '.[docs]'",
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Build the HTML documentation once, treating every warning as an error."""
    output = tmp_path_factory.mktemp("docs") / "html"
    completed = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html"]
        + [str(DOCS), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert completed.returncode == 0, (
        f"sphinx-build failed or warned (exit {completed.returncode}):\n"
        f"{completed.stderr[-6000:]}{completed.stdout[-2000:]}"
    )
    return output


def page(site: Path, name: str) -> str:
    path = site / f"{name}.html"
    assert path.is_file(), f"{name}.html was not rendered"
    return path.read_text(encoding="utf-8")


def text_of(markup: str) -> str:
    """Visible text, tags removed, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", markup)).split())


def headings(markup: str) -> list[str]:
    return [
        text_of(h).rstrip("#¶ ") for h in re.findall(r"<h[12][^>]*>(.*?)</h[12]>", markup, re.S)
    ]


def test_every_page_of_the_table_of_contents_is_rendered(site):
    index = page(site, "index")
    assert "Where to start" in headings(index)
    for name in (
        *(f"theory/{p}" for p in ("index", *THEORY_PAGES)),
        *(f"tutorials/{p}" for p in ("index", *TUTORIALS)),
        *(f"api/{p}" for p in ("index", *API_PAGES)),
        *(f"guide/{p}" for p in GUIDE_PAGES),
    ):
        page(site, name)
    for report in ("evaluation", "reliability", "gallery", "benchmarks", "results"):
        if (DOCS / f"{report}.md").exists():  # written by others; listed by the glob toctree
            page(site, report)
            assert f'href="{report}.html"' in index


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("theory/elbo", ["The evidence lower bound", "First derivation: Jensen"]),
        ("theory/kl", ["Full covariance", "Diagonal Gaussian against the standard normal"]),
        ("theory/importance-sampling", ["Bias and standard error: the delta method"]),
        ("theory/objectives", ["DReG: doubly reparameterized IWAE gradients"]),
        ("tutorials/fit_vae_digits", ["Fit a VAE to the 8x8 digits and read its bounds"]),
        ("api/evaluation", ["Evaluation", "pyrovae.evaluation.importance"]),
    ],
)
def test_pages_have_their_headings(site, name, expected):
    found = headings(page(site, name))
    for heading in expected:
        assert any(heading in h for h in found), f"{heading!r} not among {found}"


def test_equations_are_handed_to_mathjax(site):
    markup = page(site, "theory/kl")
    assert re.search(r"<script[^>]+src=\"[^\"]*(mathjax|tex-[a-z-]+\.js)[^\"]*\"", markup, re.I)
    # MyST turned $...$ and $$...$$ into MathJax-delimited math, numbered per page.
    assert '<span class="math notranslate nohighlight">' in markup
    assert re.search(r'<div class="math notranslate nohighlight" id="equation-kl-full">', markup)
    assert "(4.1)" in markup
    assert r"\operatorname{tr}(S_p^{-1} S_q)" in html.unescape(markup)
    local = re.search(r'src="(?:\.\./)?(_static/mathjax/[^"?]+)', markup)
    if local:  # sphinx-mathjax-offline is installed: the script must have been copied
        assert (site / local.group(1)).is_file()


EXTERNAL = {"PyroModule"}
"""Names of other packages' objects that the pages mention with a role (not linked)."""


@pytest.mark.parametrize(
    "name",
    [f"theory/{p}" for p in ("index", *THEORY_PAGES)]
    + [f"tutorials/{p}" for p in TUTORIALS]
    + [f"guide/{p}" for p in GUIDE_PAGES]
    + ["index"],
)
def test_references_to_the_code_resolve(site, name):
    """Each {py:...} role naming pyrovae code links to its entry in the API reference."""
    markup = page(site, name)
    references = re.findall(r'(<a [^>]*>)?<code class="xref py[^"]*"[^>]*>(.*?)</code>', markup)
    unresolved = [
        text_of(target)
        for anchor, target in references
        if not anchor and text_of(target).rstrip("()") not in EXTERNAL
    ]
    assert not unresolved, f"{name}: unresolved references {unresolved}"
    for anchor, _ in references:
        if anchor:
            assert re.search(r'href="(\.\./)?api/\w+\.html#(module-)?pyrovae[.\w]*"', anchor), (
                anchor
            )
    if name.startswith("theory/") and name != "theory/index":
        assert len(references) >= 5, f"{name} names too little code"


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_pages_show_their_script_and_output(site, name):
    markup = page(site, f"tutorials/{name}")
    shown = text_of(markup)
    script = (DOCS / "tutorials" / f"{name}.py").read_text()
    first_code_line = next(
        line for line in script.splitlines() if line.startswith(("import ", "from "))
    )
    assert " ".join(first_code_line.split()) in shown
    output = (DOCS / "tutorials" / f"{name}.output.txt").read_text().strip().splitlines()
    assert " ".join(output[0].split()) in shown
    assert " ".join(output[-1].split()) in shown
    # Numbers quoted from the output are marked [0.104]{.printed} (tests/test_tutorials.py
    # checks them); the marker renders as a span, never as literal text.
    assert '<span class="printed">' in markup
    assert "{.printed}" not in shown


def main_text(markup: str) -> str:
    """The page's article, without the navigation sidebar (which links every page)."""
    match = re.search(r'<article[^>]*role="main"[^>]*>(.*?)</article>', markup, re.S)
    return match.group(1) if match else markup


def test_a_newcomer_reaches_the_three_questions_in_one_click(site):
    """From the index's own text: fit my own model, compare two models, what a number means."""
    article = main_text(page(site, "index"))
    for question, target in (
        ("Fit my own model", "guide/own_model.html"),
        ("Compare two models", "tutorials/compare_models.html"),
        ("What does this number mean", "guide/glossary.html"),
    ):
        assert question in text_of(article), question
        assert f'href="{target}' in article, target


def test_studies_and_reports_are_a_section_of_their_own(site):
    index = page(site, "index")
    captions = re.findall(r'<p class="caption[^"]*"[^>]*><span class="caption-text">([^<]+)', index)
    assert "Studies and reports" in captions
    guide = main_text(page(site, "guide/index"))
    assert 'href="../evaluation.html' in guide  # the page users need most is in the guide


def test_the_cli_reference_is_generated_from_the_parser(site):
    sys.path.insert(0, str(DOCS))
    from conf import cli_help_texts  # the function the page is built with

    shown = text_of(page(site, "guide/cli"))
    texts = cli_help_texts()
    assert {command for command, _, _ in texts} >= {
        "pyrovae",
        "pyrovae train",
        "pyrovae evaluate",
        "pyrovae compare",
        "pyrovae gaps",
    }
    for _, _, help_text in texts:
        for line in help_text.splitlines()[:3]:
            assert " ".join(line.split()) in shown


def test_the_glossary_defines_every_number(site):
    shown = text_of(page(site, "guide/glossary"))
    for term in (
        "nats per data point", "ELBO", "IWAE-k", "log p_hat", "SE", "paired SE", "ESS",
        "k-hat", "AIS", "BDMC width", "inference gap", "approximation gap",
        "amortization gap", "active units",
    ):
        assert term in shown, term
