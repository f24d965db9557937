"""Sphinx configuration for the cancellable documentation.

The build runs offline and with warnings as errors (``make docs``); keep it
free of extensions that reach the network (no intersphinx).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Import the package from the source tree, so the docs build also works
# without an installed copy (the Makefile installs one anyway).
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import cancellable  # noqa: E402

project = "cancellable"
author = "The cancellable developers"
copyright = "the cancellable developers"
release = cancellable.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
]

source_suffix = {".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# Docstrings write `name` for a cross reference.  References that cannot be
# resolved offline (standard library objects, without intersphinx) render as
# plain code; `nitpicky` stays off so they do not turn into warnings.
default_role = "py:obj"
nitpicky = False

# -- MyST -------------------------------------------------------------------
myst_enable_extensions = ["colon_fence", "deflist"]
myst_heading_anchors = 3

# -- autodoc / napoleon ------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {
    "members": True,
    "show-inheritance": True,
}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
# "Attributes:" sections become attribute entries that references such as
# `Cancelled.reason` resolve to.  Do not also give those attributes a `#:`
# comment: autodoc would document them a second time (a duplicate warning).
napoleon_use_ivar = False

# -- HTML ---------------------------------------------------------------------
html_theme = "alabaster"
html_title = f"cancellable {release}"
html_theme_options = {
    "description": "Cooperative cancellation for Celery tasks",
    "fixed_sidebar": True,
}
html_static_path: list[str] = []


# -- Keep the API reference complete ------------------------------------------
# Every name in `cancellable.__all__` must appear in api.md as
# "cancellable.<name>"; otherwise the build warns (and fails under -W), so a
# new public name cannot ship undocumented.


def _check_api_reference(app: object) -> None:
    from sphinx.util import logging as sphinx_logging

    text = (Path(__file__).parent / "api.md").read_text(encoding="utf-8")
    missing = [name for name in cancellable.__all__ if f"cancellable.{name}" not in text]
    if missing:
        sphinx_logging.getLogger(__name__).warning(
            "api.md does not document these public names of cancellable: %s",
            ", ".join(missing),
        )


def setup(app: object) -> None:
    app.connect("builder-inited", _check_api_reference)  # type: ignore[attr-defined]
