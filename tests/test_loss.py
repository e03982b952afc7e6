"""Handshakes and data through a lossy, reordering, duplicating relay on loopback."""

from __future__ import annotations

from functools import partial

import pytest
import trio

from trio_dtls_server import HandshakeTimeout, connect_dtls
from trio_dtls_server.testing import Faults, TestPKI, wait_for_stats
from trio_dtls_server.testing._plugin import RelayFactory, ServerFactory


async def _echo_through(
    address: tuple[str, int], pki: TestPKI, payloads: int, *, timeout: float
) -> int:
    """Handshake, then send payloads until each has come back once; count retries."""
    session = await connect_dtls(*address, pki.client_config(handshake_timeout=timeout))
    sends = 0
    try:
        for i in range(payloads):
            message = b"message %d" % i
            while True:  # UDP: the application retries, DTLS does not
                sends += 1
                await session.send(message)
                with trio.move_on_after(0.3):
                    while await session.receive() != message:
                        pass  # a late duplicate of an earlier reply
                    break
    finally:
        await session.aclose()
    return sends


async def test_handshakes_and_echoes_complete_through_30_percent_loss_with_reordering(
    dtls_pki: TestPKI, dtls_server: ServerFactory, fault_relay: RelayFactory
) -> None:
    server = await dtls_server(handshake_timeout=30)
    # Two losses per client each way: at most 2**4 - 1 = 15 s in retransmission
    # timers, half the timeout.  Unbounded, 30% loss took over 30 s in 9 runs of
    # 52, so the test would fail on bad luck rather than on a fault of ours.
    faults = Faults(loss=0.3, max_losses=2, reorder=0.2, duplicate=0.1, jitter=0.01)
    relay = await fault_relay(server, seed=7, client_to_server=faults, server_to_client=faults)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(
                    partial(_echo_through, relay.address, dtls_pki, 5, timeout=30.0)
                )
    stats = await wait_for_stats(server, handshakes_completed=4, handshake_timeouts=0)
    assert stats.handler_errors == 0
    dropped = relay.stats["c2s"].dropped + relay.stats["s2c"].dropped
    assert dropped > 0 and relay.stats["c2s"].reordered > 0 and relay.stats["s2c"].duplicated > 0


async def test_flight_arriving_after_the_retransmission_timer_still_completes(
    dtls_pki: TestPKI, dtls_server: ServerFactory, fault_relay: RelayFactory
) -> None:
    # The client's answers reach the server after OpenSSL's 1 s retransmission
    # timer has fired; bare trio loses the final flight in exactly this case.
    server = await dtls_server(handshake_timeout=20)
    relay = await fault_relay(server, client_to_server=Faults(delay=1.3))
    with trio.fail_after(20):
        sends = await _echo_through(relay.address, dtls_pki, 1, timeout=20)
    assert sends >= 1
    await wait_for_stats(server, handshakes_completed=1, handshake_timeouts=0)


async def test_small_mtu_fragments_the_handshake(
    dtls_pki: TestPKI, dtls_server: ServerFactory, fault_relay: RelayFactory
) -> None:
    server = await dtls_server(mtu=300)
    relay = await fault_relay(server, server_to_client=Faults(mtu=300))
    config = dtls_pki.client_config(mtu=300, handshake_timeout=10)
    session = await connect_dtls(*relay.address, config)
    try:
        await session.send(b"small world")
        with trio.fail_after(5):
            assert await session.receive() == b"small world"
    finally:
        await session.aclose()
    assert relay.stats["s2c"].clamped == 0  # every datagram fitted


async def test_blackholed_direction_ends_in_handshake_timeout_not_a_hang(
    dtls_pki: TestPKI, dtls_server: ServerFactory, fault_relay: RelayFactory
) -> None:
    server = await dtls_server(handshake_timeout=0.5)
    relay = await fault_relay(server)
    # Let the cookie exchange and the ClientHello through, then cut replies.
    relay.set_faults(s2c=Faults(blackhole=True))
    start = trio.current_time()
    with pytest.raises(HandshakeTimeout):
        await connect_dtls(*relay.address, dtls_pki.client_config(handshake_timeout=1.0))
    assert trio.current_time() - start < 3
    assert server.stats().handshakes_completed == 0
