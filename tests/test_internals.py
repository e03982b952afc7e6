"""The private pieces of pyOpenSSL we rely on are still there (see _internals.py)."""

from __future__ import annotations

import pytest
from OpenSSL import SSL

from trio_dtls_server import _internals


def test_private_internals_we_rely_on_are_present() -> None:
    _internals.check_supported()


def test_a_moved_internal_fails_loudly_naming_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if a cryptography upgrade dropped the PSK bindings.
    monkeypatch.setattr(_internals, "_lib", object())
    with pytest.raises(_internals.InternalsMoved, match="SSL_CTX_set_psk_server_callback"):
        _internals.check_supported()


def test_reverse_mapping_finds_the_connection() -> None:
    conn = SSL.Connection(SSL.Context(SSL.DTLS_METHOD), None)
    assert _internals._connection_for(conn._ssl) is conn


def test_fast_path_is_used_unless_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRIO_DTLS_SERVER_FAST_PATH", raising=False)
    decrypt, encrypt, fast = _internals.record_functions()
    assert fast and decrypt is _internals._fast_decrypt
    monkeypatch.setenv("TRIO_DTLS_SERVER_FAST_PATH", "0")
    decrypt, encrypt, fast = _internals.record_functions()
    assert not fast and decrypt is _internals._public_decrypt
    assert encrypt is _internals._public_encrypt
