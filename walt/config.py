"""What a part was built with: constructor arguments recorded on the object, so a trained model can be rebuilt
from a JSON description (``walt.pipeline``) without the YAML it was trained from.

Decorate ``__init__`` with :func:`records_init_args`; the object then carries ``init_args``, the arguments of the
most-derived class's constructor with defaults filled in. Only JSON-ready values (numbers, strings, booleans,
None, lists, tuples and dicts of them) belong in a description; :func:`json_ready` says which are not.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["json_ready", "records_init_args"]

Init = TypeVar("Init", bound=Callable[..., None])


def records_init_args(init: Init) -> Init:
    """Wraps ``__init__`` so the instance keeps ``init_args`` (name -> value, defaults included).

    A subclass whose ``__init__`` is decorated too overwrites its parent's record: the outermost constructor
    finishes last, so ``init_args`` always describes the class the object is.
    """
    signature = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self, *args: Any, **kwargs: Any) -> None:
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(self, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(signature.parameters)))  # self
        for name, param in signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name))
        object.__setattr__(self, "init_args", arguments)  # bypasses nn.Module's attribute routing

    return wrapper  # type: ignore[return-value]


def json_ready(value: Any, where: str = "value") -> Any:
    """``value`` with tuples as lists, checked to hold only JSON types; raises TypeError naming the offender."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [json_ready(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        return {str(k): json_ready(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where} is a {type(value).__name__}, which a JSON model description cannot hold")
