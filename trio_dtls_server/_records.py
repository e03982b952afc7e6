"""DTLS 1.2 wire format: what we read before OpenSSL sees a datagram.

Everything here parses bytes from the network, so every function that takes a
datagram is total: bad input raises :class:`BadRecord` (or returns a "no"),
never ``IndexError`` or ``struct.error``.

The stateless cookie exchange lives here too. It follows RFC 6347 section
4.2.1: the cookie covers the peer's address and the ClientHello fields that the
client MUST repeat (version, random, session_id, cipher_suites,
compression_method), and nothing else. trio's own cookie also covers the
extensions, which locks out clients whose extensions change between the two
ClientHellos (OpenSSL adds a padding extension once the cookie makes the hello
longer; Qt's example client does exactly that).
"""

from __future__ import annotations

import hmac
import os
import struct
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

CONTENT_CHANGE_CIPHER_SPEC = 20
CONTENT_ALERT = 21
CONTENT_HANDSHAKE = 22
CONTENT_APPLICATION_DATA = 23

HANDSHAKE_CLIENT_HELLO = 1
HANDSHAKE_HELLO_VERIFY_REQUEST = 3

DTLS_1_0 = b"\xfe\xff"

#: content type (1), version (2), epoch (2) + sequence number (6), length (2)
RECORD_HEADER = struct.Struct("!B2sQH")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 13
#: msg_type (1), length (3), message_seq (2), fragment_offset (3), fragment_length (3)
HANDSHAKE_HEADER_SIZE = 12

#: The largest DTLS record: 2**14 bytes of plaintext plus at most 2048 of expansion.
MAX_RECORD_SIZE = RECORD_HEADER_SIZE + 2**14 + 2048


class BadRecord(Exception):
    """A datagram that is not valid DTLS; the message says which rule it broke."""


def iter_records(data: bytes) -> Iterator[bytes]:
    """Split a run of DTLS records into whole records.

    OpenSSL writes each record separately into its memory BIO; reading the BIO
    gives them back-to-back, and the record headers say where each one ends.
    """
    offset = 0
    end = len(data)
    while offset < end:
        if end - offset < RECORD_HEADER_SIZE:
            raise BadRecord("truncated record header")
        length = int.from_bytes(data[offset + 11 : offset + 13], "big")
        stop = offset + RECORD_HEADER_SIZE + length
        if stop > end:
            raise BadRecord("record longer than the data holding it")
        yield data[offset:stop]
        offset = stop


def pack_datagrams(records: Iterable[bytes], mtu: int) -> list[bytes]:
    """Pack whole records into as few datagrams as fit in ``mtu`` bytes each.

    RFC 6347 section 4.1.1 allows several records in one datagram; a record
    is never split. A record larger than ``mtu`` travels alone.
    """
    datagrams: list[bytes] = []
    current = b""
    for record in records:
        if current and len(current) + len(record) > mtu:
            datagrams.append(current)
            current = b""
        current += record
    if current:
        datagrams.append(current)
    return datagrams


def is_single_application_record(datagram: bytes) -> bool:
    """True for the common case: one application_data record filling the datagram."""
    return (
        len(datagram) > RECORD_HEADER_SIZE
        and datagram[0] == CONTENT_APPLICATION_DATA
        and RECORD_HEADER_SIZE + (datagram[11] << 8 | datagram[12]) == len(datagram)
    )


def looks_like_client_hello(datagram: bytes) -> bool:
    """A cheap first test: a handshake record in epoch 0 carrying a ClientHello.

    Checking the epoch matters: a renegotiation ClientHello, or any handshake
    record of an established session, is encrypted in a later epoch and belongs
    to that session, not to the cookie exchange.
    """
    return (
        len(datagram) > RECORD_HEADER_SIZE + HANDSHAKE_HEADER_SIZE
        and datagram[0] == CONTENT_HANDSHAKE
        and datagram[3] == 0
        and datagram[4] == 0
        and datagram[13] == HANDSHAKE_CLIENT_HELLO
    )


@dataclass(frozen=True, slots=True)
class ClientHello:
    """The parts of a ClientHello that the cookie exchange needs."""

    record_sequence: int
    version: bytes
    random: bytes
    session_id: bytes
    cookie: bytes
    cipher_suites: bytes
    compression_methods: bytes


class _Reader:
    """Bounds-checked reads from untrusted bytes."""

    __slots__ = ("data", "offset")

    def __init__(self, data: bytes, offset: int = 0) -> None:
        self.data = data
        self.offset = offset

    def take(self, n: int, what: str) -> bytes:
        end = self.offset + n
        if end > len(self.data):
            raise BadRecord(f"ClientHello truncated in {what}")
        chunk = self.data[self.offset : end]
        self.offset = end
        return chunk

    def uint(self, n: int, what: str) -> int:
        return int.from_bytes(self.take(n, what), "big")

    def vector(self, length_bytes: int, what: str) -> bytes:
        return self.take(self.uint(length_bytes, what), what)


