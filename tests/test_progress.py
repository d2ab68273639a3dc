"""Progress bars: the notebook widget only where it can be drawn (no TqdmWarning in a notebook without ipywidgets)."""

from __future__ import annotations

import importlib.util
import sys
import types
import warnings

from tqdm.std import tqdm as text_bar

from dpa_lens import progress


def _kernel(monkeypatch, widgets: bool):
    shell_class = type("ZMQInteractiveShell", (), {})
    colab_shell = type("Shell", (shell_class,), {})()  # Colab's shell subclasses Jupyter's
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: colab_shell))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (real("json") if widgets else None) if name == "ipywidgets" else real(name, *a))


def test_a_kernel_without_ipywidgets_gets_a_text_bar_and_no_warning(monkeypatch):
    _kernel(monkeypatch, widgets=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bar = progress.progress_bar(range(3), disable=True)
    assert type(bar) is text_bar and list(bar) == [0, 1, 2]


def test_a_kernel_with_ipywidgets_gets_the_widget(monkeypatch):
    _kernel(monkeypatch, widgets=True)
    assert progress._widgets()


def test_outside_a_kernel_a_text_bar(monkeypatch):
    monkeypatch.setitem(sys.modules, "IPython", types.SimpleNamespace(get_ipython=lambda: None))
    assert not progress._widgets() and type(progress.progress_bar(range(2), disable=True)) is text_bar
