"""Sphinx configuration for qimg's API reference (built from the docstrings).

Build:  python -m sphinx -W -b html docs docs/_build   (tests/lib/test_docs.py does the same)
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

project = "qimg"
author = "the qimg authors"
copyright = "the qimg authors, MIT license"
release = "0.1.0"

extensions = ["sphinx.ext.autodoc", "sphinx.ext.napoleon"]
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_default_options = {"members": True, "show-inheritance": True}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
exclude_patterns = ["_build"]
