"""Building blocks of the test harness that do not need pytest.

- :class:`TestPKI`: a throwaway PKI (CA, server and client certificates, a
  second CA nobody trusts, PSK identities) as files and as configurations;
- :func:`wait_until` and :func:`wait_for_stats`: wait for a condition with a
  timeout, instead of sleeping for a magic number of seconds;
- :func:`echo_handler`: the simplest handler, for tests.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trio
from OpenSSL import SSL

from .._certs import CertificateFiles, generate_pki
from .._config import DTLSClientConfig, DTLSServerConfig
from .._records import BadRecord, parse_client_hello
from .._server import DTLSServer, ServerStats
from .._session import CloseReason, DTLSSession
from ..apps.echo import echo as echo_handler

__all__ = [
    "RawHandshake",
    "TestPKI",
    "abandon",
    "cookie_of",
    "drain_bio",
    "drain_socket",
    "echo_handler",
    "exchange",
    "local_address",
    "send_raw",
    "splice_cookie",
    "wait_for_stats",
    "wait_until",
]


@dataclasses.dataclass
class TestPKI:
    """Certificates and PSKs made for one test run; nothing here is ever reused.

    ``files`` is signed by the trusted CA; ``untrusted`` is a whole second PKI
    whose CA the server does not trust (its client certificate must be refused).
    """

    __test__ = False  # not a test class, whatever pytest thinks of the name

    files: CertificateFiles
    untrusted: CertificateFiles
    psk_identities: dict[str, bytes]

    @classmethod
    def create(cls, directory: str | os.PathLike[str]) -> TestPKI:
        base = Path(directory)
        return cls(
            files=generate_pki(base / "trusted"),
            untrusted=generate_pki(base / "untrusted", ca_name="untrusted test CA"),
            psk_identities={
                "device-1": os.urandom(16),
                "device-2": os.urandom(32),
            },
        )

    def server_config(self, *, psk: bool = True, **settings: Any) -> DTLSServerConfig:
        """A server with the test certificate that requires client certificates from
        the test CA and (unless ``psk=False``) also accepts the test PSK identities."""
        config = DTLSServerConfig(**settings)
        config.load_cert_chain(self.files.server_cert, self.files.server_key)
        if config.client_auth == "required":
            config.load_verify_locations(self.files.ca_cert)
        if psk and "psk_identities" not in settings:
            config.psk_identities = dict(self.psk_identities)
        return config

    def client_config(self, *, certificate: bool = True, **settings: Any) -> DTLSClientConfig:
        """A client that trusts the test CA and presents the test client certificate."""
        config = DTLSClientConfig(**settings)
        config.load_verify_locations(self.files.ca_cert)
        if certificate:
            config.load_cert_chain(self.files.client_cert, self.files.client_key)
        return config

    def psk_client_config(
        self, identity: str = "device-1", key: bytes | None = None, **settings: Any
    ) -> DTLSClientConfig:
        """A client that authenticates with a PSK (by default a known identity and its key)."""
        config = DTLSClientConfig(**settings)
        config.set_psk(identity, key if key is not None else self.psk_identities[identity])
        return config

    def untrusted_client_config(self, **settings: Any) -> DTLSClientConfig:
        """A client that trusts the server but presents a certificate from another CA."""
        config = DTLSClientConfig(**settings)
        config.load_verify_locations(self.files.ca_cert)
        config.load_cert_chain(self.untrusted.client_cert, self.untrusted.client_key)
        return config


async def wait_until(
    predicate: Callable[[], object], *, timeout: float = 5.0, message: str | None = None
) -> None:
    """Wait until ``predicate()`` is true, checking every few milliseconds.

    Raises ``AssertionError`` (with ``message``) after ``timeout`` seconds.
    """
    with trio.move_on_after(timeout):
        # Polling: the condition is arbitrary, so there is no event to wait on.
        while not predicate():  # noqa: ASYNC110
            await trio.sleep(0.005)
        return
    raise AssertionError(message or f"condition not met within {timeout} s")


async def wait_for_stats(
    server: DTLSServer,
    *,
    timeout: float = 5.0,
    **expected: int | Callable[[int], bool],
) -> ServerStats:
    """Wait until every named counter of ``server.stats()`` matches.

    A value is an exact count or a predicate: ``wait_for_stats(server,
    sessions_active=3, handler_errors=lambda n: n >= 1)``. Returns the
    snapshot that matched; raises ``AssertionError`` showing the last one
    after ``timeout`` seconds.
    """
    unknown = set(expected) - {f.name for f in dataclasses.fields(ServerStats)}
    if unknown:
        raise TypeError(f"unknown counters: {sorted(unknown)}")

    def matches(stats: ServerStats) -> bool:
        for name, want in expected.items():
            value = getattr(stats, name)
            if callable(want):
                if not want(value):
                    return False
            elif value != want:
                return False
        return True

    with trio.move_on_after(timeout):
        while not matches(stats := server.stats()):  # noqa: ASYNC110
            await trio.sleep(0.005)
        return stats
    shown = {name: getattr(server.stats(), name) for name in expected}
    raise AssertionError(f"stats did not reach {expected} within {timeout} s; last: {shown}")


async def exchange(session: DTLSSession, datagram: bytes, *, timeout: float = 5.0) -> bytes:
    """Send one datagram and return the next one received."""
    with trio.fail_after(timeout):
        await session.send(datagram)
        return await session.receive()


def local_address(session: DTLSSession) -> tuple[str, int]:
    """The (host, port) a client session sends from."""
    sock: socket.socket = session._owner._sock  # type: ignore[attr-defined]
    host, port = sock.getsockname()[:2]
    return host, port


def abandon(session: DTLSSession) -> None:
    """Make a client session vanish without close_notify, like a peer that lost power."""
    session._owner.close()  # type: ignore[attr-defined]
    session._end(CloseReason.UNREACHABLE)


def send_raw(session: DTLSSession, datagram: bytes) -> None:
    """Send ``datagram`` as is from a client session's own address (for hostile-input tests)."""
    session._owner._sock.send(datagram)  # type: ignore[attr-defined]


