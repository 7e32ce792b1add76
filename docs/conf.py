"""Sphinx configuration of the spavae documentation (``make -C docs html``).

The tutorials in ``tutorials/`` are MyST-NB text notebooks executed during the build. Their training budget comes
from the environment: ``SPAVAE_DOCS_EPOCHS`` caps the epochs of every tutorial (the Makefile's ``html`` target sets
a few epochs; ``html-full`` leaves it unset, so each tutorial runs its full budget).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
REPO = DOCS.parent

# Document (and run the tutorials with) the spavae of this checkout, not an installed copy.
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from sphinx.util import logging  # noqa: E402

import spavae  # noqa: E402

project = "spavae"
author = "spavae developers"
copyright = "spavae developers"
release = version = spavae.__version__

extensions = [
    "myst_nb",
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
]
templates_path = ["_templates"]
exclude_patterns = ["_build", "jupyter_execute", "**.ipynb_checkpoints"]
source_suffix = {".rst": "restructuredtext", ".md": "myst-nb", ".ipynb": "myst-nb"}

# API reference: numpydoc-style docstrings through napoleon, one page per object (api/generated/, git-ignored).
autosummary_generate = True
autodoc_typehints = "description"
autodoc_typehints_description_target = "documented_params"
autodoc_member_order = "bysource"
autoclass_content = "class"
napoleon_google_docstring = False
napoleon_numpy_docstring = True
napoleon_use_rtype = False
# The package writes ``Returns`` as free text (no type line, which is in the annotation): render it as a paragraph
# under a "Returns" heading instead of napoleon's one-entry-per-line list.
napoleon_custom_sections = ["Returns"]

# MyST and notebook execution.
myst_enable_extensions = ["colon_fence", "dollarmath"]
myst_heading_anchors = 3
nb_execution_mode = os.environ.get("SPAVAE_DOCS_EXECUTE", "force")
nb_execution_timeout = int(os.environ.get("SPAVAE_DOCS_TIMEOUT", "600"))
nb_execution_in_temp = True  # tutorials write their figures and files to a scratch folder
# A failing cell is a warning that carries the cell's traceback; -W (the Makefile, tests/test_docs.py) turns it into
# a failed build after --keep-going has run the other tutorials. (raise_on_error would stop at the first failure
# and leave the traceback only in Sphinx's crash file.)
nb_execution_raise_on_error = False
# The DLPFC tutorial needs shared/data/dlpfc beside the checkout (or SPAVAE_DLPFC_DIR); without it the page is
# rendered without outputs instead of failing the build.
DLPFC = Path(os.environ.get("SPAVAE_DLPFC_DIR", REPO.parent / "shared" / "data" / "dlpfc"))
nb_execution_excludepatterns = [] if (DLPFC / "sample_151507.h5").exists() else ["tutorials/spatial_domains.md"]
if nb_execution_excludepatterns:
    logging.getLogger(__name__).info(f"{DLPFC / 'sample_151507.h5'} not found: tutorials/spatial_domains is not executed")
nb_execution_show_tb = True
nb_merge_streams = True

html_theme = "furo"
html_title = f"spavae {release}"
html_static_path = ["_static"]
html_css_files = ["custom.css"]
html_theme_options = {"light_css_variables": {"color-brand-primary": "#1f5fa8", "color-brand-content": "#1f5fa8"}}


def spread_tutorials(app, env, docnames: list[str]) -> None:
    """Spread the executed tutorials evenly through the reading order.

    With ``-j N`` Sphinx reads the sorted page names in consecutive chunks, one process per chunk, which puts all
    tutorials (``tutorials/*``, next to each other in that order) in one process, so their notebooks would run one
    after another. Spread out, they run side by side (``tests/test_docs.py`` builds with ``-j 2``).
    """
    tutorials = [name for name in docnames if name.startswith("tutorials/")]
    pages = [name for name in docnames if not name.startswith("tutorials/")]
    if not tutorials:
        return
    step = len(docnames) / len(tutorials)
    slots = {round(index * step): name for index, name in enumerate(tutorials)}
    pages_left = iter(pages)
    docnames[:] = [slots[position] if position in slots else next(pages_left) for position in range(len(docnames))]


def setup(app) -> None:
    app.connect("env-before-read-docs", spread_tutorials)
