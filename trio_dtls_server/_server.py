"""``serve_dtls`` and ``DTLSServer``: one UDP socket, many supervised sessions.

Whichever task reads the socket (see :mod:`._reader`) hands each datagram to
its session synchronously (see :mod:`._session`). A datagram from an unknown
peer is only ever answered statelessly, with a HelloVerifyRequest, until the
peer returns a valid cookie (RFC 6347 4.2.1); only then does the server spend
memory on it, and only within ``max_sessions`` and ``max_sessions_per_ip``.
Each session then gets one task: the handshake under ``handshake_timeout``, the
handler with its errors contained, then close_notify.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import math
import socket
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from OpenSSL import SSL

from . import _internals
from ._config import DTLSServerConfig, TLSContext
from ._errors import HandshakeError, SessionClosed
from ._reader import SocketReader
from ._records import (
    RECORD_HEADER_SIZE,
    BadRecord,
    CookieJar,
    hello_verify_request,
    looks_like_client_hello,
    parse_client_hello,
)
from ._session import CloseReason, DTLSSession, ssl_error_text
from ._udp import MAX_DATAGRAM, RECEIVE_BATCH, UDPSender, bind_udp

logger = logging.getLogger("trio_dtls_server")

Handler = Callable[[DTLSSession], Awaitable[object]]


@dataclasses.dataclass(frozen=True)
class ServerStats:
    """A snapshot of a server's counters (``DTLSServer.stats()``).

    Every handshake that starts ends exactly one way: ``handshakes_completed``,
    ``handshakes_failed`` (an alert, a refused credential), ``handshake_timeouts``
    or ``handshakes_aborted`` (replaced, or the server shut down).
    """

    sessions_active: int
    """Established sessions now (not counting ended ones whose handler is finishing)."""
    handshakes_active: int
    """Handshakes in progress now."""
    handshakes_started: int
    handshakes_completed: int
    handshakes_failed: int
    handshake_timeouts: int
    handshakes_aborted: int
    sessions_closed: int
    """Established sessions that have ended, for any reason."""
    sessions_evicted: int
    sessions_replaced: int
    sessions_idle_timeout: int
    sessions_refused: int
    """Newcomers with a valid cookie turned away at ``max_sessions``/``max_sessions_per_ip``."""
    handler_errors: int
    datagrams_in: int
    """Application datagrams received (decrypted) ..."""
    datagrams_out: int
    """... and sent."""
    bytes_in: int
    bytes_out: int
    datagrams_dropped: int
    """Application datagrams dropped because a handler fell behind."""
    datagrams_invalid: int
    """Malformed datagrams: ClientHellos that do not parse or that OpenSSL refused, and
    datagrams too short to be a record."""
    datagrams_unmatched: int
    """Datagrams for no session: late records of ended sessions (a peer's close_notify
    answering ours, say), and strays."""
    cookies_sent: int
    """HelloVerifyRequests sent (the stateless first round of every handshake)."""
    send_failures: int
    """Datagrams the kernel would not send (buffer full, unreachable, ...)."""

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


_COUNTERS = tuple(
    f.name
    for f in dataclasses.fields(ServerStats)
    if f.name not in ("sessions_active", "handshakes_active", "send_failures")
)
#: How a handshake that never completed is counted, by the reason its session ended.
_HANDSHAKE_OUTCOMES: dict[CloseReason | None, str] = {
    CloseReason.HANDSHAKE_FAILED: "handshakes_failed",
    CloseReason.HANDSHAKE_TIMEOUT: "handshake_timeouts",
}
_PER_SESSION = ("datagrams_in", "datagrams_out", "bytes_in", "bytes_out", "datagrams_dropped")


class _RateLimitedLog:
    """At most one warning per ``interval`` seconds, with a count of the rest."""

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._next = -math.inf
        self._suppressed = 0

    def warning(self, message: str, *args: object) -> None:
        now = trio.current_time()
        if now < self._next:
            self._suppressed += 1
            return
        if self._suppressed:
            message += f" ({self._suppressed} more since the last such warning)"
        self._suppressed = 0
        self._next = now + self._interval
        logger.warning(message, *args)


class DTLSServer:
    """A running DTLS server; ``serve_dtls`` hands it to ``task_status.started()``.

    Attributes:
      address: the bound ``(host, port)``, numeric, with the actual port.
      config: the :class:`DTLSServerConfig` it runs with.
    """

    def __init__(
        self,
        sock: socket.socket,
        config: DTLSServerConfig,
        tls: TLSContext,
        handler: Handler,
    ) -> None:
        self.config = config
        self._tls = tls
        self._sock = sock
        sockname = sock.getsockname()
        self.address: tuple[str, int] = (sockname[0], sockname[1])
        self._family = sock.family
        self._mtu = config.mtu or (1472 if sock.family == socket.AF_INET else 1452)
        self._handler = handler
        self._sender = UDPSender(sock)
        self._cookies = CookieJar()
        # Sessions by peer address: handshaking and established, not yet ended.
        self._by_address: dict[Any, DTLSSession] = {}
        # Established sessions, least recently active first (idle timeout, eviction).
        self._lru: OrderedDict[Any, DTLSSession] = OrderedDict()
        self._by_ip: dict[str, set[DTLSSession]] = {}
        # Sessions whose task is running; their counters are not yet in _counters.
        self._running: set[DTLSSession] = set()
        self._tasks_done = trio.Event()
        self._tasks_done.set()
        self._next_id = 1
        self._closing = False
        self._shutdown_requested = trio.Event()
        self._stopped = trio.Event()
        self._nursery: trio.Nursery | None = None
        self._counters = dict.fromkeys(_COUNTERS, 0)
        self._refusals = _RateLimitedLog()
        lease = 0.0 if _internals.plain_path_requested() else config.read_lease
        self._reader = SocketReader(sock, self._drain, lease)
        # The rest of SessionOwner: bound straight to what implements it, which
        # saves a call (and a coroutine) per datagram.
        self.send_nowait = self._sender.send_nowait
        self.send = self._sender.send
        self.wait_for_input = self._reader.wait_for_input
        self.wake = self._reader.wake

    def __repr__(self) -> str:
        return f"<DTLSServer {self.address[0]}:{self.address[1]}>"

    # -- public -------------------------------------------------------------

    @property
    def port(self) -> int:
        return self.address[1]

    @property
    def sessions(self) -> list[DTLSSession]:
        """The established sessions, least recently active first."""
        return list(self._lru.values())

    def stats(self) -> ServerStats:
        """Counters since the server started (see :class:`ServerStats`)."""
        counters = dict(self._counters)
        for session in self._running:
            for name in _PER_SESSION:
                counters[name] += getattr(session, name)
        ended = sum(
            counters[name]
            for name in (
                "handshakes_completed",
                "handshakes_failed",
                "handshake_timeouts",
                "handshakes_aborted",
            )
        )
        return ServerStats(
            sessions_active=len(self._lru),
            handshakes_active=counters["handshakes_started"] - ended,
            send_failures=self._sender.send_failures,
            **counters,
        )

    async def aclose(self) -> None:
        """Shut down gracefully and wait until it is done.

        Stops admitting new sessions, drops handshakes in progress, ends every
        session's iteration and gives handlers ``shutdown_grace`` seconds to
        return, sends close_notify to every session, and closes the socket.
        """
        self._shutdown_requested.set()
        await self._stopped.wait()

    # -- running ------------------------------------------------------------

    async def _serve(self, handler_nursery: trio.Nursery | None, task_status: Any) -> None:
        try:
            async with trio.open_nursery() as watcher:
                watcher.start_soon(self._shutdown_when_cancelled)
                # Shielded, so that cancelling serve_dtls still gives handlers
                # their grace: the watcher above turns that cancellation into a
                # graceful shutdown, which bounds how long this takes.
                with trio.CancelScope(shield=True):
                    async with trio.open_nursery() as nursery:
                        self._nursery = handler_nursery or nursery
                        nursery.start_soon(self._reader.receive_loop)
                        nursery.start_soon(self._expire_idle_sessions)
                        task_status.started(self)
                        await self._shutdown_requested.wait()
                        await self._shut_down()
                        nursery.cancel_scope.cancel()
                watcher.cancel_scope.cancel()
        finally:
            # A task still waiting on the socket (a handler that outlived its
            # grace in a nursery of its own) must not wait on a closed one.
            trio.lowlevel.notify_closing(self._sock)
            self._sock.close()
            self._stopped.set()

    async def _shutdown_when_cancelled(self) -> None:
        try:
            await trio.sleep_forever()
        finally:
            self._shutdown_requested.set()

    async def _shut_down(self) -> None:
        self._closing = True
        grace = self.config.shutdown_grace
        live = list(self._by_address.values())
        for session in live:
            session._end_by_owner(CloseReason.SHUTDOWN, grace=grace)
        if live:
            logger.info("shutting down: %d session(s), %.1f s grace", len(live), grace)
        # Each session's own scope enforces the grace; this bounds the wait in
        # case a handler shields itself from cancellation.
        with trio.move_on_after(grace + 1.0):
            await self._tasks_done.wait()
        if self._running:
            logger.warning("%d session task(s) still running after the grace", len(self._running))

    def _drain(self) -> None:
        """Read and dispatch up to ``RECEIVE_BATCH`` datagrams, or until the socket is empty."""
        if self._sock.fileno() == -1:
            return  # the server has stopped
        recvfrom = self._sock.recvfrom
        dispatch = self._dispatch
        for _ in range(RECEIVE_BATCH):
            try:
                datagram, address = recvfrom(MAX_DATAGRAM)
            except BlockingIOError:
                return
            except OSError as exc:
                # ICMP errors for earlier sends can surface here; they
                # concern one peer, not the socket.
                if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                    continue
                raise
            try:
                dispatch(datagram, address)
            except Exception:
                # A bug must not take the server down with it; end only the
                # session the datagram was for.
                logger.exception("internal error handling a datagram from %s", address)
                session = self._by_address.get(address)
                if session is not None:
                    session._end(CloseReason.PROTOCOL_ERROR)
                    session.scope.cancel()

    def _dispatch(self, datagram: bytes, address: Any) -> None:
        session = self._by_address.get(address)
        if not looks_like_client_hello(datagram):
            if session is None:
                self._counters["datagrams_unmatched"] += 1
            elif len(datagram) >= RECORD_HEADER_SIZE:
                session._on_datagram(datagram)
            else:
                self._counters["datagrams_invalid"] += 1
            return
        self._on_client_hello(datagram, address, session)

    def _on_client_hello(
        self, datagram: bytes, address: Any, existing: DTLSSession | None
    ) -> None:
        if self._closing:
            return
        try:
            hello = parse_client_hello(datagram)
        except BadRecord:
            self._counters["datagrams_invalid"] += 1
            return
        if not self._cookies.check(address, hello):
            # Stateless: the peer must prove it receives at its address before we
            # keep anything for it. The answer is smaller than the question, so
            # a spoofed source gains no amplification.
            cookie = self._cookies.make(address, hello)
            self._sender.send_nowait(hello_verify_request(hello, cookie), address)
            self._counters["cookies_sent"] += 1
            return
        if existing is not None:
            if existing.client_random == hello.random:
                return  # a copy of the ClientHello that started it; OpenSSL's timer resends
            if existing.is_established:
                self._counters["sessions_replaced"] += 1
            existing._end_by_owner(
                CloseReason.REPLACED, grace=self.config.shutdown_grace, notify=False
            )
        ip = str(address[0])
        if not self._admit(ip):
            self._counters["sessions_refused"] += 1
            self._refusals.warning(
                "refused a new session from %s: at max_sessions=%d / max_sessions_per_ip=%s",
                ip,
                self.config.max_sessions,
                self.config.max_sessions_per_ip,
            )
            return
        self._start_session(datagram, address, ip, hello.random)

    def _admit(self, ip: str) -> bool:
        """Room for one more session from ``ip``, evicting an idle one if need be."""
        config = self.config
        per_ip = config.max_sessions_per_ip
        if per_ip is not None:
            mine = self._by_ip.get(ip, ())
            if len(mine) >= per_ip and not self._evict_idle(s for s in mine if s.is_established):
                return False
        if len(self._by_address) >= config.max_sessions:
            # _lru is ordered by last activity: its head is the only candidate.
            return self._evict_idle(itertools.islice(self._lru.values(), 1))
        return True

    def _evict_idle(self, candidates: Any) -> bool:
        """Evict the least recently active candidate idle for ``evict_idle_after``."""
        oldest: DTLSSession | None = min(candidates, key=lambda s: s._last_activity, default=None)
        now = trio.current_time()
        if oldest is None or now - oldest._last_activity < self.config.evict_idle_after:
            return False
        self._counters["sessions_evicted"] += 1
        oldest._end_by_owner(CloseReason.EVICTED, grace=self.config.shutdown_grace)
        return True

    def _start_session(self, datagram: bytes, address: Any, ip: str, random: bytes) -> None:
        conn = SSL.Connection(self._tls.context, None)
        session = DTLSSession(
            conn,
            address,
            self,
            session_id=self._next_id,
            mtu=self._mtu,
            max_queued=self.config.max_queued_datagrams,
            grace=self.config.shutdown_grace,
        )
        self._next_id += 1
        session.client_random = random
        try:
            conn.bio_write(datagram)
            conn.DTLSv1_listen()
        except SSL.Error as exc:
            # The cookie was ours, but OpenSSL does not like the hello.
            self._counters["datagrams_invalid"] += 1
            logger.debug("ClientHello from %s refused: %s", session.peer, ssl_error_text(exc))
            return
        self._by_address[address] = session
        self._by_ip.setdefault(ip, set()).add(session)
        self._running.add(session)
        self._tasks_done = trio.Event()
        self._counters["handshakes_started"] += 1
        assert self._nursery is not None
        self._nursery.start_soon(self._run_session, session)
        # Answer now rather than when the task first runs.
        session._drive_handshake()

    # -- SessionOwner (with send, send_nowait, wait_for_input, wake: see __init__) --

    def session_established(self, session: DTLSSession) -> None:
        self._lru[session.peer_address] = session
        self._count_handshake_end(session, "handshakes_completed")

    def session_active(self, session: DTLSSession) -> None:
        self._lru.move_to_end(session.peer_address)

    def session_ended(self, session: DTLSSession) -> None:
        """Take a session that stopped receiving out of every table."""
        if session.established_at is None:
            # Counted now rather than when its task runs, so that the counters
            # agree with the table at every moment.
            outcome = _HANDSHAKE_OUTCOMES.get(session.close_reason, "handshakes_aborted")
            self._count_handshake_end(session, outcome)
        address = session.peer_address
        if self._by_address.get(address) is not session:
            return
        del self._by_address[address]
        if self._lru.get(address) is session:
            del self._lru[address]
        ip = str(address[0])
        mine = self._by_ip.get(ip)
        if mine is not None:
            mine.discard(session)
            if not mine:
                del self._by_ip[ip]

    def _count_handshake_end(self, session: DTLSSession, outcome: str) -> None:
        """Count how ``session``'s handshake ended: exactly once per handshake."""
        if not session._handshake_counted:
            session._handshake_counted = True
            self._counters[outcome] += 1

    async def _run_session(self, session: DTLSSession) -> None:
        counters = self._counters
        reason = CloseReason.HANDLER_RETURNED
        try:
            with session.scope:
                await self._handshake(session)
                if session.established_at is None:
                    return
                logger.info(
                    "session %s from %s established: %s, %s, peer %s",
                    session.session_id,
                    session.peer,
                    session.protocol_version,
                    session.cipher,
                    _describe_identity(session),
                    extra={"session_id": session.session_id, "peer": session.peer},
                )
                try:
                    await self._handler(session)
                except BaseException as exc:
                    failure = _handler_failure(exc, session)
                    if failure is None:
                        raise  # cancellation, or KeyboardInterrupt: not the handler's fault
                    if failure is not _NORMAL_END:
                        counters["handler_errors"] += 1
                        reason = CloseReason.HANDLER_ERROR
                        logger.error(
                            "handler error in session %s from %s",
                            session.session_id,
                            session.peer,
                            exc_info=failure,
                            extra={"session_id": session.session_id, "peer": session.peer},
                        )
        finally:
            was_established = session.established_at is not None
            session._finish(reason)
            if was_established:
                counters["sessions_closed"] += 1
                for name in _PER_SESSION:
                    counters[name] += getattr(session, name)
                self._log_end(session)
            # Cancelled mid-handshake (replaced, or the server shut down); a no-op
            # if the handshake's end was already counted.
            self._count_handshake_end(session, "handshakes_aborted")
            self._running.discard(session)
            if not self._running:
                self._tasks_done.set()
            self._reader.task_done()

    async def _handshake(self, session: DTLSSession) -> None:
        """Wait for the handshake to end and count how, unless it was cancelled.

        Completion is counted when it happens (``session_established``), so a
        handshake that completes in the same instant as its deadline, or ends
        again before this task runs, is still one completed handshake.
        """
        with trio.move_on_after(self.config.handshake_timeout):
            try:
                await session._await_handshake()
            except HandshakeError as exc:
                if session.close_reason is CloseReason.HANDSHAKE_FAILED:
                    self._count_handshake_end(session, "handshakes_failed")
                    logger.info(
                        "handshake from %s failed: %s",
                        session.peer,
                        exc,
                        extra={"session_id": session.session_id, "peer": session.peer},
                    )
                else:
                    self._count_handshake_end(session, "handshakes_aborted")
            return
        if session.established_at is None:
            self._count_handshake_end(session, "handshake_timeouts")
            session._end(CloseReason.HANDSHAKE_TIMEOUT)
            logger.info(
                "handshake from %s timed out after %.1f s",
                session.peer,
                self.config.handshake_timeout,
                extra={"session_id": session.session_id, "peer": session.peer},
            )

    def _log_end(self, session: DTLSSession) -> None:
        assert session.established_at is not None
        logger.info(
            "session %s from %s ended: %s (after %.1f s; %d datagrams in, %d out)",
            session.session_id,
            session.peer,
            session.close_reason.value if session.close_reason else "ended",
            trio.current_time() - session.established_at,
            session.datagrams_in,
            session.datagrams_out,
            extra={
                "session_id": session.session_id,
                "peer": session.peer,
                "reason": session.close_reason.value if session.close_reason else None,
            },
        )

    async def _expire_idle_sessions(self) -> None:
        """End sessions that received nothing for ``idle_timeout`` seconds.

        ``_lru`` keeps established sessions in order of their last datagram, so
        only its head needs looking at.
        """
        idle = self.config.idle_timeout
        if idle <= 0:
            await trio.sleep_forever()
        lru = self._lru
        while True:
            now = trio.current_time()
            while lru:
                session = next(iter(lru.values()))
                if session._last_activity + idle > now:
                    break
                self._counters["sessions_idle_timeout"] += 1
                session._end_by_owner(CloseReason.IDLE_TIMEOUT, grace=self.config.shutdown_grace)
            if lru:
                await trio.sleep_until(next(iter(lru.values()))._last_activity + idle)
            else:
                await trio.sleep(idle)


