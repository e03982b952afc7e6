"""Server and client configuration, and the one place they become an OpenSSL context.

Both are dataclasses whose fields document themselves; credentials are loaded
with methods named like the stdlib ``ssl`` module's (``load_cert_chain``,
``load_verify_locations``). Every setting is checked when it is loaded and
again, with the cross-field rules, when the context is built; a bad setting
raises :class:`ConfigError` naming it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, ClassVar, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from OpenSSL import SSL

from . import _internals
from ._errors import ConfigError

logger = logging.getLogger("trio_dtls_server")

# OpenSSL's protocol version number for DTLS 1.2; pyOpenSSL has no constant for it.
DTLS1_2_VERSION = 0xFEFD

#: AEAD suites with ECDHE, for certificate authentication.
CERTIFICATE_CIPHERS = ":".join(
    (
        "ECDHE-ECDSA-AES128-GCM-SHA256",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-AES128-GCM-SHA256",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-RSA-CHACHA20-POLY1305",
    )
)
#: AEAD suites for PSK authentication, forward-secret (ECDHE-PSK) first. AES-CCM
#: is here for constrained devices (CoAP); its 8-byte-tag variant CCM8 is not,
#: add "PSK-AES128-CCM8" to ``ciphers`` for devices that only speak that.
PSK_CIPHERS = ":".join(
    (
        "ECDHE-PSK-CHACHA20-POLY1305",
        "PSK-AES128-GCM-SHA256",
        "PSK-AES256-GCM-SHA384",
        "PSK-CHACHA20-POLY1305",
        "PSK-AES128-CCM",
        "PSK-AES256-CCM",
    )
)
DEFAULT_CIPHERS = CERTIFICATE_CIPHERS + ":" + PSK_CIPHERS

#: The largest PSK OpenSSL accepts (PSK_MAX_PSK_LEN) and the longest identity.
MAX_PSK_LENGTH = 512
MAX_PSK_IDENTITY_LENGTH = 128

_PrivateKey = (
    ec.EllipticCurvePrivateKey
    | rsa.RSAPrivateKey
    | ed25519.Ed25519PrivateKey
    | ed448.Ed448PrivateKey
)


def _check_number(
    setting: str, value: float | None, *, minimum: float, allow_none: bool = False
) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(setting, "must be set")
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ConfigError(setting, f"must be a number, not {value!r}")
    if value < minimum:
        raise ConfigError(setting, f"must be at least {minimum}, not {value!r}")


def _read(setting: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(setting, f"cannot read {os.fspath(path)!r}: {exc.strerror}") from None


def _load_certificates(setting: str, path: str | os.PathLike[str]) -> list[x509.Certificate]:
    data = _read(setting, path)
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise ConfigError(setting, f"{os.fspath(path)!r} holds no PEM certificate") from None
    return certs


def _load_private_key(
    setting: str, path: str | os.PathLike[str], password: bytes | str | None
) -> _PrivateKey:
    data = _read(setting, path)
    if isinstance(password, str):
        password = password.encode()
    try:
        key = serialization.load_pem_private_key(data, password=password)
    except TypeError as exc:  # password missing, or given for an unencrypted key
        raise ConfigError(setting, f"{os.fspath(path)!r}: {exc}") from None
    except ValueError:
        raise ConfigError(
            setting, f"{os.fspath(path)!r} holds no usable PEM private key (or a wrong password)"
        ) from None
    if not isinstance(
        key,
        ec.EllipticCurvePrivateKey
        | rsa.RSAPrivateKey
        | ed25519.Ed25519PrivateKey
        | ed448.Ed448PrivateKey,
    ):
        raise ConfigError(setting, f"{os.fspath(path)!r}: unsupported key type")
    return key


def _public_bytes(key: Any) -> bytes:
    data: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return data


def parse_psk_key(setting: str, key: bytes | str) -> bytes:
    """A PSK given as bytes, or as a hex string (as on the command line)."""
    if isinstance(key, str):
        try:
            key = bytes.fromhex(key)
        except ValueError:
            raise ConfigError(setting, "the key is not valid hex") from None
    if not isinstance(key, bytes):
        raise ConfigError(setting, "the key must be bytes or a hex string")
    if not key:
        raise ConfigError(setting, "the key is empty")
    if len(key) > MAX_PSK_LENGTH:
        raise ConfigError(setting, f"the key is longer than {MAX_PSK_LENGTH} bytes")
    return key


def _check_identity(setting: str, identity: str) -> None:
    if not isinstance(identity, str) or not identity:
        raise ConfigError(setting, "a PSK identity must be a non-empty string")
    if len(identity.encode()) > MAX_PSK_IDENTITY_LENGTH:
        raise ConfigError(
            setting, f"PSK identity {identity!r} is longer than {MAX_PSK_IDENTITY_LENGTH} bytes"
        )


class _KeyLog:
    """Appends NSS key log lines (for Wireshark) to a file, shared by every context."""

    _lock: ClassVar[threading.Lock] = threading.Lock()
    _files: ClassVar[dict[str, IO[bytes]]] = {}

    @classmethod
    def callback(cls, path: str | os.PathLike[str]) -> Callable[[SSL.Connection, bytes], None]:
        key = os.path.abspath(path)
        with cls._lock:
            if key not in cls._files:
                fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
                cls._files[key] = os.fdopen(fd, "ab", buffering=0)
        out = cls._files[key]

        def write(_conn: SSL.Connection, line: bytes) -> None:
            out.write(line + b"\n")

        return write


@dataclass(frozen=True)
class TLSContext:
    """An OpenSSL context plus the callbacks that must live as long as it does."""

    context: SSL.Context
    keepalive: tuple[object, ...] = ()


class _Credentials:
    """Certificate chain, private key and trusted CAs, shared by both configurations."""

    _cert_chain: list[x509.Certificate]
    _private_key: _PrivateKey | None
    _ca_certs: list[x509.Certificate]

    def _credentials_changed(self) -> None:
        """Loaded credentials changed (the client config drops its built context)."""

    def _init_credentials(self) -> None:
        self._cert_chain = []
        self._private_key = None
        self._ca_certs = []

    def load_cert_chain(
        self,
        certfile: str | os.PathLike[str],
        keyfile: str | os.PathLike[str] | None = None,
        password: bytes | str | None = None,
    ) -> None:
        """Load this side's certificate (first in ``certfile``, then its chain) and key.

        ``keyfile`` defaults to ``certfile``. Raises :class:`ConfigError` if a
        file is missing or unreadable, or the key does not match the certificate.
        """
        chain = _load_certificates("certfile", certfile)
        key = _load_private_key("keyfile", keyfile if keyfile is not None else certfile, password)
        if _public_bytes(chain[0].public_key()) != _public_bytes(key.public_key()):
            raise ConfigError(
                "keyfile",
                f"the private key does not match the certificate in {os.fspath(certfile)!r}",
            )
        self._cert_chain = chain
        self._private_key = key
        self._credentials_changed()

    def load_verify_locations(
        self,
        cafile: str | os.PathLike[str] | None = None,
        cadata: bytes | str | None = None,
    ) -> None:
        """Trust the CA certificates in ``cafile`` and/or ``cadata`` (PEM)."""
        if cafile is None and cadata is None:
            raise ConfigError("cafile", "give cafile or cadata")
        if cafile is not None:
            self._ca_certs.extend(_load_certificates("cafile", cafile))
        if cadata is not None:
            data = cadata.encode() if isinstance(cadata, str) else cadata
            try:
                self._ca_certs.extend(x509.load_pem_x509_certificates(data))
            except ValueError:
                raise ConfigError("cadata", "holds no PEM certificate") from None
        self._credentials_changed()

    @property
    def certificate(self) -> x509.Certificate | None:
        """This side's own certificate, once loaded."""
        return self._cert_chain[0] if self._cert_chain else None

    def _new_context(
        self, ciphers: str, keylog_file: str | os.PathLike[str] | None
    ) -> SSL.Context:
        ctx = SSL.Context(SSL.DTLS_METHOD)
        ctx.set_min_proto_version(DTLS1_2_VERSION)
        ctx.set_max_proto_version(DTLS1_2_VERSION)
        # OP_NO_QUERY_MTU: a memory BIO has no MTU to query; we set it ourselves.
        ctx.set_options(
            SSL.OP_NO_QUERY_MTU
            | SSL.OP_NO_RENEGOTIATION
            | SSL.OP_NO_COMPRESSION
            | SSL.OP_CIPHER_SERVER_PREFERENCE
        )
        try:
            ctx.set_cipher_list(ciphers.encode())
        except (SSL.Error, UnicodeEncodeError):
            raise ConfigError("ciphers", f"OpenSSL knows no cipher in {ciphers!r}") from None
        if self._cert_chain and self._private_key is not None:
            ctx.use_certificate(self._cert_chain[0])
            for extra in self._cert_chain[1:]:
                ctx.add_extra_chain_cert(extra)
            ctx.use_privatekey(self._private_key)
        store = ctx.get_cert_store()
        assert store is not None
        for ca in self._ca_certs:
            store.add_cert(_to_openssl_x509(ca))
        if keylog_file is not None:
            try:
                ctx.set_keylog_callback(_KeyLog.callback(keylog_file))
            except OSError as exc:
                raise ConfigError(
                    "keylog_file", f"cannot open {os.fspath(keylog_file)!r}: {exc.strerror}"
                ) from None
        return ctx


