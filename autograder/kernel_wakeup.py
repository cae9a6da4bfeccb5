"""Notebook runs that cannot stall on a missed wake-up.

nbclient (the executor of nbgrader, nbconvert and the book's myst-nb) waits for a cell's
``execute_reply`` with ONE ``await socket.poll(timeout)`` on a ``zmq.asyncio`` socket, the
timeout being the whole cell timeout (600 s in the book). ``zmq.asyncio`` learns that a message
arrived from the socket's ``ZMQ_FD``, which is edge-triggered: when anything reads the socket's
``EVENTS`` between the message's arrival and the event loop's next look at the FD, the edge is
gone and the poll sleeps on with the reply already in the socket. It wakes at its timeout, so a
cell of a fraction of a second takes ten minutes. Seen here in clean-clone CI rehearsals: the book
build stuck on one lecture, kernel and client both idle in ``epoll``, and the client's shell socket
reporting ``POLLIN`` (a reply waiting). ``autograder/tests/test_kernel_wakeup.py`` reproduces the
missed wake-up deterministically.

:func:`install` replaces ``AsyncZMQSocketChannel.get_msg`` with one that polls in slices of
``SLICE_S``: every new ``poll`` checks ``EVENTS`` when it registers, so a missed edge costs at most
one slice. The timeout means what it meant. Installed by the grader's worker (nbgrader) and by the
book build (this module is also a Sphinx extension: ``extra_extensions`` in
``jupyter_book/_config.yml``).
"""

from __future__ import annotations

import time
from queue import Empty

SLICE_S = 0.25  # seconds: a missed wake-up costs at most this


def install() -> bool:
    """Patch jupyter_client's async channel (idempotent); True if it was patched now."""
    from jupyter_client.channels import AsyncZMQSocketChannel

    if getattr(AsyncZMQSocketChannel.get_msg, "_sliced", False):
        return False

    async def get_msg(self, timeout: float | None = None):
        """Gets a message if there is one that is ready (polled in slices, see the module)."""
        assert self.socket is not None
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = SLICE_S if deadline is None else max(0.0, min(SLICE_S, deadline - time.monotonic()))
            if await self.socket.poll(int(left * 1000)):
                return await self._recv()
            if deadline is not None and time.monotonic() >= deadline:
                raise Empty

    get_msg._sliced = True
    AsyncZMQSocketChannel.get_msg = get_msg
    return True


def setup(app) -> dict:
    """Sphinx extension entry point: the book's notebook execution (myst-nb, nbclient) is patched."""
    install()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
