"""Notebook UI: the review panel, the diff view, live loss curves, HTML renderings.

    from autoresearch_kit.ui import Panel
    Panel(lab)                         # what lab.panel() returns

    from autoresearch_kit.ui import show
    show(proposal); show(result); show(lab)    # HTML for any kit object, cell by cell

    from autoresearch_kit.ui.render import proposal_html, run_result_html, lab_html
    from autoresearch_kit.ui.diff import diff_html

This is the only package that imports ipywidgets, and only `Panel`/`LiveCurve` need it:
they are imported on first use, so the `render` and `diff` helpers (used by the
library's `_repr_html_` methods) stay light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "Panel": "autoresearch_kit.ui.panel",
    "BatchPanel": "autoresearch_kit.ui.batch",
    "LiveCurve": "autoresearch_kit.ui.curves",
    "diff_html": "autoresearch_kit.ui.diff",
    "proposal_html": "autoresearch_kit.ui.render",
    "run_result_html": "autoresearch_kit.ui.render",
    "lab_html": "autoresearch_kit.ui.render",
    "show": "autoresearch_kit.ui.render",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    msg = f"module 'autoresearch_kit.ui' has no attribute {name!r}"
    raise AttributeError(msg)


def __dir__():
    return __all__
