"""Configuration: validated when built, errors name the setting, secure defaults."""

from __future__ import annotations

from pathlib import Path

import pytest
from OpenSSL import SSL

from trio_dtls_server import (
    ConfigError,
    DTLSClientConfig,
    DTLSServerConfig,
    HandshakeError,
    connect_dtls,
)
from trio_dtls_server.testing import TestPKI
from trio_dtls_server.testing._plugin import ServerFactory


def test_missing_certificate_file_names_the_setting(tmp_path: Path) -> None:
    config = DTLSServerConfig()
    with pytest.raises(ConfigError, match="certfile") as info:
        config.load_cert_chain(tmp_path / "nope.pem", tmp_path / "nope.key")
    assert info.value.setting == "certfile"


def test_key_that_does_not_match_the_certificate_is_refused(dtls_pki: TestPKI) -> None:
    config = DTLSServerConfig()
    with pytest.raises(ConfigError, match="does not match") as info:
        config.load_cert_chain(dtls_pki.files.server_cert, dtls_pki.untrusted.server_key)
    assert info.value.setting == "keyfile"


def test_file_that_is_not_pem_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="cafile"):
        DTLSServerConfig().load_verify_locations(junk)


@pytest.mark.parametrize(
    ("settings", "setting"),
    [
        ({"handshake_timeout": 0}, "handshake_timeout"),
        ({"handshake_timeout": float("nan")}, "handshake_timeout"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"max_sessions": 0}, "max_sessions"),
        ({"max_sessions_per_ip": 0}, "max_sessions_per_ip"),
        ({"shutdown_grace": -0.1}, "shutdown_grace"),
        ({"max_queued_datagrams": 0}, "max_queued_datagrams"),
        ({"mtu": 100}, "mtu"),
        ({"read_lease": -0.1}, "read_lease"),
        ({"read_lease": 2}, "read_lease"),
        ({"client_auth": "maybe"}, "client_auth"),
        ({"psk_identities": {"x": "not hex"}}, "psk_identities['x']"),
        ({"psk_identities": {"x": ""}}, "psk_identities['x']"),
        ({"psk_identities": {"": "00"}}, "psk_identities"),
    ],
)
def test_bad_setting_raises_naming_it(settings: dict[str, object], setting: str) -> None:
    with pytest.raises(ConfigError) as info:
        DTLSServerConfig(**settings)  # type: ignore[arg-type]
    assert info.value.setting == setting
    assert str(info.value).startswith(setting)


def test_client_authentication_is_an_explicit_choice(dtls_pki: TestPKI) -> None:
    config = DTLSServerConfig()
    config.load_cert_chain(dtls_pki.files.server_cert, dtls_pki.files.server_key)
    with pytest.raises(ConfigError, match="client_auth='none'") as info:
        config.build_context()
    assert info.value.setting == "client_auth"
    config.client_auth = "none"
    config.build_context()  # explicit opt-out works (serve_dtls logs a warning)
    config.client_auth = "required"
    config.add_psk_identity("device", "00112233")
    config.build_context()


def test_bad_cipher_list_names_ciphers(dtls_pki: TestPKI) -> None:
    config = dtls_pki.server_config(ciphers="NOT-A-CIPHER")
    with pytest.raises(ConfigError, match="ciphers"):
        config.build_context()


def test_defaults_are_dtls12_aead_only_without_renegotiation(dtls_pki: TestPKI) -> None:
    ctx = dtls_pki.server_config().build_context().context
    # OpenSSL also lists its TLS 1.3 suites (TLS_...); DTLS 1.2 never negotiates them.
    suites = [s for s in SSL.Connection(ctx, None).get_cipher_list() if not s.startswith("TLS_")]
    assert suites
    for suite in suites:
        assert any(aead in suite for aead in ("GCM", "CHACHA20", "CCM")), suite
        assert "ECDHE" in suite or "PSK" in suite, suite
    fresh = dtls_pki.server_config().build_context().context
    options = fresh.set_options(0)  # returns the options in force
    assert options & SSL.OP_NO_RENEGOTIATION
    assert options & SSL.OP_NO_COMPRESSION


async def test_dtls_1_0_client_is_refused(dtls_pki: TestPKI, dtls_server: ServerFactory) -> None:
    server = await dtls_server(handshake_timeout=1)
    config = dtls_pki.client_config(handshake_timeout=2, ciphers="ALL")
    tls = config.build_context()
    tls.context.set_max_proto_version(0xFEFF)  # DTLS 1.0
    config.build_context = lambda: tls  # type: ignore[method-assign]
    with pytest.raises(HandshakeError):
        await connect_dtls(*server.address, config)


def test_client_psk_needs_identity_and_key() -> None:
    with pytest.raises(ConfigError, match="psk_identity"):
        DTLSClientConfig(psk_identity="x")
    config = DTLSClientConfig()
    with pytest.raises(ConfigError, match="hex"):
        config.set_psk("x", "zz")
