"""Expose an ESPnet base class's constructor options on a subclass that forwards ``**kwargs``.

ESPnet's ``--print_config`` and its config handling read option names and defaults from
``inspect.signature``; a ``**kwargs`` signature would hide every inherited option. Merging the
signatures (instead of re-typing ESPnet's long argument lists) keeps our classes in step with
whatever ESPnet version is installed, and lets us reject unknown options by name at build time.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping


def merge_signature(base_init: Callable, skip: tuple = ("self",)) -> Callable[[type], type]:
    """Class decorator: ``cls.__init__``'s own parameters, then ``base_init``'s (keyword-only)."""

    def decorate(cls: type) -> type:
        own = [p for p in inspect.signature(cls.__init__).parameters.values()
               if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        names = {p.name for p in own}
        required = [p for p in own if p.default is inspect.Parameter.empty]
        optional = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own
                    if p.default is not inspect.Parameter.empty]
        inherited = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
                     for p in inspect.signature(base_init).parameters.values()
                     if p.name not in names and p.name not in skip
                     and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)]
        if "__init__" not in cls.__dict__:
            raise TypeError(f"{cls.__name__} must define its own __init__ to merge signatures")
        cls.__init__.__signature__ = inspect.Signature(required + optional + inherited)
        return cls

    return decorate


def reject_unknown_options(cls: type, options: Mapping[str, Any], what: str) -> None:
    """Fail at build time naming the class, the unknown option(s) and the allowed ones."""
    allowed = {n for n, p in inspect.signature(cls).parameters.items()
               if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"{cls.__name__}: unknown {what} option(s) {unknown}; allowed: {sorted(allowed)}")
