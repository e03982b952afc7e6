"""The wire format we parse before OpenSSL: total on bad input, cookies as RFC 6347 says."""

from __future__ import annotations

import contextlib
import dataclasses

from hypothesis import given
from hypothesis import strategies as st
from OpenSSL import SSL

from trio_dtls_server._records import (
    BadRecord,
    ClientHello,
    CookieJar,
    hello_verify_request,
    iter_records,
    looks_like_client_hello,
    pack_datagrams,
    parse_client_hello,
)
from trio_dtls_server.testing import TestPKI


def _client_hello(pki: TestPKI) -> bytes:
    conn = SSL.Connection(pki.client_config().build_context().context, None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1400)  # OpenSSL's DTLS needs an MTU with a memory BIO
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return conn.bio_read(65535)


def test_real_client_hello_parses(dtls_pki: TestPKI) -> None:
    datagram = _client_hello(dtls_pki)
    assert looks_like_client_hello(datagram)
    hello = parse_client_hello(datagram)
    assert hello.cookie == b"" and len(hello.random) == 32 and hello.cipher_suites


@given(st.binary(max_size=400))
def test_parser_raises_only_bad_record_on_garbage(data: bytes) -> None:
    with contextlib.suppress(BadRecord):
        parse_client_hello(data)
    looks_like_client_hello(data)
    with contextlib.suppress(BadRecord):
        list(iter_records(data))


@given(st.data())
def test_parser_survives_mutated_client_hellos(data: st.DataObject) -> None:
    base = bytearray(_HELLO)
    for _ in range(data.draw(st.integers(1, 8))):
        index = data.draw(st.integers(0, len(base) - 1))
        base[index] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(base)))
    with contextlib.suppress(BadRecord):
        parse_client_hello(bytes(base[:cut]))


_HELLO = (
    b"\x16\xfe\xfd"
    + b"\x00" * 8
    + b"\x00\x3b"  # record header, 59 bytes
    + b"\x01\x00\x00\x2f\x00\x00\x00\x00\x00\x00\x00\x2f"  # handshake header, 47 bytes
    + b"\xfe\xfd"
    + b"R" * 32
    + b"\x00"
    + b"\x00"
    + b"\x00\x02\xc0\x2b"
    + b"\x01\x00"
    + b"\x00\x04\x00\x17\x00\x00"  # an extension
)


def test_cookie_covers_rfc_fields_but_not_extensions() -> None:
    jar = CookieJar()
    hello = parse_client_hello(_HELLO)
    cookie = jar.make(("127.0.0.1", 5000), hello)
    second = dataclasses.replace(hello, cookie=cookie)
    assert jar.check(("127.0.0.1", 5000), second)
    # Extensions are not part of ClientHello here: a client that adds padding
    # in its second hello (Qt's example client does) still passes.
    assert not jar.check(("127.0.0.1", 5001), second)
    changes: list[tuple[str, bytes]] = [
        ("random", b"X" * 32),
        ("session_id", b"\x01"),
        ("cipher_suites", b"\xc0\x2c"),
        ("compression_methods", b"\x01"),
        ("version", b"\xfe\xff"),
    ]
    for field, value in changes:
        changed = dataclasses.replace(second, **{field: value})  # type: ignore[arg-type]
        assert not jar.check(("127.0.0.1", 5000), changed)


def test_hello_verify_request_is_smaller_than_the_hello() -> None:
    hello: ClientHello = parse_client_hello(_HELLO)
    reply = hello_verify_request(hello, CookieJar().make(("::1", 1, 0, 0), hello))
    assert reply[0] == 22 and reply[13] == 3
    assert len(reply) <= len(_HELLO)


def test_pack_datagrams_never_splits_a_record() -> None:
    records = [
        bytes([23]) + b"\xfe\xfd" + b"\x00" * 8 + n.to_bytes(2, "big") + b"x" * n
        for n in (10, 500, 900, 1400, 5)
    ]
    packed = pack_datagrams(records, 1000)
    assert b"".join(packed) == b"".join(records)
    assert all(len(d) <= 1000 or len(list(iter_records(d))) == 1 for d in packed)
