"""The documentation builds without warnings, with every tutorial executed on a few epochs.

One Sphinx build (``sphinx-build -W --keep-going -j 2 -b html``; ``docs/conf.py`` spreads the tutorials over the two
reading processes) into a temporary folder, shared by the checks below.
Skipped when the ``docs`` extra (Sphinx, MyST-NB, furo) is not installed.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sphinx", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("myst_nb", reason="the docs extra is not installed (pip install -e '.[docs]')")
pytest.importorskip("furo", reason="the docs extra is not installed (pip install -e '.[docs]')")

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
TUTORIALS = sorted(path.stem for path in (DOCS / "tutorials").glob("*.md"))
DLPFC = Path(os.environ.get("SPAVAE_DLPFC_DIR", REPO.parent / "shared" / "data" / "dlpfc")) / "sample_151507.h5"
QUICK_EPOCHS = "3"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def html(tmp_path_factory) -> Path:
    """Build the site once; fail with Sphinx's own report when the build warns or a notebook fails."""
    out = tmp_path_factory.mktemp("docs")
    # One thread per kernel: the build may share the 2 CPU cores with other work, and torch/OpenMP
    # oversubscription makes the tutorials many times slower.
    env = os.environ | {"SPAVAE_DOCS_EPOCHS": QUICK_EPOCHS, "SPAVAE_DOCS_TIMEOUT": "300",
                        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    result = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-j", "2", "-b", "html",
         "-d", str(out / "doctrees"), str(DOCS), str(out / "html")],
        env=env, capture_output=True, text=True, timeout=1500,
    )
    stderr = re.sub(r"\x1b\[[0-9;]*m", "", result.stderr)  # warnings, with a failed cell's traceback
    report = "\n".join(line for line in stderr.splitlines()
                       if line.strip() and "IPKernelApp" not in line and "traitlets" not in line)
    assert result.returncode == 0, f"sphinx-build failed (exit {result.returncode}):\n{report[-8000:]}"
    return out / "html"


def test_tutorial_list_is_complete():
    assert set(TUTORIALS) == {"quickstart", "spatial_domains", "interpolation_enhancement",
                              "spatially_variable_genes", "multi_section", "space_ranger", "image_view",
                              "probabilistic_programming"}
    index = (DOCS / "index.md").read_text()
    missing = [name for name in TUTORIALS if f"tutorials/{name}\n" not in index]
    assert not missing, f"tutorials not in the index toctree: {missing}"


def test_home_page_links_the_guides_and_api(html: Path):
    page = (html / "index.html").read_text()
    for target in ("tutorials/quickstart.html", "usage.html", "model.html", "api/index.html"):
        assert f'href="{target}' in page, f"the home page does not link {target}"


def test_every_docs_page_is_rendered(html: Path):
    pages = sorted(path.stem for path in DOCS.glob("*.md"))
    missing = [name for name in pages if not (html / f"{name}.html").exists()]
    assert not missing, f"docs pages without HTML output: {missing}"


def test_api_page_of_spavae_model(html: Path):
    page = (html / "api" / "generated" / "spavae.SpaVAE.html").read_text()
    assert 'id="spavae.SpaVAE"' in page
    for method in ("train", "write_results", "get_latent_representation", "save", "load", "from_variant"):
        assert f'id="spavae.SpaVAE.{method}"' in page, f"SpaVAE.{method} is not documented"
    assert "Parameters" in page and "batch_key" in page  # the numpydoc sections are rendered


@pytest.mark.parametrize("name", TUTORIALS)
def test_tutorial_executed_with_a_figure(html: Path, name: str):
    if name == "spatial_domains" and not DLPFC.exists():
        pytest.skip(f"{DLPFC} is absent: the DLPFC tutorial is rendered without outputs")
    page = (html / "tutorials" / f"{name}.html").read_text()
    images = re.findall(r'<img[^>]+src="\.\./(_images/[^"]+\.png)"', page)
    assert images, f"tutorial {name} shows no figure"
    assert all((html / image).stat().st_size > 5000 for image in images), f"an image of {name} is empty"
    assert "Traceback" not in page, f"tutorial {name} shows a traceback"