def parse_client_hello(datagram: bytes) -> ClientHello:
    """Parse the ClientHello at the start of ``datagram``, or raise :class:`BadRecord`."""
    if len(datagram) < RECORD_HEADER_SIZE:
        raise BadRecord("truncated record header")
    content_type, _version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram)
    if content_type != CONTENT_HANDSHAKE:
        raise BadRecord("not a handshake record")
    if epoch_seq >> 48:
        raise BadRecord("ClientHello outside epoch 0")
    body_end = RECORD_HEADER_SIZE + length
    if body_end > len(datagram):
        raise BadRecord("record longer than the datagram")
    reader = _Reader(datagram[:body_end], RECORD_HEADER_SIZE)
    msg_type = reader.uint(1, "handshake header")
    msg_length = reader.uint(3, "handshake header")
    reader.uint(2, "handshake header")  # message_seq
    fragment_offset = reader.uint(3, "handshake header")
    fragment_length = reader.uint(3, "handshake header")
    if msg_type != HANDSHAKE_CLIENT_HELLO:
        raise BadRecord("not a ClientHello")
    # A fragmented ClientHello would need per-peer reassembly state before the
    # peer has proved its address; RFC 6347 lets us refuse it.
    if fragment_offset != 0 or fragment_length != msg_length:
        raise BadRecord("fragmented ClientHello")
    if RECORD_HEADER_SIZE + HANDSHAKE_HEADER_SIZE + msg_length > body_end:
        raise BadRecord("ClientHello longer than its record")
    version = reader.take(2, "client_version")
    random = reader.take(32, "random")
    session_id = reader.vector(1, "session_id")
    cookie = reader.vector(1, "cookie")
    cipher_suites = reader.vector(2, "cipher_suites")
    compression_methods = reader.vector(1, "compression_methods")
    if not cipher_suites or len(cipher_suites) % 2:
        raise BadRecord("malformed cipher_suites")
    if not compression_methods:
        raise BadRecord("empty compression_methods")
    return ClientHello(
        record_sequence=epoch_seq,
        version=version,
        random=random,
        session_id=session_id,
        cookie=cookie,
        cipher_suites=cipher_suites,
        compression_methods=compression_methods,
    )


class CookieJar:
    """Makes and checks stateless HelloVerifyRequest cookies.

    A cookie is an HMAC-SHA256, under a key made at start-up, of the time slot,
    the peer's address and the ClientHello fields RFC 6347 names. A cookie is
    good for the slot it was made in and the next one, so between
    ``lifetime`` and twice that.
    """

    COOKIE_LENGTH = 32

    def __init__(self, lifetime: float = 30.0, key: bytes | None = None) -> None:
        self._key = key if key is not None else os.urandom(32)
        self._lifetime = lifetime

    def _slot(self) -> int:
        return int(time.monotonic() / self._lifetime)

    def _digest(self, slot: int, address: object, hello: ClientHello) -> bytes:
        message = b"".join(
            (
                struct.pack("!Q", slot),
                repr(address).encode(),
                b"\x00",
                hello.version,
                hello.random,
                bytes((len(hello.session_id),)),
                hello.session_id,
                struct.pack("!H", len(hello.cipher_suites)),
                hello.cipher_suites,
                bytes((len(hello.compression_methods),)),
                hello.compression_methods,
            )
        )
        return hmac.digest(self._key, message, "sha256")

    def make(self, address: object, hello: ClientHello) -> bytes:
        return self._digest(self._slot(), address, hello)

    def check(self, address: object, hello: ClientHello) -> bool:
        if len(hello.cookie) != self.COOKIE_LENGTH:
            return False
        slot = self._slot()
        # '|' rather than 'or': compare both, whichever matches.
        return hmac.compare_digest(
            hello.cookie, self._digest(slot, address, hello)
        ) | hmac.compare_digest(hello.cookie, self._digest(slot - 1, address, hello))


def hello_verify_request(hello: ClientHello, cookie: bytes) -> bytes:
    """The HelloVerifyRequest datagram answering ``hello``.

    RFC 6347 4.2.1: the server_version SHOULD be DTLS 1.0 whatever will be
    negotiated, and the record copies the ClientHello's sequence number.
    """
    body = DTLS_1_0 + bytes((len(cookie),)) + cookie
    handshake = (
        bytes((HANDSHAKE_HELLO_VERIFY_REQUEST,))
        + len(body).to_bytes(3, "big")
        + b"\x00\x00"  # message_seq
        + b"\x00\x00\x00"  # fragment_offset
        + len(body).to_bytes(3, "big")
        + body
    )
    return (
        RECORD_HEADER.pack(CONTENT_HANDSHAKE, DTLS_1_0, hello.record_sequence, len(handshake))
        + handshake
    )
