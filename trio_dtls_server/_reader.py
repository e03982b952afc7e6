"""Who reads the server's socket: a task waiting for input, or the receive loop.

trio lets one task at a time wait for a socket to become readable, and that
task reads every datagram and hands each to its session (``drain``). A
dedicated receive loop would cost every datagram two task switches: the loop
reads it and wakes the handler, the handler runs. So when every task that waits
for input has just been woken (one busy session is the usual case), the receive
loop steps aside and the first task back in :meth:`SocketReader.wait_for_input`
reads for everyone: its own datagram then reaches it in one task switch.

Two rules keep everyone served:

- a task that stops reading while other tasks are parked waiting for input,
  whose session has ended, or that is cancelled while reading, hands the socket
  back to the receive loop at once, and so does every session task that ends;
- otherwise the receive loop takes the socket back if no task has come to read
  within ``lease`` seconds: only datagrams nobody is waiting for (a new
  client's hello, input for a handler busy elsewhere) can wait that long.

News for a session whose task is the one reading (its end, say) interrupts the
wait with ``trio.lowlevel.notify_closing``, which wakes the waiter with
``ClosedResourceError`` and leaves the socket open.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import trio

from ._session import READING

if TYPE_CHECKING:
    from ._session import DTLSSession, _Reading


class SocketReader:
    """Decides, datagram by datagram, which task reads ``sock``.

    ``drain()`` reads what the socket holds and dispatches it.
    """

    def __init__(self, sock: socket.socket, drain: Callable[[], None], lease: float) -> None:
        self._sock = sock
        self._drain = drain
        self._lease = lease
        self._reading = False  # a task is waiting for the socket to be readable
        self._parked = 0  # tasks parked in wait_for_input
        self._woken = 0  # parked tasks woken since the last drain began
        self._loop_task: trio.lowlevel.Task | None = None
        self._loop_parked = False
        self._watch: trio.CancelScope | None = None  # the loop's standby, while parked

    async def receive_loop(self) -> None:
        """Read whenever no task waiting for input does; run it for the server's life."""
        self._loop_task = trio.lowlevel.current_task()
        while True:
            if self._reading:
                await self._stand_by(armed=False)  # until the reader needs relief
                continue
            self._reading = True
            try:
                await trio.lowlevel.wait_readable(self._sock)
            finally:
                self._reading = False
            self._woken = 0
            self._drain()
            if self._lease and self._woken and self._woken >= self._parked:
                # Every waiting task was just woken: the first back reads next.
                await self._stand_by(armed=True)

    async def wait_for_input(self, session: DTLSSession) -> None:
        """Return once ``session`` may have news, reading for everyone if nobody is."""
        if self._reading or session._waiter is not None or not self._lease:
            # Another task reads (or already waits for this session): the
            # reader hands this session its datagrams and wakes this task.
            if not self._reading:
                self._wake_loop()
            self._parked += 1
            try:
                await session._park()
            finally:
                self._parked -= 1
            return
        state = session._state
        while True:
            self._reading = True
            session._waiter = READING
            try:
                await trio.lowlevel.wait_readable(self._sock)
            except trio.ClosedResourceError:
                pass  # news for this session without a datagram (see wake)
            except BaseException:
                self._wake_loop()  # cancelled: someone else must read, now
                raise
            finally:
                self._reading = False
                session._waiter = None
            self._woken = 0
            self._drain()
            if session._inbox or session._state is not state:
                break
        # Back to the caller, leaving the socket unread.
        if self._parked > self._woken or not session.is_established:
            # Tasks are waiting, or this one is unlikely to be back: read now.
            self._wake_loop()
        else:
            watch = self._watch
            if watch is not None and watch.deadline == math.inf:
                watch.deadline = trio.current_time() + self._lease

    def task_done(self) -> None:
        """A session's task ends: if nobody is reading, the receive loop reads now."""
        if not self._reading:
            self._wake_loop()

    def wake(self, waiter: trio.lowlevel.Task | _Reading) -> None:
        """Wake the task waiting for a session's news (SessionOwner.wake)."""
        if waiter is READING:
            trio.lowlevel.notify_closing(self._sock)
        else:
            trio.lowlevel.reschedule(cast(trio.lowlevel.Task, waiter))
            self._woken += 1

    async def _stand_by(self, *, armed: bool) -> None:
        """Park the receive loop until woken, or for ``lease`` seconds if ``armed``."""
        with trio.CancelScope() as watch:
            if armed:
                watch.deadline = trio.current_time() + self._lease
            self._watch = watch
            self._loop_parked = True

            def abort(_: object) -> trio.lowlevel.Abort:
                self._loop_parked = False
                return trio.lowlevel.Abort.SUCCEEDED

            await trio.lowlevel.wait_task_rescheduled(abort)
        self._watch = None

    def _wake_loop(self) -> None:
        if self._loop_parked:
            self._loop_parked = False
            assert self._loop_task is not None
            trio.lowlevel.reschedule(self._loop_task)