def _to_openssl_x509(cert: x509.Certificate) -> Any:
    from OpenSSL import crypto

    return crypto.X509.from_cryptography(cert)


def _record_psk_identity(conn: SSL.Connection, identity: str) -> None:
    # The session sets itself as the connection's app data and offers this hook.
    note = getattr(conn.get_app_data(), "_note_psk_identity", None)
    if note is not None:
        note(identity)


@dataclass
class DTLSServerConfig(_Credentials):
    """How a DTLS server behaves: credentials, client authentication, limits, timeouts.

    Build it like an ``ssl.SSLContext``::

        config = DTLSServerConfig()
        config.load_cert_chain("server.pem", "server.key")
        config.load_verify_locations("ca.pem")      # require client certificates
        # or: config.psk_identities = {"device-1": bytes.fromhex("...")}
        # or: config.client_auth = "none"           # explicit opt-out, logged

    Client authentication is always an explicit choice: with the default
    ``client_auth="required"``, building the server fails unless trusted CAs
    (client certificates are then required) or PSK identities are configured.
    """

    client_auth: Literal["required", "none"] = "required"
    """``"required"``: every client proves who it is, with a certificate signed by a
    CA from :meth:`load_verify_locations` or with a PSK identity. ``"none"``:
    accept unauthenticated clients (a warning is logged when the server starts)."""

    psk_identities: Mapping[str, bytes | str] = field(default_factory=dict)
    """PSK identity -> key (bytes, or a hex string). The key is chosen by the
    identity the client sends; an unknown identity or a wrong key fails the handshake."""

    psk_lookup: Callable[[str], bytes | None] | None = None
    """Instead of, or besides, ``psk_identities``: called with the identity, returns
    the key or None. It runs inside the handshake, so it must be quick and not block."""

    psk_identity_hint: str | None = None
    """Sent to PSK clients in the ServerKeyExchange, for clients that pick their identity by it."""

    ciphers: str = DEFAULT_CIPHERS
    """OpenSSL cipher list. The default is AEAD suites only: ECDHE with certificates,
    ECDHE-PSK and PSK. DTLS 1.2 is the only protocol version."""

    handshake_timeout: float = 10.0
    """Seconds one handshake may take, from the ClientHello with a valid cookie to
    the last Finished. Then the half-open session is dropped (``handshake_timeouts``)."""

    idle_timeout: float = 300.0
    """Seconds an established session may go without receiving a datagram before
    the server ends it (close_notify, reason ``idle timeout``). 0 turns it off."""

    max_sessions: int = 10_000
    """Bound on sessions, handshaking and established together. At the bound, a
    new client takes the place of the least recently active established session if
    that one has been idle for ``evict_idle_after`` seconds; otherwise the newcomer
    is refused (``sessions_refused``) and may retry."""

    max_sessions_per_ip: int | None = None
    """Bound on sessions from one source IP address (None: no bound). At the bound,
    the same eviction rule applies among that address's sessions."""

    evict_idle_after: float = 60.0
    """Seconds of idleness after which a session may be evicted to admit a new one
    when ``max_sessions`` or ``max_sessions_per_ip`` is reached."""

    shutdown_grace: float = 5.0
    """Seconds a handler gets to return once its session has ended (server shutdown,
    idle timeout, eviction, the peer's close_notify); then it is cancelled."""

    max_queued_datagrams: int = 64
    """Datagrams held per session for a handler that is not reading; more are
    dropped and counted (``datagrams_dropped``)."""

    mtu: int | None = None
    """Largest UDP payload to send, in bytes: handshake flights are packed and
    fragmented to fit. None: 1472 on IPv4, 1452 on IPv6 (a 1500-byte Ethernet MTU)."""

    read_lease: float = 0.01
    """When every task waiting for input has just been woken (one busy session,
    say), the first of them back in ``receive()`` reads the socket for everyone,
    so that its own next datagram costs one task switch rather than two. If none
    comes back within this many seconds, the server's receive loop reads again:
    the longest a datagram that no task is waiting for (a new client's hello,
    input for a handler busy elsewhere) can go unread. Tasks waiting in
    ``receive()`` never wait for it. 0: the receive loop reads every datagram
    (as it does whatever this says under ``TRIO_DTLS_SERVER_FAST_PATH=0``).
    At most 1."""

    session_tickets: bool = True
    """Issue session tickets, so returning clients can resume with an abbreviated handshake.
    Not with PSK identities configured: OpenSSL does not call the PSK callback when a
    session resumes, and neither pyOpenSSL nor cryptography's bindings can read the PSK
    identity back, so a resumed PSK session would not know who its peer is (and a
    removed identity would keep working until its ticket expired). PSK handshakes are
    cheap: no certificates, no signatures."""

    keylog_file: str | os.PathLike[str] | None = None
    """Append every session's secrets here in NSS key log format, so Wireshark can
    decrypt a capture. For debugging only: anyone with the file can read the traffic."""

    def __post_init__(self) -> None:
        self._init_credentials()
        self._check_fields()

    def _check_fields(self) -> None:
        if self.client_auth not in ("required", "none"):
            raise ConfigError(
                "client_auth", f"must be 'required' or 'none', not {self.client_auth!r}"
            )
        _check_number("handshake_timeout", self.handshake_timeout, minimum=0.001)
        _check_number("idle_timeout", self.idle_timeout, minimum=0)
        _check_number("max_sessions", self.max_sessions, minimum=1)
        _check_number("max_sessions_per_ip", self.max_sessions_per_ip, minimum=1, allow_none=True)
        _check_number("evict_idle_after", self.evict_idle_after, minimum=0)
        _check_number("shutdown_grace", self.shutdown_grace, minimum=0)
        _check_number("max_queued_datagrams", self.max_queued_datagrams, minimum=1)
        _check_number("mtu", self.mtu, minimum=256, allow_none=True)
        _check_number("read_lease", self.read_lease, minimum=0)
        if self.read_lease > 1:
            raise ConfigError("read_lease", f"must be at most 1 (second), not {self.read_lease!r}")
        for identity, key in self.psk_identities.items():
            _check_identity("psk_identities", identity)
            parse_psk_key(f"psk_identities[{identity!r}]", key)

    def add_psk_identity(self, identity: str, key: bytes | str) -> None:
        """Accept ``identity`` with ``key`` (bytes or a hex string)."""
        _check_identity("psk_identities", identity)
        parsed = parse_psk_key(f"psk_identities[{identity!r}]", key)
        self.psk_identities = {**self.psk_identities, identity: parsed}

    @property
    def uses_psk(self) -> bool:
        return bool(self.psk_identities) or self.psk_lookup is not None

    def validate(self) -> None:
        """Check every setting and how they fit together; raise :class:`ConfigError`."""
        self._check_fields()
        if self.client_auth == "required" and not self._ca_certs and not self.uses_psk:
            raise ConfigError(
                "client_auth",
                "client authentication is required but neither trusted CAs "
                "(load_verify_locations) nor PSK identities are configured; configure "
                "one, or set client_auth='none' to accept unauthenticated clients",
            )
        if self.client_auth == "none" and self._ca_certs:
            raise ConfigError(
                "client_auth", "is 'none' but trusted CAs for client certificates are loaded"
            )
        if not self._cert_chain and not self.uses_psk:
            raise ConfigError(
                "certfile", "the server needs a certificate (load_cert_chain) or PSK identities"
            )

    def build_context(self) -> TLSContext:
        """Validate, then make the OpenSSL context every server connection uses."""
        self.validate()
        # Never anonymous suites. And when PSK is the only way clients prove who
        # they are, no certificate-authenticated suites either: with those, the
        # server would authenticate itself but never ask the client anything.
        ciphers = self.ciphers + ":!aNULL"
        if self.client_auth == "required" and not self._ca_certs:
            ciphers += ":!aRSA:!aECDSA:!aDSS"
        ctx = self._new_context(ciphers, self.keylog_file)
        keepalive: list[object] = []
        if self._ca_certs:
            ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
            for ca in self._ca_certs:
                ctx.add_client_ca(ca)
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        if self.session_tickets and not self.uses_psk:
            # OpenSSL refuses to resume (internal_error) when it verifies peers
            # and no session id context is set. Tickets are encrypted under a
            # key of this context, so another server cannot resume ours anyway.
            ctx.set_session_id(b"trio-dtls-server")
        else:
            ctx.set_options(SSL.OP_NO_TICKET)
        # We check cookies ourselves, statelessly, before OpenSSL sees a peer
        # (see _records.CookieJar); DTLSv1_listen still wants a verifier.
        ctx.set_cookie_verify_callback(lambda _conn, _cookie: True)
        if self.uses_psk:
            keys = {
                identity.encode(): parse_psk_key("psk_identities", key)
                for identity, key in self.psk_identities.items()
            }
            lookup = self.psk_lookup

            def find_key(conn: SSL.Connection, identity: bytes) -> bytes | None:
                key = keys.get(identity)
                if key is None and lookup is not None:
                    try:
                        name = identity.decode()
                    except UnicodeDecodeError:
                        return None
                    found = lookup(name)
                    key = parse_psk_key("psk_lookup", found) if found else None
                if key is not None:
                    _record_psk_identity(conn, identity.decode(errors="replace"))
                return key

            hint = self.psk_identity_hint.encode() if self.psk_identity_hint else None
            keepalive.append(_internals.install_psk_server_callback(ctx, find_key, hint))
        return TLSContext(ctx, tuple(keepalive))