#: What _handler_failure returns for a handler that stopped on its own session's end.
_NORMAL_END = SessionClosed("ended")


def _handler_failure(exc: BaseException, session: DTLSSession) -> BaseException | None:
    """The part of what a handler raised that is its own failure.

    None when there is nothing to report but cancellation (or KeyboardInterrupt
    and the like, which must reach the top): the caller re-raises then.
    ``_NORMAL_END`` when all it raised was its own session's end (the peer left
    while a reply was on its way: a race UDP makes normal, not an error).
    Cancelled parts of an exception group are dropped: the session's own scope
    was cancelled (its grace ran out) and the task ends anyway; a handler's
    nursery can raise such a mixed group, and letting it escape would take the
    whole server down.
    """
    failure: BaseException | None
    if isinstance(exc, BaseExceptionGroup):
        _, failure = exc.split(trio.Cancelled)
    elif isinstance(exc, trio.Cancelled):
        failure = None
    else:
        failure = exc
    if failure is None or not isinstance(failure, Exception):
        return None

    def own_end(e: BaseException) -> bool:
        return isinstance(e, SessionClosed) and e.session is session

    if own_end(failure) or (
        isinstance(failure, ExceptionGroup) and failure.split(own_end)[1] is None
    ):
        return _NORMAL_END
    return failure


