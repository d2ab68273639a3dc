"""Every error dpa_lens raises on purpose, under one base class.

Catch `DpaLensError` to catch them all. Each keeps the built-in class it specialises (a
`CacheError` is still a ``ValueError``), so code written against the built-in classes keeps working.

* `InputError`: an argument that cannot be used (a position out of range, an unknown option);
  its subclasses name the argument's kind: `CacheError`, `TargetError`, `PairError`;
* `UnsupportedModelError`: a model whose blocks dpa_lens has no rules for;
* `ModelNotAvailableError`: a model that cannot be loaded here (the message says what to install);
* `TrainModeError`: a model in train mode, where dropout makes gradients and patching random.
"""

from __future__ import annotations


class DpaLensError(Exception):
    """Base class of the errors dpa_lens raises on purpose."""


class InputError(DpaLensError, ValueError):
    """An argument that cannot be used as given; the message says which and what to pass."""


class CacheError(InputError):
    """The cache cannot be used: hooks are missing, or it belongs to another model or input."""


class TargetError(InputError):
    """A target that cannot be turned into a well-defined quantity to explain."""


class PairError(InputError):
    """Clean and corrupted inputs that cannot be patched into each other."""


class UnsupportedModelError(DpaLensError, NotImplementedError):
    """The model's architecture is not one whose rules dpa_lens implements."""


class ModelNotAvailableError(DpaLensError, OSError):
    """The requested model cannot be loaded here; the message says what to install or pass."""


class TrainModeError(DpaLensError, RuntimeError):
    """The model is in train mode: dropout makes gradients and patching meaningless."""


__all__ = [
    "CacheError",
    "DpaLensError",
    "InputError",
    "ModelNotAvailableError",
    "PairError",
    "TargetError",
    "TrainModeError",
    "UnsupportedModelError",
]