@dataclass
class DTLSClientConfig(_Credentials):
    """How :func:`connect_dtls` connects: whom to trust, how to authenticate, timeouts.

    By default the server's certificate is verified against the CAs loaded with
    :meth:`load_verify_locations` (or the system's if none are), and it must
    name the host connected to (DNS name or IP address).
    """

    verify_server: bool = True
    """Verify the server's certificate chain. False is an explicit opt-out for tests."""

    check_hostname: bool = True
    """Require the server certificate to name the host (or ``server_hostname``)."""

    psk_identity: str | None = None
    """Authenticate with this PSK identity (set with :meth:`set_psk`)."""

    psk_key: bytes | None = None

    ciphers: str | None = None
    """OpenSSL cipher list; None: certificate suites, or PSK suites when a PSK is set."""

    handshake_timeout: float = 10.0
    """Seconds the whole handshake may take before :class:`HandshakeTimeout`."""

    max_queued_datagrams: int = 64
    """Datagrams held for a reader that is behind; more are dropped."""

    mtu: int | None = None
    """Largest UDP payload to send; None: 1472 on IPv4, 1452 on IPv6."""

    keylog_file: str | os.PathLike[str] | None = None
    """Append session secrets in NSS key log format (debugging only)."""

    def __post_init__(self) -> None:
        self._init_credentials()
        self._check_fields()

    def _check_fields(self) -> None:
        _check_number("handshake_timeout", self.handshake_timeout, minimum=0.001)
        _check_number("max_queued_datagrams", self.max_queued_datagrams, minimum=1)
        _check_number("mtu", self.mtu, minimum=256, allow_none=True)
        if (self.psk_identity is None) != (self.psk_key is None):
            raise ConfigError("psk_identity", "set both the PSK identity and its key")
        if self.psk_identity is not None:
            _check_identity("psk_identity", self.psk_identity)
            assert self.psk_key is not None
            parse_psk_key("psk_key", self.psk_key)

    def set_psk(self, identity: str, key: bytes | str) -> None:
        """Authenticate with ``identity`` and ``key`` (bytes or a hex string)."""
        _check_identity("psk_identity", identity)
        self.psk_key = parse_psk_key("psk_key", key)
        self.psk_identity = identity

    def validate(self) -> None:
        self._check_fields()

    def __setattr__(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)
        if not name.startswith("_"):
            object.__setattr__(self, "_built", None)  # a setting changed: rebuild

    def _credentials_changed(self) -> None:
        object.__setattr__(self, "_built", None)

    def build_context(self) -> TLSContext:
        """Validate, then make the OpenSSL context for this configuration.

        The context is built once and reused until a setting changes: sessions
        can only be resumed with the context that made them, and nothing
        changes a context after building it (pyOpenSSL 26.2 forbids that once
        it has made a connection).
        """
        built: TLSContext | None = getattr(self, "_built", None)
        if built is None:
            built = self._build_context()
            object.__setattr__(self, "_built", built)
        return built

    def _build_context(self) -> TLSContext:
        self.validate()
        ciphers = self.ciphers
        if ciphers is None:
            ciphers = PSK_CIPHERS if self.psk_identity is not None else CERTIFICATE_CIPHERS
        ctx = self._new_context(ciphers, self.keylog_file)
        keepalive: list[object] = []
        if self.verify_server:
            ctx.set_verify(SSL.VERIFY_PEER)
            if not self._ca_certs:
                ctx.set_default_verify_paths()
        else:
            ctx.set_verify(SSL.VERIFY_NONE)
        if self.psk_identity is not None and self.psk_key is not None:
            answer = (self.psk_identity.encode(), self.psk_key)
            keepalive.append(
                _internals.install_psk_client_callback(ctx, lambda _conn, _hint: answer)
            )
        return TLSContext(ctx, tuple(keepalive))