def _describe_identity(session: DTLSSession) -> str:
    if session.psk_identity is not None:
        return f"PSK identity {session.psk_identity!r}"
    identity = session.identity
    return f"certificate {identity!r}" if identity is not None else "unauthenticated"


async def serve_dtls(
    handler: Handler,
    port: int,
    *,
    config: DTLSServerConfig,
    host: str = "127.0.0.1",
    handler_nursery: trio.Nursery | None = None,
    reuse_port: bool = False,
    receive_buffer: int | None = 4 * 1024 * 1024,
    task_status: trio.TaskStatus[DTLSServer] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DTLS on ``host``:``port``, running ``handler(session)`` for each session.

    Like :func:`trio.serve_tcp`, it runs until cancelled, and is meant to be
    started with ``nursery.start``, which returns the :class:`DTLSServer` (its
    ``address`` has the actual port when ``port`` is 0)::

        async def echo(session):
            async for datagram in session:
                await session.send(datagram)

        async with trio.open_nursery() as nursery:
            server = await nursery.start(
                partial(serve_dtls, echo, 4433, config=config)
            )

    Each session gets its own task: the handshake, bounded by
    ``config.handshake_timeout``, then ``handler``. An exception from a handler
    ends only its own session: it is logged and counted (``handler_errors``).
    When the handler returns, the session is closed with close_notify.

    Cancelling the scope that runs ``serve_dtls``, or ``await server.aclose()``,
    shuts down gracefully: see :meth:`DTLSServer.aclose`. It then returns (or
    raises ``Cancelled``) once every session has ended.

    Args:
      handler: ``async def handler(session: DTLSSession)``.
      port: UDP port; 0 for an ephemeral one.
      config: credentials, client authentication, limits and timeouts. It is
        validated first: a bad setting raises :class:`ConfigError`.
      host: address to bind; ``"::"`` serves IPv6 and IPv4.
      handler_nursery: run session tasks here instead of an internal nursery.
      reuse_port: set ``SO_REUSEPORT``, so several processes can share the port;
        the kernel keeps each peer on one of them.
      receive_buffer: bytes to ask for the socket's receive buffer (the kernel
        caps it at ``net.core.rmem_max``); None keeps the system default.

    Raises:
      ConfigError: a setting is invalid.
      OSError: the address cannot be bound (for example, the port is in use).
    """
    tls = config.build_context()
    if config.client_auth == "none":
        logger.warning(
            "client authentication is off (client_auth='none'): any client can open a session"
        )
    if config.keylog_file is not None:
        logger.warning(
            "writing session secrets to %s (keylog): "
            "anyone with that file can decrypt the traffic",
            config.keylog_file,
        )
    sock = await bind_udp(host, port, reuse_port=reuse_port, receive_buffer=receive_buffer)
    server = DTLSServer(sock, config, tls, handler)
    await server._serve(handler_nursery, task_status)