#: Where a ClientHello's session_id length sits: record header (13), handshake
#: header (12), client_version (2), random (32).
CLIENT_HELLO_SESSION_ID_AT = 13 + 12 + 2 + 32


def splice_cookie(datagram: bytes, cookie: bytes) -> bytes | None:
    """``datagram`` (a ClientHello) with ``cookie`` in place of its own, lengths fixed.

    None if ``datagram`` is not a ClientHello the server's parser accepts. With the
    cookie from the server's HelloVerifyRequest (:func:`cookie_of`), any mutated
    ClientHello gets past the stateless cookie check into OpenSSL.
    """
    try:
        parse_client_hello(datagram)
    except BadRecord:
        return None
    cookie_at = CLIENT_HELLO_SESSION_ID_AT + 1 + datagram[CLIENT_HELLO_SESSION_ID_AT]
    old = datagram[cookie_at]
    delta = len(cookie) - old
    out = bytearray(datagram[:cookie_at])
    out += bytes((len(cookie),)) + cookie + datagram[cookie_at + 1 + old :]
    for start, size in ((11, 2), (14, 3), (22, 3)):  # record, message and fragment lengths
        value = int.from_bytes(out[start : start + size], "big") + delta
        if not 0 <= value < 1 << (8 * size):
            return None
        out[start : start + size] = value.to_bytes(size, "big")
    return bytes(out)


def cookie_of(hello_verify_request: bytes) -> bytes | None:
    """The cookie in a HelloVerifyRequest datagram, or None if it is not one."""
    if len(hello_verify_request) < 28 or hello_verify_request[13] != 3:
        return None
    length = hello_verify_request[27]
    return hello_verify_request[28 : 28 + length]


def drain_socket(sock: socket.socket) -> list[bytes]:
    """Every datagram waiting on a non-blocking stdlib socket (ICMP refusals end it too)."""
    received = []
    while True:
        try:
            received.append(sock.recv(65535))
        except (BlockingIOError, ConnectionRefusedError):
            return received


def drain_bio(conn: SSL.Connection) -> bytes:
    """Everything a memory-BIO connection has written and not yet been read."""
    chunks = []
    while True:
        try:
            chunks.append(conn.bio_read(65535))
        except SSL.WantReadError:
            return b"".join(chunks)


class RawHandshake:
    """A client handshake driven step by step, to leave it half open on purpose.

    ``await RawHandshake.start(address, config)`` does the cookie exchange and
    sends the ClientHello with the cookie, then stops: the server has a
    session in its handshake, and nothing more will come.
    """

    def __init__(self, sock: trio.socket.SocketType, conn: SSL.Connection) -> None:
        self.sock = sock
        self.conn = conn

    @classmethod
    async def start(
        cls, address: tuple[str, int], config: DTLSClientConfig, *, timeout: float = 5.0
    ) -> RawHandshake:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        sock = trio.socket.socket(family, socket.SOCK_DGRAM)
        await sock.connect(address)
        conn = SSL.Connection(config.build_context().context, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(1400)
        self = cls(sock, conn)
        with trio.fail_after(timeout):
            await self._step()  # ClientHello without a cookie
            hello_verify = await sock.recv(65535)
            conn.bio_write(hello_verify)
            await self._step()  # ClientHello with the cookie
        return self

    async def _step(self) -> None:
        with contextlib.suppress(SSL.WantReadError):
            self.conn.do_handshake()
        data = drain_bio(self.conn)
        if data:
            await self.sock.send(data)

    def close(self) -> None:
        self.sock.close()
