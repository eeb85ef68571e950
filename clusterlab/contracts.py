"""What a callback needs from a method, checked when the run is set up.

A callback that reads members of the module declares them as a `typing.Protocol` next to itself
and calls `require(module, Protocol, callback)` in its `setup`: a method that lacks a member fails
at once, with the member named, not at the end of its first epoch. A method states the protocols
it implements by listing them among its bases.
"""

from __future__ import annotations

from typing import Any


def members(protocol: type) -> list[str]:
    """The attributes and methods a Protocol declares (its own and its bases')."""
    names: set[str] = set()
    for cls in protocol.__mro__:
        if cls is object or not getattr(cls, "_is_protocol", False):
            continue
        names.update(getattr(cls, "__annotations__", {}))
        names.update(
            n
            for n, v in vars(cls).items()
            if not n.startswith("_") and (callable(v) or isinstance(v, property))
        )
    return sorted(names)


def require(module: Any, protocol: type, user: Any) -> None:
    """Raise a TypeError naming every member of `protocol` that `module` lacks (a method that a
    class inherits from the protocol itself, unimplemented, counts as lacking)."""
    stubs = {name: value for cls in protocol.__mro__ for name, value in vars(cls).items()}
    missing = [
        name
        for name in members(protocol)
        if not hasattr(module, name) or getattr(type(module), name, None) is stubs.get(name, object())
    ]
    if missing:
        who = user if isinstance(user, str) else type(user).__name__
        raise TypeError(
            f"{who} needs {type(module).__name__} to implement {protocol.__module__}.{protocol.__name__}: "
            f"missing {', '.join(missing)}"
        )
