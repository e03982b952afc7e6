"""UDP sockets for trio: binding, and sends and receives without per-datagram overhead.

The socket is a plain non-blocking stdlib socket, waited on with
``trio.lowlevel.wait_readable``/``wait_writable`` (public trio API). A send
tries the socket at once and only waits (under a lock, since trio lets one task
wait for writability at a time) when the kernel's buffer is full; addresses are
already numeric, so nothing is resolved per datagram.
"""

from __future__ import annotations

import socket
from typing import Any

import trio

#: Receive buffer size: a UDP datagram is at most 65,535 bytes.
MAX_DATAGRAM = 65535
#: Datagrams read per wake-up before other tasks get a turn.
RECEIVE_BATCH = 64
#: Sends that complete at once between two yields to the scheduler.
SENDS_PER_YIELD = 16


async def bind_udp(
    host: str, port: int, *, reuse_port: bool = False, receive_buffer: int | None = None
) -> socket.socket:
    """A non-blocking UDP socket bound to ``host``:``port`` (``::`` is dual-stack).

    Raises ``OSError`` (for example ``EADDRINUSE``) if it cannot be bound.
    """
    infos = await trio.socket.getaddrinfo(
        host, port, type=socket.SOCK_DGRAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
    )
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        if family == socket.AF_INET6:
            # "::" serves IPv4 too (as ::ffff:a.b.c.d), whatever the system default.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if receive_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        sock.bind(sockaddr)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class UDPSender:
    """Sends datagrams on one socket, to a given address or (connected) its peer."""

    __slots__ = ("_lock", "_sock", "_unyielded", "send_failures")

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._lock = trio.Lock()
        self._unyielded = 0
        #: Datagrams the kernel would not take (buffer full, unreachable, ...).
        self.send_failures = 0

    def send_nowait(self, datagram: bytes, address: Any = None) -> bool:
        """Send if the kernel takes it now; a lost datagram is UDP's normal risk.

        For protocol traffic (handshake flights, alerts) that has its own
        retransmission or none to begin with.
        """
        try:
            if address is None:
                self._sock.send(datagram)
            else:
                self._sock.sendto(datagram, address)
        except OSError:
            # Whatever the errno, it concerns this datagram (or a socket being
            # closed): raising here would end whichever task happened to flush.
            self.send_failures += 1
            return False
        return True

    async def send(self, datagram: bytes, address: Any = None) -> None:
        """Send, waiting for buffer space if the kernel has none right now.

        A send the kernel takes at once skips the yield to the scheduler, except
        every ``SENDS_PER_YIELD``-th time: a task switch costs more than the
        send itself, but a task that only sends must not starve the others.
        Cancellation is honoured either way.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if not self._lock.locked():
            try:
                if address is None:
                    self._sock.send(datagram)
                else:
                    self._sock.sendto(datagram, address)
            except BlockingIOError:
                pass
            else:
                self._unyielded += 1
                if self._unyielded >= SENDS_PER_YIELD:
                    self._unyielded = 0
                    await trio.lowlevel.cancel_shielded_checkpoint()
                return
        async with self._lock:
            while True:
                try:
                    await trio.lowlevel.wait_writable(self._sock)
                except trio.ClosedResourceError:
                    if self._sock.fileno() == -1:
                        raise
                    # Still open: the server interrupted the task reading it
                    # (notify_closing wakes every waiter); try the send again.
                try:
                    if address is None:
                        self._sock.send(datagram)
                    else:
                        self._sock.sendto(datagram, address)
                except BlockingIOError:
                    continue
                return
