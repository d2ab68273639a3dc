"""Old names that keep working for one release, with a `DeprecationWarning` that gives the new one."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from dpa_lens.errors import InputError

F = TypeVar("F", bound=Callable[..., Any])


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Accept the old keyword names of a function's arguments: ``@renamed(clean_tokens="prompt")``."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise InputError(f"{fn.__name__}: pass {new}= only ({old}= is its old name)")
                    warnings.warn(f"{fn.__name__}({old}=...) is now {fn.__name__}({new}=...); the old name goes in the next release",
                                  DeprecationWarning, stacklevel=2)
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
