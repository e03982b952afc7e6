"""A pytest-trio harness for testing DTLS programs: PKI, fault relay, waits, fixtures.

The fixtures (``dtls_pki``, ``dtls_server``, ``dtls_client``, ``fault_relay``)
come from the pytest plugin in :mod:`._plugin`, registered automatically when
the package is installed with its ``testing`` extra. The pieces below work
without pytest too. See docs/testing.md.
"""

from ._harness import (
    RawHandshake,
    TestPKI,
    abandon,
    cookie_of,
    drain_bio,
    drain_socket,
    echo_handler,
    exchange,
    local_address,
    send_raw,
    splice_cookie,
    wait_for_stats,
    wait_until,
)
from ._relay import DirectionStats, Faults, FaultyRelay, RelayEvent, open_fault_relay

__all__ = [
    "DirectionStats",
    "Faults",
    "FaultyRelay",
    "RawHandshake",
    "RelayEvent",
    "TestPKI",
    "abandon",
    "cookie_of",
    "drain_bio",
    "drain_socket",
    "echo_handler",
    "exchange",
    "local_address",
    "open_fault_relay",
    "send_raw",
    "splice_cookie",
    "wait_for_stats",
    "wait_until",
]
