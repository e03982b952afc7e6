"""``connect_dtls``: the client side, with the same session type as the server.

A client session owns a connected UDP socket (the kernel filters out anyone
but the server) and has no background task: whoever waits for a datagram,
``receive()`` or the handshake, reads the socket and feeds the session.
"""

from __future__ import annotations

import errno
import ipaddress
import itertools
import socket
from typing import Any

import trio
from OpenSSL import SSL

from . import _internals
from ._config import DTLSClientConfig, TLSContext
from ._errors import HandshakeError, HandshakeTimeout
from ._session import CloseReason, DTLSSession
from ._udp import MAX_DATAGRAM, RECEIVE_BATCH, UDPSender

_session_ids = itertools.count(1)


class _ClientOwner:
    """Socket owner for one client session (see ``SessionOwner``)."""

    def __init__(self, sock: socket.socket, tls: TLSContext) -> None:
        self._sock = sock
        self._sender = UDPSender(sock)
        self._tls = tls  # keeps the context's callbacks alive with the session
        self._reading = False
        self._closed = False
        self.refused = False

    def send_nowait(self, datagram: bytes, address: Any) -> object:
        if self._closed:
            return False
        return self._sender.send_nowait(datagram)

    async def send(self, datagram: bytes, address: Any) -> None:
        await self._sender.send(datagram)

    async def wait_for_input(self, session: DTLSSession) -> None:
        if self._reading:
            # trio lets one task at a time wait on a socket: the others wait
            # for the reader to hand over what it read.
            await session._park()
            return
        self._reading = True
        try:
            try:
                await trio.lowlevel.wait_readable(self._sock)
            except trio.ClosedResourceError:
                return  # another task closed the session (see session_ended)
            for _ in range(RECEIVE_BATCH):
                if self._closed:
                    break
                try:
                    datagram = self._sock.recv(MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:
                    # On a connected UDP socket an ICMP "port unreachable"
                    # from the server surfaces as ECONNREFUSED.
                    if exc.errno in (errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH):
                        self.refused = True
                        session._end(CloseReason.UNREACHABLE)
                        break
                    raise
                session._on_datagram(datagram)
        finally:
            self._reading = False
            session._wake_all()
            if self._closed:
                self._close_socket()

    def wake(self, waiter: trio.lowlevel.Task | object) -> None:
        assert isinstance(waiter, trio.lowlevel.Task)  # READING is the server's
        trio.lowlevel.reschedule(waiter)

    def session_established(self, session: DTLSSession) -> None:
        pass

    def session_active(self, session: DTLSSession) -> None:
        pass

    def session_ended(self, session: DTLSSession) -> None:
        self._closed = True
        if self._reading:
            # Wake the task waiting on the socket; it closes it on its way out.
            trio.lowlevel.notify_closing(self._sock)
        else:
            self._close_socket()

    def _close_socket(self) -> None:
        if self._sock.fileno() != -1:
            if not self._reading:
                trio.lowlevel.notify_closing(self._sock)
            self._sock.close()

    def close(self) -> None:
        self._closed = True
        self._close_socket()


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def connect_dtls(
    host: str,
    port: int,
    config: DTLSClientConfig | None = None,
    *,
    server_hostname: str | None = None,
    local_address: tuple[str, int] | None = None,
    session: SSL.Session | None = None,
) -> DTLSSession:
    """Open a DTLS session to ``host``:``port`` and complete the handshake.

    The server's certificate is verified against ``config``'s trusted CAs and
    must name ``server_hostname`` (default: ``host``), as a DNS name or an IP
    address, unless the config opts out. The whole handshake is bounded by
    ``config.handshake_timeout``. Close the session with ``await session.aclose()``
    (or ``async with session:``), which sends close_notify.

    Raises:
      HandshakeTimeout: no handshake within ``handshake_timeout``.
      HandshakeError: the server refused us, or we refused the server.
      ConfigError: the configuration is invalid.
      OSError: ``host`` cannot be resolved, or ``local_address`` not bound.

    ``session`` (an earlier session's ``tls_session``) asks the server to
    resume it: an abbreviated handshake, if the server still accepts it (else
    a full one). ``local_address`` binds the client's socket first: to reconnect from the
    same port (which replaces the server's session for that address), or to
    use another source address.
    """
    if config is None:
        config = DTLSClientConfig()
    tls = config.build_context()
    infos = await trio.socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    family, type_, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, type_, proto)
    owner = _ClientOwner(sock, tls)
    try:
        sock.setblocking(False)
        if local_address is not None:
            sock.bind(local_address)
        # Resolved to the socket's own address form, so that replies match (an
        # IPv6 peer is a 4-tuple), and connected, so the kernel drops strangers.
        sock.connect(sockaddr)
        conn = SSL.Connection(tls.context, None)
        conn.set_connect_state()
        if session is not None:
            conn.set_session(session)
        name = server_hostname if server_hostname is not None else host
        if config.verify_server and config.check_hostname:
            _internals.require_peer_host(conn, name)
        if not _is_ip_literal(name):
            conn.set_tlsext_host_name(name.encode("idna"))
        mtu = config.mtu or (1472 if family == socket.AF_INET else 1452)
        dtls = DTLSSession(
            conn,
            sockaddr,
            owner,
            session_id=next(_session_ids),
            mtu=mtu,
            max_queued=config.max_queued_datagrams,
        )
        try:
            with trio.fail_after(config.handshake_timeout):
                dtls._drive_handshake()  # sends the first ClientHello
                await dtls._await_handshake()
        except trio.TooSlowError:
            dtls._end(CloseReason.HANDSHAKE_TIMEOUT)
            raise HandshakeTimeout(
                f"no DTLS handshake with {dtls.peer} within {config.handshake_timeout} s"
            ) from None
        except HandshakeError as exc:
            if owner.refused:
                raise HandshakeError(
                    f"nothing is listening at {dtls.peer} (ICMP port unreachable)"
                ) from None
            raise HandshakeError(f"handshake with {dtls.peer} failed: {exc}") from None
    except BaseException:
        owner.close()
        raise
    return dtls
