"""Small helpers for the reactor's timers (``IDelayedCall``)."""

from __future__ import annotations

from twisted.internet.interfaces import IDelayedCall


def cancel(call: IDelayedCall | None) -> None:
    """Cancel ``call`` if it is still pending; None, or a call that has
    already run or been cancelled, is left alone.

    This is the guard ``if call is not None and call.active(): call.cancel()``
    written once (``IDelayedCall.cancel`` raises on a call that is done)."""
    if call is not None and call.active():
        call.cancel()
