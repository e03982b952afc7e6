"""The one door to private internals of pyOpenSSL.

pyOpenSSL has no API for PSK and none for hostname checks on a memory-BIO
connection, but the OpenSSL calls are in ``cryptography``'s bindings. Reaching
them needs three private names of pyOpenSSL, each used only here:

- ``Context._context``: the ``SSL_CTX *`` to install the PSK callbacks on;
- ``Connection._ssl``: the ``SSL *`` whose verify parameters get the host name;
- ``Connection._reverse_mapping``: pyOpenSSL's own ``SSL *`` -> ``Connection``
  map, which its callbacks use too, to find our session from a PSK callback;
- ``Connection._into_ssl``/``_from_ssl`` (the memory BIOs) and
  ``Connection._raise_ssl_error``: the per-datagram fast path below encrypts
  and decrypts with direct OpenSSL calls into one reused buffer, where
  pyOpenSSL allocates a new 16-64 KiB buffer on every call. It raises exactly
  the exceptions pyOpenSSL's own ``read``/``write`` would. If these names
  move, or ``TRIO_DTLS_SERVER_FAST_PATH=0`` is set, the public calls are used
  instead (``record_functions``); the test suite runs on both. The same
  setting also turns off the server's socket handoff (see _reader.py), so that
  the second run covers the plain path whole.

The library needs nothing private from trio: the session engine uses trio's
public socket and ``trio.lowlevel`` APIs only.

:func:`check_supported` verifies that these names still exist;
``tests/test_internals.py`` calls it, so an upgrade that moves them fails
loudly there rather than in a handshake. The versions this is known to work
with are pinned in ``pyproject.toml``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import threading
from collections.abc import Callable
from typing import Any

from cryptography.hazmat.bindings.openssl.binding import Binding
from OpenSSL import SSL

_ffi: Any = Binding.ffi
_lib: Any = Binding.lib

logger = logging.getLogger("trio_dtls_server")

#: OpenSSL's X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS
_NO_PARTIAL_WILDCARDS = 0x4

#: Given the connection and the identity the client sent, return its key or None.
PskServerLookup = Callable[[SSL.Connection, bytes], bytes | None]
#: Given the connection and the server's hint, return (identity, key).
PskClientChooser = Callable[[SSL.Connection, bytes], tuple[bytes, bytes]]


class InternalsMoved(RuntimeError):
    """A private attribute this library relies on is gone (see :func:`check_supported`)."""


def check_supported() -> None:
    """Raise :class:`InternalsMoved` naming whatever private piece is missing."""
    missing = []
    ctx = SSL.Context(SSL.DTLS_METHOD)
    if not hasattr(ctx, "_context"):
        missing.append("OpenSSL.SSL.Context._context")
    conn = SSL.Connection(ctx, None)
    if not hasattr(conn, "_ssl"):
        missing.append("OpenSSL.SSL.Connection._ssl")
    reverse = getattr(SSL.Connection, "_reverse_mapping", None)
    if reverse is None or reverse.get(getattr(conn, "_ssl", None)) is not conn:
        missing.append("OpenSSL.SSL.Connection._reverse_mapping")
    for name in (
        "SSL_CTX_set_psk_server_callback",
        "SSL_CTX_set_psk_client_callback",
        "SSL_CTX_use_psk_identity_hint",
        "SSL_get0_param",
        "X509_VERIFY_PARAM_set1_host",
        "X509_VERIFY_PARAM_set1_ip",
        "X509_VERIFY_PARAM_set_hostflags",
        "SSL_session_reused",
    ):
        if not hasattr(_lib, name):
            missing.append(f"cryptography binding lib.{name}")
    if missing:
        raise InternalsMoved(
            "trio_dtls_server relies on private pieces that this pyOpenSSL/cryptography "
            "no longer has: " + ", ".join(missing) + "; see pyproject.toml for the "
            "supported versions"
        )


Decrypt = Callable[[SSL.Connection, bytes], bytes]
Encrypt = Callable[[SSL.Connection, bytes], bytes]

#: Plaintext of one record is at most 2**14 bytes; ciphertext adds at most 2048.
_SCRATCH_SIZE = 2**14 + 2048 + 64
# One buffer serves every connection: each use is synchronous (no await
# between the OpenSSL call and copying the result out), and trio runs one
# task at a time. Another thread gets its own via _scratch().
_scratch_by_thread = threading.local()


def _scratch() -> Any:
    buf = getattr(_scratch_by_thread, "buf", None)
    if buf is None:
        buf = _scratch_by_thread.buf = _ffi.new("char[]", _SCRATCH_SIZE)
    return buf


# Both take ``bytes`` only (which cffi passes to C as a pointer to its buffer,
# without the copy or the context manager ffi.from_buffer would cost).


def _fast_decrypt(conn: SSL.Connection, datagram: bytes) -> bytes:
    """Feed one datagram and return the plaintext of its first record."""
    if _lib.BIO_write(conn._into_ssl, datagram, len(datagram)) <= 0:
        raise SSL.Error([("memory BIO", "", "write failed")])
    buf = _scratch()
    n = _lib.SSL_read(conn._ssl, buf, _SCRATCH_SIZE)
    if n <= 0:
        conn._raise_ssl_error(conn._ssl, n)  # WantReadError, ZeroReturnError, Error
    return _ffi.unpack(buf, n)  # type: ignore[no-any-return]


def _fast_encrypt(conn: SSL.Connection, plaintext: bytes) -> bytes:
    """Encrypt one record and return its ciphertext (the datagram to send)."""
    n = _lib.SSL_write(conn._ssl, plaintext, len(plaintext))
    if n <= 0:
        conn._raise_ssl_error(conn._ssl, n)
    buf = _scratch()
    n = _lib.BIO_read(conn._from_ssl, buf, _SCRATCH_SIZE)
    if n <= 0:  # pragma: no cover - SSL_write always leaves a record behind
        raise SSL.Error([("memory BIO", "", "no record after SSL_write")])
    return _ffi.unpack(buf, n)  # type: ignore[no-any-return]


def _public_decrypt(conn: SSL.Connection, datagram: bytes) -> bytes:
    conn.bio_write(datagram)
    return conn.read(_SCRATCH_SIZE)


def _public_encrypt(conn: SSL.Connection, plaintext: bytes) -> bytes:
    conn.write(plaintext)
    return conn.bio_read(_SCRATCH_SIZE)


def fast_path_available() -> bool:
    """Whether the private pieces the fast path uses are where we expect them."""
    conn = SSL.Connection(SSL.Context(SSL.DTLS_METHOD), None)
    return all(
        hasattr(conn, name) for name in ("_ssl", "_into_ssl", "_from_ssl", "_raise_ssl_error")
    ) and all(hasattr(_lib, name) for name in ("SSL_read", "SSL_write", "BIO_read", "BIO_write"))


def plain_path_requested() -> bool:
    """``TRIO_DTLS_SERVER_FAST_PATH=0``: the plain per-datagram path, for comparison.

    The public pyOpenSSL record calls (``record_functions``), and the server's
    receive loop reading every datagram (no ``read_lease`` handoff).
    """
    return os.environ.get("TRIO_DTLS_SERVER_FAST_PATH", "1") == "0"


def record_functions() -> tuple[Decrypt, Encrypt, bool]:
    """``(decrypt, encrypt, fast)``: the per-datagram record functions to use.

    ``TRIO_DTLS_SERVER_FAST_PATH=0`` in the environment selects the public
    pyOpenSSL calls even when the fast path is available.
    """
    if not plain_path_requested() and fast_path_available():
        return _fast_decrypt, _fast_encrypt, True
    return _public_decrypt, _public_encrypt, False


def session_reused(conn: SSL.Connection) -> bool:
    """Whether the handshake resumed a session (pyOpenSSL does not say)."""
    return bool(_lib.SSL_session_reused(conn._ssl))


def _connection_for(ssl: Any) -> SSL.Connection | None:
    # pyOpenSSL registers every Connection here under its SSL*; its own
    # callbacks (verify, ALPN, cookies) find their Connection the same way.
    conn: SSL.Connection | None = SSL.Connection._reverse_mapping.get(ssl)
    return conn


def install_psk_server_callback(
    ctx: SSL.Context, lookup: PskServerLookup, hint: bytes | None
) -> object:
    """Make ``ctx`` accept PSK handshakes, asking ``lookup`` for each identity's key.

    Returns the cffi callback, which the caller must keep alive as long as the
    context lives.
    """

    @_ffi.callback("unsigned int(SSL *, const char *, unsigned char *, unsigned int)")  # type: ignore[untyped-decorator]
    def callback(ssl: Any, identity: Any, psk: Any, max_psk_len: int) -> int:
        # An exception must not cross into OpenSSL: refuse the key instead,
        # which fails this one handshake with an alert.
        try:
            conn = _connection_for(ssl)
            if conn is None or identity == _ffi.NULL:
                return 0
            key = lookup(conn, _ffi.string(identity))
            if not key or len(key) > max_psk_len:
                return 0
            _ffi.memmove(psk, key, len(key))
            return len(key)
        except Exception:
            logger.exception("PSK identity lookup failed")
            return 0

    _lib.SSL_CTX_set_psk_server_callback(ctx._context, callback)
    if hint is not None and not _lib.SSL_CTX_use_psk_identity_hint(ctx._context, hint):
        raise ValueError("OpenSSL refused the PSK identity hint")
    return callback


def install_psk_client_callback(ctx: SSL.Context, choose: PskClientChooser) -> object:
    """Make ``ctx`` offer a PSK identity chosen by ``choose``; keep the result alive."""

    @_ffi.callback(  # type: ignore[untyped-decorator]
        "unsigned int(SSL *, const char *, char *, unsigned int, unsigned char *, unsigned int)"
    )
    def callback(
        ssl: Any,
        hint: Any,
        identity_out: Any,
        max_identity_len: int,
        psk_out: Any,
        max_psk_len: int,
    ) -> int:
        try:
            conn = _connection_for(ssl)
            if conn is None:
                return 0
            hint_bytes = b"" if hint == _ffi.NULL else _ffi.string(hint)
            identity, key = choose(conn, hint_bytes)
            # max_identity_len leaves no room for the NUL terminator we must write.
            if len(identity) >= max_identity_len or not key or len(key) > max_psk_len:
                return 0
            _ffi.memmove(identity_out, identity + b"\x00", len(identity) + 1)
            _ffi.memmove(psk_out, key, len(key))
            return len(key)
        except Exception:
            logger.exception("PSK client callback failed")
            return 0

    _lib.SSL_CTX_set_psk_client_callback(ctx._context, callback)
    return callback


def require_peer_host(conn: SSL.Connection, host: str) -> None:
    """Make the handshake fail unless the peer's certificate names ``host``.

    An IP literal is matched against the certificate's IP address SANs, a name
    against its DNS SANs (no partial wildcards).
    """
    param = _lib.SSL_get0_param(conn._ssl)
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        name = host.encode("idna")
        _lib.X509_VERIFY_PARAM_set_hostflags(param, _NO_PARTIAL_WILDCARDS)
        ok = _lib.X509_VERIFY_PARAM_set1_host(param, name, len(name))
    else:
        packed = ip.packed
        ok = _lib.X509_VERIFY_PARAM_set1_ip(param, packed, len(packed))
    if ok != 1:
        raise ValueError(f"OpenSSL refused the host name to verify: {host!r}")
