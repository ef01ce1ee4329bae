"""Live curves in a notebook: ``resnetlab.train(...)`` in Jupyter redraws its curves in place as they grow.

The chapter's readers work in Jupyter, where ``d2l.train_ch6``'s ``Animator`` redraws its plot after
every few batches. In an IPython kernel, :func:`live_curves` returns a :class:`LiveCurves` that shows
the same figure as ``curves.png`` and updates it in place (one display, replaced, not a new image per
row); anywhere else (a terminal, a script, a test) it returns None and nothing changes. IPython comes
with every kernel; ``pip install 'resnetlab[notebook]'`` brings Jupyter's kernel and client.
"""

from __future__ import annotations

import sys
from typing import Any

from resnetlab.train.rundir import curves_png

__all__ = ["LiveCurves", "in_notebook", "live_curves"]


def in_notebook() -> bool:
    """Whether this process is an IPython kernel (Jupyter, VS Code, Colab), whose displays show images."""
    if "IPython" not in sys.modules:  # never imported: not a kernel, and importing it here would cost time
        return False
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


class LiveCurves:
    """One image in the notebook's output, replaced by the curves as they stand at each update.

    Args:
        title: the figure's title (the run's).
    """

    def __init__(self, title: str) -> None:
        self.title = title
        self._handle: Any = None

    def update(self, curve: list[dict[str, Any]], history: list[dict[str, Any]]) -> None:
        """Draw the curves from the rows so far: the first call shows them, later ones replace that image."""
        from IPython.display import Image, display

        image = Image(data=curves_png(curve, history, self.title), format="png")
        if self._handle is None:
            self._handle = display(image, display_id=True)
        else:
            self._handle.update(image)


def live_curves(title: str, is_main: bool) -> LiveCurves | None:
    """A :class:`LiveCurves` on rank 0 of a run in a notebook, else None."""
    return LiveCurves(title) if is_main and in_notebook() else None
