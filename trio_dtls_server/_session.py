"""The life of one session: handshake, datagrams in and out, and its end.

A :class:`DTLSSession` wraps one OpenSSL connection with memory BIOs. It does no
I/O of its own: whoever owns the UDP socket (the server, or the client) hands
it each datagram with :meth:`DTLSSession._on_datagram`, which runs OpenSSL
synchronously and sends whatever OpenSSL produced. Tasks only ever wait: for
the handshake to finish, for a datagram to read, for the retransmission timer.

Retransmission during the handshake is OpenSSL's own timer
(``DTLSv1_get_timeout``/``DTLSv1_handle_timeout``), and everything OpenSSL
writes is sent. That is what keeps a handshake alive under loss: trio's
endpoint retransmits by itself and discards what it takes for OpenSSL's
retransmission, which loses the final flight when OpenSSL emits a
retransmission and a new flight in one write.

Every await point keeps one invariant: OpenSSL's outgoing BIO is empty, because
each synchronous step that can write to it also sends what it wrote.
"""

from __future__ import annotations

import enum
import logging
import math
from collections import deque
from typing import Any, Protocol

import trio
from cryptography import x509
from OpenSSL import SSL

from . import _internals
from ._errors import HandshakeError, SessionClosed
from ._records import BadRecord, is_single_application_record, iter_records, pack_datagrams

logger = logging.getLogger("trio_dtls_server")

#: Largest plaintext of one DTLS record (RFC 6347: 2**14).
MAX_DATAGRAM_PAYLOAD = 2**14

# The per-datagram record functions: direct OpenSSL calls when available,
# pyOpenSSL's public ones otherwise (see _internals.record_functions).
_decrypt, _encrypt, FAST_PATH = _internals.record_functions()
_READ_SIZE = 2**14 + 2048
_BIO_READ_SIZE = 2**16


class CloseReason(enum.StrEnum):
    """Why a session ended; ``DTLSSession.close_reason`` holds one of these."""

    PEER_CLOSED = "peer sent close_notify"
    LOCAL_CLOSE = "closed by this side"
    HANDLER_RETURNED = "handler returned"
    HANDLER_ERROR = "handler raised an exception"
    IDLE_TIMEOUT = "idle timeout"
    REPLACED = "replaced by a new handshake from the same address"
    EVICTED = "evicted to admit a new session"
    SHUTDOWN = "server shutdown"
    PROTOCOL_ERROR = "fatal alert or protocol error"
    HANDSHAKE_FAILED = "handshake failed"
    HANDSHAKE_TIMEOUT = "handshake timeout"
    UNREACHABLE = "peer unreachable"


class _State(enum.Enum):
    HANDSHAKING = "handshaking"
    ESTABLISHED = "established"
    # Ended by our side (idle, shutdown, eviction): receive() is over, but the
    # handler may still send until it returns or its grace runs out.
    ENDING = "ending"
    CLOSED = "closed"


def ssl_error_text(exc: SSL.Error) -> str:
    """The reasons OpenSSL gave, e.g. 'certificate verify failed'."""
    reasons = []
    for item in exc.args[0] if exc.args and isinstance(exc.args[0], list) else ():
        if isinstance(item, tuple) and item:
            reasons.append(str(item[-1]))
    if reasons:
        return "; ".join(dict.fromkeys(reasons))
    return type(exc).__name__


class _Reading:
    """What a session's waiter slot holds while its task reads the socket for everyone."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "READING"


#: The waiter slot's value while the task waiting for this session is the one
#: waiting on the socket (see ``_reader.SocketReader``): news for the
#: session must interrupt that wait rather than reschedule the task.
READING = _Reading()


class SessionOwner(Protocol):
    """What a session needs from whoever owns its socket (a server, or a client)."""

    def send_nowait(self, datagram: bytes, address: Any) -> object: ...

    async def send(self, datagram: bytes, address: Any) -> None: ...

    async def wait_for_input(self, session: DTLSSession) -> None:
        """Return once ``session`` may have news: a datagram, or an end."""

    def wake(self, waiter: trio.lowlevel.Task | _Reading) -> None:
        """Wake the task waiting for a session's news (``waiter`` is READING: see there)."""

    def session_established(self, session: DTLSSession) -> None: ...

    def session_active(self, session: DTLSSession) -> None:
        """``session`` just received an authenticated datagram."""

    def session_ended(self, session: DTLSSession) -> None:
        """``session`` stopped receiving (it may still be finishing its task)."""


