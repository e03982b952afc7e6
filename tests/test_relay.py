"""Specification of the fault-injecting UDP relay, checked with plain UDP on loopback.

Rates are checked against the relay's seeded decisions, so these tests are
deterministic; the tolerances say how far a correct relay may stray from the
configured probability for that many datagrams, and would also hold unseeded.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import socket
from collections.abc import Callable, Sequence
from typing import Any

import needs
import pytest
import trio
import trio.testing

from trio_dtls_server.testing import _relay
from trio_dtls_server.testing._relay import (
    DirectionStats,
    Faults,
    FaultyRelay,
    RelayEvent,
    open_fault_relay,
)

Address = tuple[str, int]


class UdpServer:
    """A UDP server that records every datagram it receives and can echo it back."""

    def __init__(self, sock: trio.socket.SocketType, *, echo: bool) -> None:
        self.sock = sock
        self.echo = echo
        self.received: list[tuple[bytes, Address]] = []
        self.arrival_times: list[float] = []

    @property
    def address(self) -> Address:
        host, port = self.sock.getsockname()[:2]
        return (host, port)

    @property
    def payloads(self) -> list[bytes]:
        return [data for data, _ in self.received]

    async def serve(self) -> None:
        with self.sock:
            while True:
                data, address = await self.sock.recvfrom(65536)
                self.received.append((data, (address[0], address[1])))
                self.arrival_times.append(trio.current_time())
                if self.echo:
                    await self.sock.sendto(data, address)


async def start_server(nursery: trio.Nursery, host: str = "127.0.0.1", *, echo: bool) -> UdpServer:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    server = UdpServer(sock, echo=echo)
    nursery.start_soon(server.serve)
    return server


async def open_client(host: str = "127.0.0.1") -> trio.socket.SocketType:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = trio.socket.socket(family, socket.SOCK_DGRAM)
    await sock.bind((host, 0))
    return sock


@pytest.fixture
async def sink(nursery: trio.Nursery) -> UdpServer:
    """A server that only records, for tests of the client-to-server direction."""
    return await start_server(nursery, echo=False)


@pytest.fixture
async def echo(nursery: trio.Nursery) -> UdpServer:
    """A server that sends every datagram back to its sender."""
    return await start_server(nursery, echo=True)


async def wait_until(condition: Callable[[], bool], timeout: float = 2.0) -> None:
    with trio.fail_after(timeout):
        while True:
            if condition():
                return
            await trio.sleep(0.001)


async def send_paced(
    client: trio.socket.SocketType,
    relay: FaultyRelay,
    server: UdpServer,
    payloads: Sequence[bytes],
    batch: int = 100,
) -> None:
    """Send ``payloads`` to the server through the relay without overrunning any buffer.

    After each batch, wait until every task is idle, the relay has seen every
    datagram, and the server has received every one the relay delivered, so
    nothing is lost in a kernel buffer and every difference is the relay's doing.
    """
    stats = relay.stats["c2s"]
    for start in range(0, len(payloads), batch):
        chunk = payloads[start : start + batch]
        expected = stats.received + len(chunk)
        for payload in chunk:
            await client.sendto(payload, relay.address)

        def settled(expected: int = expected) -> bool:
            return stats.received == expected and len(server.received) == stats.delivered

        # The relay counts a datagram as received before it has finished
        # sending it on, so the counts alone can agree too early; only an idle
        # relay has nothing left in flight.
        with trio.fail_after(2):
            while True:
                await trio.testing.wait_all_tasks_blocked()
                if settled():
                    break
                await trio.sleep(0.001)


def numbered(count: int, size: int = 32) -> list[bytes]:
    """Datagrams carrying their sequence number in the first four bytes."""
    return [i.to_bytes(4, "big") + bytes(size - 4) for i in range(count)]


def sequence_number(payload: bytes) -> int:
    return int.from_bytes(payload[:4], "big")


async def test_datagrams_pass_unchanged_both_ways_without_faults(echo: UdpServer) -> None:
    async with open_fault_relay(echo.address) as relay:
        with await open_client() as client:
            for payload in (b"", b"x", b"hello" * 100):
                await client.sendto(payload, relay.address)
                with trio.fail_after(2):
                    reply, source = await client.recvfrom(65536)
                assert reply == payload
                assert source[:2] == relay.address
    assert relay.stats == {
        "c2s": DirectionStats(received=3, delivered=3),
        "s2c": DirectionStats(received=3, delivered=3),
    }


async def test_loss_rate_matches_configuration_within_tolerance(sink: UdpServer) -> None:
    n = 2000
    async with open_fault_relay(sink.address, client_to_server=Faults(loss=0.3)) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, numbered(n))
    stats = relay.stats["c2s"]
    # The binomial standard deviation of the drop fraction is
    # sqrt(0.3 * 0.7 / 2000) ~= 0.010, so +-0.04 is 4 sigma.
    assert abs(stats.dropped / n - 0.3) <= 0.04
    assert stats.received == n
    assert stats.dropped + stats.delivered == n
    assert len(sink.received) == stats.delivered
    # Loss never reorders: what arrives is an increasing subsequence.
    arrived = [sequence_number(p) for p in sink.payloads]
    assert arrived == sorted(arrived)


async def test_loss_budget_spares_each_client_after_max_losses(echo: UdpServer) -> None:
    lossy = Faults(loss=1.0, max_losses=3)
    async with open_fault_relay(
        echo.address, client_to_server=lossy, server_to_client=dataclasses.replace(lossy)
    ) as relay:
        with await open_client() as first, await open_client() as second:
            for client in (first, second):
                # Three lost on the way in, then three echoes lost on the way
                # back: the budget is per client and per direction.
                for _ in range(6):
                    await client.sendto(b"ping", relay.address)
                await client.sendto(b"last", relay.address)
                with trio.fail_after(2):
                    assert await client.recv(100) == b"last"
    assert relay.stats["c2s"].dropped == 6 and relay.stats["c2s"].delivered == 8
    assert relay.stats["s2c"].dropped == 6 and relay.stats["s2c"].delivered == 2


async def test_reorder_rate_matches_configuration(sink: UdpServer) -> None:
    n = 2000
    # A long hold, so every held datagram is released by its successor and
    # really does arrive out of order.
    faults = Faults(reorder=0.2, reorder_hold=10.0)
    async with open_fault_relay(sink.address, client_to_server=faults) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, numbered(n))
    stats = relay.stats["c2s"]
    highest = -1
    out_of_order = 0
    for seq in map(sequence_number, sink.payloads):
        if seq < highest:
            out_of_order += 1
        highest = max(highest, seq)
    # Datagrams still held when the relay closed never arrived at all.
    still_held = stats.received - stats.delivered
    assert still_held < 10
    assert out_of_order == stats.reordered - still_held
    # Binomial standard deviation sqrt(0.2 * 0.8 / 2000) ~= 0.009; +-0.04 is over 4 sigma.
    assert abs(out_of_order / n - 0.2) <= 0.04
    # Nothing is lost or duplicated on the way.
    assert sorted(map(sequence_number, sink.payloads)) == list(range(n - still_held))


async def test_reordered_datagram_arrives_after_the_next_one_or_after_reorder_hold(
    sink: UdpServer,
) -> None:
    async with open_fault_relay(sink.address) as relay:
        with await open_client() as client:
            relay.client_to_server.reorder = 1.0
            await client.sendto(b"first", relay.address)
            await wait_until(lambda: relay.stats["c2s"].received == 1)
            relay.client_to_server.reorder = 0.0
            await client.sendto(b"second", relay.address)
            await wait_until(lambda: len(sink.received) == 2)
            assert sink.payloads == [b"second", b"first"]

            # With no successor, a held datagram goes out after reorder_hold.
            relay.client_to_server = Faults(reorder=1.0, reorder_hold=0.05)
            sent_at = trio.current_time()
            await client.sendto(b"alone", relay.address)
            await wait_until(lambda: len(sink.received) == 3)
            assert sink.arrival_times[-1] - sent_at >= 0.05


async def test_duplicate_rate_matches_configuration(sink: UdpServer) -> None:
    n = 1000
    async with open_fault_relay(sink.address, client_to_server=Faults(duplicate=0.25)) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, numbered(n))
    stats = relay.stats["c2s"]
    # Binomial standard deviation sqrt(0.25 * 0.75 / 1000) ~= 0.014; +-0.06 is over 4 sigma.
    assert abs(stats.duplicated / n - 0.25) <= 0.06
    assert len(sink.received) == stats.delivered == n + stats.duplicated
    arrived = [sequence_number(p) for p in sink.payloads]
    # Both copies arrive, back to back.
    assert sorted(set(arrived)) == list(range(n))
    assert arrived == sorted(arrived)
    assert sum(arrived.count(seq) == 2 for seq in range(n)) == stats.duplicated


async def test_corrupt_flips_exactly_one_bit_at_the_configured_rate(sink: UdpServer) -> None:
    n = 1000
    payload_source = random.Random(1)
    sent = [payload_source.randbytes(32) for _ in range(n)]
    async with open_fault_relay(sink.address, client_to_server=Faults(corrupt=0.3)) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, sent)
    assert len(sink.received) == n
    flipped_bits = [
        bin(int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).count("1")
        for a, b in zip(sent, sink.payloads, strict=True)
    ]
    assert set(flipped_bits) == {0, 1}
    assert sum(flipped_bits) == relay.stats["c2s"].corrupted
    # Binomial standard deviation sqrt(0.3 * 0.7 / 1000) ~= 0.014; +-0.06 is over 4 sigma.
    assert abs(sum(flipped_bits) / n - 0.3) <= 0.06


async def test_mtu_clamp_drops_only_datagrams_longer_than_the_mtu(sink: UdpServer) -> None:
    sizes = [1, 99, 100, 101, 1000, 50]
    async with open_fault_relay(sink.address, client_to_server=Faults(mtu=100)) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, [bytes(size) for size in sizes])
    assert [len(p) for p in sink.payloads] == [1, 99, 100, 50]
    assert relay.stats["c2s"].clamped == 2
    assert [e.size for e in relay.events if e.action == "clamp"] == [101, 1000]


async def test_blackhole_drops_one_direction_only(echo: UdpServer) -> None:
    async with open_fault_relay(echo.address, server_to_client=Faults(blackhole=True)) as relay:
        with await open_client() as client:
            for payload in numbered(10):
                await client.sendto(payload, relay.address)
            await wait_until(lambda: relay.stats["s2c"].received == 10)
            with trio.move_on_after(0.1) as waited:
                await client.recvfrom(65536)
            assert waited.cancelled_caught, "a reply got through the blackhole"
    assert len(echo.received) == 10
    assert relay.stats["c2s"].delivered == 10
    assert relay.stats["s2c"] == DirectionStats(received=10, blackholed=10)


async def test_delay_and_jitter_hold_back_every_datagram(echo: UdpServer) -> None:
    async with open_fault_relay(
        echo.address,
        client_to_server=Faults(delay=0.05, jitter=0.05),
        server_to_client=Faults(delay=0.05),
    ) as relay:
        with await open_client() as client:
            for payload in numbered(5):
                sent_at = trio.current_time()
                await client.sendto(payload, relay.address)
                with trio.fail_after(2):
                    reply, _ = await client.recvfrom(65536)
                round_trip = trio.current_time() - sent_at
                assert reply == payload
                assert round_trip >= 0.1
                # Generous upper bound: 0.15 s of configured delay plus scheduling slack.
                assert round_trip < 1.0
    assert [e.action for e in relay.events].count("delay") == 10


async def test_faults_changed_during_a_test_take_effect_for_the_next_datagram(
    sink: UdpServer,
) -> None:
    async with open_fault_relay(sink.address) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, numbered(5))
            assert len(sink.received) == 5

            relay.set_faults(c2s=Faults(blackhole=True))
            await send_paced(client, relay, sink, numbered(5))
            assert len(sink.received) == 5

            relay.client_to_server.blackhole = False
            await send_paced(client, relay, sink, numbered(5))
            assert len(sink.received) == 10

            relay.client_to_server = Faults(mtu=10)
            await send_paced(client, relay, sink, [bytes(20)] * 5)
            assert len(sink.received) == 10
    assert relay.stats["c2s"] == DirectionStats(received=20, delivered=10, blackholed=5, clamped=5)


async def test_set_faults_both_gives_each_direction_its_own_copy(sink: UdpServer) -> None:
    async with open_fault_relay(sink.address) as relay:
        relay.set_faults(both=Faults(loss=0.5))
        assert relay.client_to_server == relay.server_to_client == Faults(loss=0.5)
        relay.client_to_server.loss = 0.0
        assert relay.server_to_client.loss == 0.5
        with pytest.raises(ValueError, match="both"):
            relay.set_faults(both=Faults(), c2s=Faults())


@needs.ipv6
async def test_ipv6_target_is_relayed_over_ipv6(nursery: trio.Nursery) -> None:
    server = await start_server(nursery, "::1", echo=True)
    async with open_fault_relay(server.address) as relay:
        assert relay.address[0] == "::1"
        with await open_client("::1") as client:
            await client.sendto(b"over six", relay.address)
            with trio.fail_after(2):
                reply, _ = await client.recvfrom(65536)
    assert reply == b"over six"
    assert server.received[0][1][0] == "::1"


@pytest.mark.parametrize(
    "target",
    [
        ("192.0.2.1", 4433),
        ("0.0.0.0", 4433),
        ("::", 4433),
        ("2001:db8::1", 4433),
        ("localhost", 4433),
        ("127.0.0.1", 0),
        ("127.0.0.1", 70000),
    ],
)
async def test_targets_other_than_a_loopback_ip_and_port_are_refused(target: Address) -> None:
    with pytest.raises(ValueError, match=r"target|loopback"):
        async with open_fault_relay(target):
            pytest.fail("the relay started")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("loss", 1.5),
        ("duplicate", -0.1),
        ("reorder", float("nan")),
        ("corrupt", 2),
        ("delay", -1.0),
        ("jitter", float("inf")),
        ("reorder_hold", -0.5),
        ("mtu", 0),
        ("max_losses", -1),
    ],
)
def test_invalid_faults_are_refused_naming_the_field(field: str, value: float) -> None:
    kwargs: dict[str, Any] = {field: value}
    with pytest.raises(ValueError, match=field):
        Faults(**kwargs)
    # Tests mutate faults while the relay runs; a bad value must fail right there.
    faults = Faults()
    with pytest.raises(ValueError, match=field):
        setattr(faults, field, value)


async def test_same_seed_makes_same_decisions(nursery: trio.Nursery) -> None:
    faults = Faults(loss=0.2, duplicate=0.2, reorder=0.2, reorder_hold=10.0, corrupt=0.2)
    payloads = [bytes([i % 256]) * (10 + i % 7) for i in range(300)]

    async def run(seed: int) -> tuple[list[tuple[str, str, int]], list[bytes]]:
        server = await start_server(nursery, echo=False)
        async with open_fault_relay(
            server.address, seed=seed, client_to_server=dataclasses.replace(faults)
        ) as relay:
            with await open_client() as client:
                await send_paced(client, relay, server, payloads, batch=50)
        return [(e.direction, e.action, e.size) for e in relay.events], server.payloads

    first = await run(seed=7)
    assert await run(seed=7) == first
    assert await run(seed=8) != first


async def test_each_client_gets_its_own_upstream_port(echo: UdpServer) -> None:
    count = 20
    async with open_fault_relay(echo.address) as relay:
        clients = [await open_client() for _ in range(count)]
        try:
            for i, client in enumerate(clients):
                await client.sendto(b"client %d" % i, relay.address)
            for i, client in enumerate(clients):
                with trio.fail_after(2):
                    reply, _ = await client.recvfrom(65536)
                assert reply == b"client %d" % i
            assert relay.active_peers == count
        finally:
            for client in clients:
                client.close()
    sources = {source for _, source in echo.received}
    assert len(sources) == count
    assert all(host == "127.0.0.1" for host, _ in sources)
    assert relay.address not in sources


async def test_clients_beyond_max_peers_are_dropped(sink: UdpServer) -> None:
    async with open_fault_relay(sink.address, max_peers=2) as relay:
        with await open_client() as a, await open_client() as b, await open_client() as c:
            for client in (a, b, c):
                await client.sendto(b"hi", relay.address)
            await wait_until(lambda: relay.stats["c2s"].received == 3)
            await wait_until(lambda: len(sink.received) == 2)
            assert relay.active_peers == 2
    assert relay.stats["c2s"] == DirectionStats(received=3, delivered=2, dropped=1)


async def test_idle_peer_mapping_is_closed_and_reopened_on_demand(sink: UdpServer) -> None:
    async with open_fault_relay(sink.address, idle_timeout=0.05) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, [b"one"])
            assert relay.active_peers == 1
            await wait_until(lambda: relay.active_peers == 0)
            await send_paced(client, relay, sink, [b"two"])
            assert relay.active_peers == 1
    assert sink.payloads == [b"one", b"two"]


async def test_pending_datagrams_are_bounded(
    sink: UdpServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_relay, "_MAX_PENDING", 5)
    async with open_fault_relay(sink.address, client_to_server=Faults(delay=30.0)) as relay:
        with await open_client() as client:
            await send_paced(client, relay, sink, numbered(10))
    assert relay.stats["c2s"] == DirectionStats(received=10, dropped=5)


async def test_decisions_are_recorded_as_bounded_events_and_logged(
    sink: UdpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="trio_dtls_server.testing.relay")
    async with open_fault_relay(sink.address, max_events=3) as relay:
        with await open_client() as client:
            client_address = client.getsockname()
            relay.client_to_server.loss = 1.0
            await send_paced(client, relay, sink, [b"lost"])
            event = relay.events[-1]
            assert event == RelayEvent(event.time, "c2s", "drop", client_address, 4)
            relay.client_to_server.loss = 0.0
            await send_paced(client, relay, sink, [b"x"] * 5)
    assert len(relay.events) == 3
    assert all(e.action == "pass" for e in relay.events)
    messages = [
        r.getMessage() for r in caplog.records if r.name == "trio_dtls_server.testing.relay"
    ]
    assert sum(" c2s drop " in m for m in messages) == 1
    assert sum(" c2s pass " in m for m in messages) == 5


async def test_leaving_the_block_with_pending_datagrams_does_not_hang(echo: UdpServer) -> None:
    with trio.fail_after(1):
        async with open_fault_relay(
            echo.address, client_to_server=Faults(delay=30.0, reorder=0.5, reorder_hold=30.0)
        ) as relay:
            with await open_client() as client:
                for payload in numbered(20):
                    await client.sendto(payload, relay.address)
                await wait_until(lambda: relay.stats["c2s"].received == 20)
    assert relay.stats["c2s"].delivered == 0


async def test_an_error_in_the_block_propagates_unwrapped(sink: UdpServer) -> None:
    with pytest.raises(KeyError, match="from the test"):
        async with open_fault_relay(sink.address):
            raise KeyError("from the test")
    # A cancellation from outside reaches its own cancel scope as usual.
    with trio.move_on_after(0.01) as scope:
        async with open_fault_relay(sink.address):
            await trio.sleep_forever()
    assert scope.cancelled_caught
