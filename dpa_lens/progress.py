"""Progress bars: a widget in a notebook that can draw one, text everywhere else.

``tqdm.auto`` picks the notebook widget whenever it runs in a Jupyter kernel and warns
(``TqdmWarning: IProgress not found``) where ``ipywidgets`` is missing; here the widget is used only
when ``ipywidgets`` can be imported, so a notebook without it shows a text bar and no warning.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

from tqdm.std import tqdm as text_bar


def _widgets() -> bool:
    """Whether this is a Jupyter kernel that can draw tqdm's notebook widget."""
    shell = getattr(sys.modules.get("IPython"), "get_ipython", lambda: None)()
    kernel = any(c.__name__ == "ZMQInteractiveShell" for c in type(shell).__mro__)  # Jupyter, Colab's shell (a subclass)
    return kernel and importlib.util.find_spec("ipywidgets") is not None


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """``tqdm(iterable, **kwargs)``: the notebook widget where it can be drawn, else a text bar."""
    if _widgets():
        from tqdm.notebook import tqdm as widget_bar

        return widget_bar(iterable, **kwargs)
    return text_bar(iterable, **kwargs)