class DTLSSession(trio.abc.Channel[bytes]):
    """One peer's DTLS association: what a handler holds, and what a client gets.

    Use it like a trio channel of datagrams::

        async for datagram in session:
            await session.send(datagram)

    Iteration (and :meth:`receive`, with ``trio.EndOfChannel``) ends cleanly
    when the peer sends close_notify, when a new handshake from the same address
    replaces this session, on the idle timeout and on server shutdown;
    :attr:`close_reason` says which. After :meth:`aclose` this side is closed:
    ``receive``/``send`` raise ``trio.ClosedResourceError``. Sending on a session
    that ended otherwise raises :class:`SessionClosed`.

    There is no public constructor: servers hand sessions to handlers, and
    :func:`connect_dtls` returns one.
    """

    __slots__ = (
        "_close_notify_due",
        "_close_notify_sent",
        "_closed_here",
        "_conn",
        "_grace",
        "_handshake_counted",
        "_handshake_error",
        "_inbox",
        "_last_activity",
        "_lot",
        "_max_queued",
        "_mtu",
        "_owner",
        "_state",
        "_waiter",
        "bytes_in",
        "bytes_out",
        "client_random",
        "close_reason",
        "datagrams_dropped",
        "datagrams_in",
        "datagrams_out",
        "established_at",
        "peer_address",
        "psk_identity",
        "scope",
        "session_id",
        "started_at",
    )

    def __init__(
        self,
        conn: SSL.Connection,
        peer_address: tuple[Any, ...],
        owner: SessionOwner,
        *,
        session_id: int,
        mtu: int,
        max_queued: int,
        grace: float = math.inf,
    ) -> None:
        self._conn = conn
        conn.set_app_data(self)
        conn.set_ciphertext_mtu(mtu)
        self._mtu = mtu
        self._owner = owner
        self._max_queued = max_queued
        self._inbox: deque[bytes] = deque()
        # One task waiting for news (the usual case), and a lot for any others.
        self._waiter: trio.lowlevel.Task | _Reading | None = None
        self._lot = trio.lowlevel.ParkingLot()
        self._state = _State.HANDSHAKING
        self._handshake_error: HandshakeError | None = None
        # Whether the owner has counted how the handshake ended (it does so once).
        self._handshake_counted = False
        self._close_notify_due = False
        self._close_notify_sent = False
        # aclose() was called: this side is closed, whatever ended the session.
        self._closed_here = False
        # Seconds the task serving this session gets once the session has ended.
        self._grace = grace
        self._last_activity = trio.current_time()
        #: Cancel scope the owner runs this session's task in.
        self.scope = trio.CancelScope()
        #: The peer's (host, port) as the socket reports it.
        self.peer_address: tuple[Any, ...] = peer_address
        #: A number unique within the server (or client) that made the session.
        self.session_id = session_id
        #: The PSK identity the peer authenticated with, if it used PSK.
        self.psk_identity: str | None = None
        #: Why the session ended (None while it is live).
        self.close_reason: CloseReason | None = None
        #: ``trio.current_time()`` when the handshake started / finished.
        self.started_at = self._last_activity
        self.established_at: float | None = None
        #: The ClientHello random that started this session (server side).
        self.client_random = b""
        #: Datagrams and bytes of application data, each way.
        self.datagrams_in = 0
        self.datagrams_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        #: Datagrams dropped because the reader fell ``max_queued_datagrams`` behind.
        self.datagrams_dropped = 0

    def __repr__(self) -> str:
        return (
            f"<DTLSSession {self.session_id} peer={self.peer} "
            f"state={self._state.value} identity={self.identity!r}>"
        )

    # -- what a handler can ask ------------------------------------------------

    @property
    def peer(self) -> str:
        """The peer as ``host:port`` (``[host]:port`` for IPv6), for logs."""
        host, port = self.peer_address[0], self.peer_address[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"

    @property
    def peer_certificate(self) -> x509.Certificate | None:
        """The peer's verified certificate, or None (PSK, or no client authentication)."""
        if self.established_at is None:
            return None
        return self._conn.get_peer_certificate(as_cryptography=True)

    @property
    def identity(self) -> str | None:
        """Who the peer is: its PSK identity, or its certificate's common name."""
        if self.psk_identity is not None:
            return self.psk_identity
        cert = self.peer_certificate
        if cert is None:
            return None
        names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
        return str(names[0].value) if names else cert.subject.rfc4514_string()

    @property
    def cipher(self) -> str | None:
        """The negotiated cipher suite (OpenSSL's name), once the handshake is done."""
        return self._conn.get_cipher_name() if self.established_at is not None else None

    @property
    def protocol_version(self) -> str | None:
        """The negotiated protocol version, e.g. ``'DTLSv1.2'``."""
        if self.established_at is None:
            return None
        return self._conn.get_protocol_version_name()

    @property
    def session_reused(self) -> bool:
        """True if the handshake resumed an earlier session (abbreviated handshake)."""
        return self.established_at is not None and _internals.session_reused(self._conn)

    @property
    def tls_session(self) -> SSL.Session | None:
        """The TLS session to resume later: pass it to ``connect_dtls(session=...)``.

        With the server's session tickets (on by default), the next handshake
        is abbreviated: no certificates, no key exchange.
        """
        if self.established_at is None:
            return None
        return self._conn.get_session()

    @property
    def is_established(self) -> bool:
        """True while datagrams flow both ways."""
        return self._state is _State.ESTABLISHED

    @property
    def cleartext_mtu(self) -> int:
        """The largest datagram :meth:`send` can send without IP fragmentation."""
        return int(self._conn.get_cleartext_mtu())

    # -- the channel API ----------------------------------------------------

    async def receive(self) -> bytes:
        """The next datagram from the peer, waiting if need be.

        Raises ``trio.EndOfChannel`` once the session has ended and every
        datagram received before that has been read.

        When a datagram is already queued it is returned without yielding to
        other tasks (cancellation is still honoured). That cannot starve them:
        datagrams are queued only by the task reading the socket, which reads
        only while waiting, so at most ``max_queued_datagrams`` receives in a
        row skip a yield.
        """
        await trio.lowlevel.checkpoint_if_cancelled()
        if self._closed_here:
            raise trio.ClosedResourceError("this session was closed")
        inbox = self._inbox
        while not inbox:
            if self._state is not _State.ESTABLISHED:
                if self._closed_here:
                    raise trio.ClosedResourceError("this session was closed")
                raise trio.EndOfChannel
            await self._owner.wait_for_input(self)
        return inbox.popleft()

    async def send(self, value: bytes | bytearray | memoryview) -> None:
        """Send one datagram of at most 16 KiB to the peer, encrypted.

        Waits only if the kernel's send buffer is full. A send the kernel takes
        at once yields to other tasks only every few calls, which is enough to
        keep a task that does nothing but send from starving the others.
        """
        if self._state is not _State.ESTABLISHED and self._state is not _State.ENDING:
            await trio.lowlevel.checkpoint()
            if self._closed_here:
                raise trio.ClosedResourceError("this session was closed")
            raise SessionClosed((self.close_reason or CloseReason.HANDSHAKE_FAILED).value, self)
        if type(value) is not bytes:
            # Any bytes-like object; len() of a memoryview counts items, not bytes.
            value = bytes(memoryview(value))
        size = len(value)
        if not size:
            raise ValueError("DTLS cannot send an empty datagram")
        if size > MAX_DATAGRAM_PAYLOAD:
            raise ValueError(f"a DTLS record holds at most {MAX_DATAGRAM_PAYLOAD} bytes")
        try:
            record = _encrypt(self._conn, value)
        except SSL.Error as exc:
            self._protocol_error(exc)
            raise SessionClosed(CloseReason.PROTOCOL_ERROR.value, self) from None
        self.datagrams_out += 1
        self.bytes_out += size
        await self._owner.send(record, self.peer_address)

    async def aclose(self) -> None:
        """Send close_notify (if the session is live) and close this side.

        Afterwards ``receive()`` and ``send()`` raise ``trio.ClosedResourceError``;
        datagrams still queued are dropped.
        """
        self._closed_here = True
        self._inbox.clear()
        if self._state is not _State.CLOSED:
            self._send_close_notify()
            self._end(CloseReason.LOCAL_CLOSE)
        await trio.lowlevel.checkpoint()

    # -- driven by the owner of the socket (synchronous) -----------------------

    def _on_datagram(self, datagram: bytes) -> None:
        state = self._state
        if state is _State.ESTABLISHED:
            if is_single_application_record(datagram):
                # The common case needs one read: the record fills the datagram,
                # and application data makes OpenSSL write nothing back.
                try:
                    data = _decrypt(self._conn, datagram)
                except SSL.WantReadError:
                    # A replay, or a record that failed to authenticate; OpenSSL
                    # writes nothing for those, but keep the BIO empty regardless.
                    self._flush()
                    return
                except SSL.Error:
                    self._read_all()
                    return
                self._deliver(data)
            else:
                self._conn.bio_write(datagram)
                self._read_all()
        elif state is _State.HANDSHAKING:
            self._conn.bio_write(datagram)
            self._drive_handshake()
        # ENDING/CLOSED: the session is over for the peer; drop.

    def _deliver(self, data: bytes) -> None:
        self.datagrams_in += 1
        self.bytes_in += len(data)
        self._last_activity = trio.current_time()
        self._owner.session_active(self)
        if len(self._inbox) >= self._max_queued:
            self.datagrams_dropped += 1
            return
        self._inbox.append(data)
        self._wake_one()

    def _read_all(self) -> None:
        conn = self._conn
        while self._state is _State.ESTABLISHED:
            try:
                data = conn.read(_READ_SIZE)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                # TLS: answer close_notify with close_notify.
                self._send_close_notify()
                self._end(CloseReason.PEER_CLOSED)
                return
            except SSL.Error as exc:
                self._flush()
                self._protocol_error(exc)
                return
            self._deliver(data)
        # Handshake records after the handshake (a peer retransmitting its last
        # flight because ours was lost) make OpenSSL resend; send that.
        self._flush()

    def _drive_handshake(self) -> None:
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            self._flush()
            return
        except SSL.Error as exc:
            self._flush()  # the alert OpenSSL wrote, if any
            self._fail_handshake(ssl_error_text(exc))
            return
        self._flush()
        self._state = _State.ESTABLISHED
        self.established_at = self._last_activity = trio.current_time()
        self._owner.session_established(self)
        self._wake_all()
        # The datagram that finished the handshake may carry application data too.
        self._read_all()

    def _on_timer(self) -> None:
        """OpenSSL's retransmission timer expired: resend the last flight."""
        if self._state is not _State.HANDSHAKING:
            return
        try:
            self._conn.DTLSv1_handle_timeout()
        except SSL.Error as exc:
            self._flush()
            self._fail_handshake(ssl_error_text(exc))
            return
        self._flush()

    def _flush(self) -> None:
        """Send whatever OpenSSL has written, packed into datagrams of at most ``mtu``."""
        chunks = []
        conn = self._conn
        while True:
            try:
                chunks.append(conn.bio_read(_BIO_READ_SIZE))
            except SSL.WantReadError:
                break
        if not chunks:
            return
        data = b"".join(chunks)
        try:
            datagrams = pack_datagrams(iter_records(data), self._mtu)
        except BadRecord:  # pragma: no cover - OpenSSL writes whole records
            datagrams = [data]
        for datagram in datagrams:
            self._owner.send_nowait(datagram, self.peer_address)

    def _note_psk_identity(self, identity: str) -> None:
        # Called from the PSK callback during the handshake (see _config).
        self.psk_identity = identity

    # -- ending ---------------------------------------------------------------

    def _send_close_notify(self) -> None:
        if self._close_notify_sent or self.established_at is None:
            return
        self._close_notify_sent = True
        self._close_notify_due = False
        try:
            self._conn.shutdown()
        except SSL.Error:
            return  # the connection is broken; nothing to say
        self._flush()

    def _end(self, reason: CloseReason) -> None:
        """The session is over at once: nothing more is sent or received."""
        if self._state is _State.CLOSED:
            return
        self._state = _State.CLOSED
        if self.close_reason is None:
            self.close_reason = reason
        # The task serving the session gets its grace, then is cancelled.
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + self._grace)
        self._wake_all()
        self._owner.session_ended(self)

    def _end_by_owner(self, reason: CloseReason, *, grace: float, notify: bool = True) -> None:
        """Our side ends the session (idle, eviction, shutdown, replacement).

        A handshaking session stops at once. An established one stops
        receiving; its handler may still send for ``grace`` seconds, then
        close_notify follows (unless ``notify`` is false: a replaced session's
        peer has already moved on).
        """
        if self._state is _State.HANDSHAKING:
            self._end(reason)
            self.scope.cancel()
            return
        if self._state is not _State.ESTABLISHED:
            return
        self._state = _State.ENDING
        self.close_reason = reason
        self._close_notify_due = notify
        self._wake_all()
        self.scope.deadline = min(self.scope.deadline, trio.current_time() + grace)
        self._owner.session_ended(self)

    def _finish(self, reason: CloseReason) -> None:
        """The task serving this session is done: close_notify if due, then closed."""
        if self._state is _State.ESTABLISHED or self._close_notify_due:
            self._send_close_notify()
        self._end(reason)

    def _fail_handshake(self, text: str) -> None:
        self._handshake_error = HandshakeError(text)
        self._end(CloseReason.HANDSHAKE_FAILED)

    def _protocol_error(self, exc: SSL.Error) -> None:
        logger.info("session %s from %s: %s", self.session_id, self.peer, ssl_error_text(exc))
        self._end(CloseReason.PROTOCOL_ERROR)

    # -- waiting ----------------------------------------------------------------

    async def _park(self) -> None:
        """Wait until the session has news (see ``_wake_one``/``_wake_all``).

        A single waiter takes a slot, which costs less than a ParkingLot on the
        per-datagram path; further waiters queue on the lot.
        """
        if self._waiter is not None:
            await self._lot.park()
            return
        task = trio.lowlevel.current_task()
        self._waiter = task

        def abort(_: object) -> trio.lowlevel.Abort:
            if self._waiter is task:
                self._waiter = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    def _wake_one(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._owner.wake(waiter)
        elif self._lot:
            self._lot.unpark()

    def _wake_all(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            self._owner.wake(waiter)
        self._lot.unpark_all()

    async def _await_handshake(self) -> None:
        """Wait until the handshake is done, retransmitting on OpenSSL's timer.

        Returns once the handshake has completed, even if the session has
        already ended again (a peer can finish the handshake, send data and
        close_notify in one datagram); raises :class:`HandshakeError` if it never
        completed. Bound it with a cancel scope.
        """
        while self._state is _State.HANDSHAKING:
            timeout = self._conn.DTLSv1_get_timeout()
            with trio.move_on_after(math.inf if timeout is None else timeout) as timer:
                await self._owner.wait_for_input(self)
            if timer.cancelled_caught:
                self._on_timer()
        if self.established_at is not None:
            return
        if self._handshake_error is not None:
            raise self._handshake_error
        reason = self.close_reason.value if self.close_reason else "ended"
        raise HandshakeError(f"handshake abandoned: {reason}")
