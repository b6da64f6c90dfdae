"""Which QUIC library drives the adapter: ``quic.backend`` in both configs.

Two sans-IO libraries are supported behind one surface (see `_aioquic`
and `_qh3`, which are the only modules importing either):

``aioquic``  the library the product was specified on; pure Python apart
             from its crypto, and the fallback;
``qh3``      its maintained fork, whose packet path (framing, recovery,
             packet protection) is native code: about five times less CPU
             per byte (README, Performance).

``auto`` (the default) takes qh3 when it is installed, else aioquic.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any, NamedTuple

#: ``quic.backend`` values.
CHOICES = ("auto", "qh3", "aioquic")
#: What ``auto`` tries, in order.
PREFERENCE = ("qh3", "aioquic")
#: The pip requirement that provides each.
REQUIREMENT = {"qh3": "qh3>=2.1,<2.2", "aioquic": "aioquic>=1.0"}

_loaded: dict[str, ModuleType] = {}


class Header(NamedTuple):
    """What the listener routes a datagram by (its first packet's header);
    each backend's ``header(data, cid_length)`` reads it."""

    version: int | None
    initial: bool
    version_negotiation: bool
    destination_cid: bytes
    source_cid: bytes


class BackendUnavailable(Exception):
    """The QUIC library asked for is not installed; the message says what
    to install."""


def _module(name: str) -> ModuleType | None:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(f"mtop.quic._{name}")
        except ImportError:
            return None
    return _loaded[name]


def load(choice: str = "auto") -> ModuleType:
    """The adapter module of the library ``choice`` names (``auto``: the
    first of `PREFERENCE` installed); `BackendUnavailable` when missing."""
    names = PREFERENCE if choice == "auto" else (choice,)
    for name in names:
        module = _module(name)
        if module is not None:
            return module
    if choice == "auto":
        raise BackendUnavailable("QUIC needs qh3 or aioquic: pip install 'mtop[quic]'")
    raise BackendUnavailable(f"quic.backend: {choice} is not installed: pip install '{REQUIREMENT[choice]}'")


def installed() -> tuple[str, ...]:
    """The backends that can be loaded here, preferred first."""
    return tuple(name for name in PREFERENCE if _module(name) is not None)


def of(configuration: Any) -> ModuleType:
    """The adapter module whose library made ``configuration``."""
    for name in PREFERENCE:
        module = _module(name)
        if module is not None and isinstance(configuration, module.QuicConfiguration):
            return module
    raise TypeError(f"not a QUIC configuration: {type(configuration).__name__}")


def describe(module: ModuleType) -> str:
    """``qh3 2.1.0``: for the start-up log."""
    return f"{module.NAME} {module.VERSION}"
