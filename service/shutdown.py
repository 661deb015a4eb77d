"""Graceful shutdown: SIGTERM drains the service and the process exits 0.

uvicorn does the draining: on SIGTERM it closes its listening sockets (no new connections),
lets every request whose headers it has read run to its response (then closes that
connection), runs the lifespan's shutdown (the reload poller stops, the exposure and event
logs write what is pending, the store closes) and returns. Then it re-raises the signal it caught, so that the process ends "by" SIGTERM: under
the default handler that is exit status 143 (-15), which orchestrators and process supervisors
count as a crash. :func:`exit_zero_on_sigterm` installs a handler that turns that re-raised
signal, and any SIGTERM before uvicorn's own handlers are in place (nothing serves yet, nothing
to finish), into a normal exit with status 0.
"""

from __future__ import annotations

import signal
from types import FrameType


def _exit_zero(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def exit_zero_on_sigterm() -> None:
    """Makes SIGTERM end the process with status 0 once uvicorn has drained (main thread only,
    before ``uvicorn.run``: uvicorn restores this handler before re-raising)."""
    signal.signal(signal.SIGTERM, _exit_zero)
