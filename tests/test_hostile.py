"""Hostile peers: floods, half-open and abandoned sessions, storms, early and late data.

After each attack a legitimate client is served promptly (an echo within ``PROMPT``
seconds) and the server is alive. Every flood is bounded in count and time and
comes from loopback addresses only (127.0.0.0/8 and ::1).

Resource use is measured, not assumed: during each flood a :class:`Gauge` samples
this process's resident set (the server runs in the test process, so the growth
is an upper bound on the server's, attackers included) and the server's session
table, asserts them against the configured bounds and prints the figures (run
``pytest -s tests/test_hostile.py`` to see them).

The tests of ``tests/test_server.py`` cover one of each of these at small scale;
these are the same rules under load, plus the inputs only an attacker sends.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import resource
import socket
import sys
import time
from collections.abc import Iterator
from functools import partial

import needs
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from trio_dtls_server import (
    CloseReason,
    DTLSClientConfig,
    DTLSServer,
    DTLSServerConfig,
    DTLSSession,
    connect_dtls,
    serve_dtls,
)
from trio_dtls_server._records import BadRecord, parse_client_hello
from trio_dtls_server.testing import (
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

#: How soon a legitimate client must be served after an attack, in seconds.
PROMPT = 2.0
MIB = 1024 * 1024

# -- wire helpers ------------------------------------------------------------------

#: Record header (13) + handshake header (12) + client_version (2): where random starts.
_RANDOM_AT = 13 + 12 + 2
_SESSION_ID_AT = _RANDOM_AT + 32


def _first_client_hello(config: DTLSClientConfig) -> bytes:
    conn = SSL.Connection(config.build_context().context, None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1400)
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    return drain_bio(conn)


#: A real ClientHello (no cookie), the template of every mutated one.
HELLO = _first_client_hello(DTLSClientConfig(verify_server=False))


def _extensions_offset(hello: bytes) -> int:
    """Where a ClientHello's extensions start: the cookie covers nothing from there on."""
    offset = _SESSION_ID_AT
    offset += 1 + hello[offset]  # session_id
    offset += 1 + hello[offset]  # cookie
    offset += 2 + int.from_bytes(hello[offset : offset + 2], "big")  # cipher_suites
    offset += 1 + hello[offset]  # compression_methods
    return offset


def parses(datagram: bytes) -> bool:
    try:
        parse_client_hello(datagram)
    except BadRecord:
        return False
    return True


def record(
    content_type: int, epoch: int, sequence: int, body: bytes, length_error: int = 0
) -> bytes:
    """A DTLS 1.2 record; ``length_error`` makes its length field lie."""
    length = max(0, min(0xFFFF, len(body) + length_error))
    return (
        bytes((content_type,))
        + b"\xfe\xfd"
        + epoch.to_bytes(2, "big")
        + sequence.to_bytes(6, "big")
        + length.to_bytes(2, "big")
        + body
    )


def mutate_hello(rng: random.Random, *, keep_cookie_fields: bool) -> bytes:
    """A mutated copy of :data:`HELLO` with a fresh random.

    With ``keep_cookie_fields``, only bytes past the fields the cookie covers
    change (so a cookie for it can be had), and the result still parses.
    """
    out = bytearray(HELLO)
    out[_RANDOM_AT:_SESSION_ID_AT] = rng.randbytes(32)
    start = _extensions_offset(HELLO) if keep_cookie_fields else 0
    for _ in range(rng.randint(1, 8)):
        out[rng.randrange(start, len(out))] = rng.randrange(256)
    if not keep_cookie_fields and rng.random() < 0.3:
        del out[rng.randrange(len(out)) :]
    return bytes(out)


@contextlib.contextmanager
def stranger_sockets(hosts: list[str]) -> Iterator[list[socket.socket]]:
    """Non-blocking UDP sockets bound to loopback addresses, one per host given."""
    socks: list[socket.socket] = []
    try:
        for host in hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            socks.append(sock)
            sock.bind((host, 0))
            sock.setblocking(False)
        yield socks
    finally:
        for sock in socks:
            sock.close()


# -- measuring -------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (VmRSS, VmHWM), or None off Linux."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_bytes() -> int:
    kib = _status_kib("VmRSS")
    if kib is None:  # pragma: no cover - not Linux: the high-water mark is what there is
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024
    return kib * 1024


def hwm_bytes() -> int:
    kib = _status_kib("VmHWM")
    if kib is None:  # pragma: no cover
        return rss_bytes()
    return kib * 1024


@dataclasses.dataclass
class Gauge:
    """Samples RSS and the session table while a flood runs (every 5 ms, and on demand)."""

    server: DTLSServer
    label: str
    rss_before: int = 0
    hwm_before: int = 0
    rss_peak: int = 0
    table_peak: int = 0
    by_address_peak: int = 0
    samples: int = 0
    started: float = 0.0

    def __post_init__(self) -> None:
        self.rss_before = self.rss_peak = rss_bytes()
        self.hwm_before = hwm_bytes()
        self.started = time.monotonic()
        self._scope = trio.CancelScope()

    @classmethod
    def start(cls, nursery: trio.Nursery, server: DTLSServer, label: str) -> Gauge:
        gauge = cls(server, label)
        nursery.start_soon(gauge._run)
        return gauge

    async def _run(self) -> None:
        with self._scope:
            while True:
                self.sample()
                await trio.sleep(0.005)

    def sample(self) -> None:
        stats = self.server.stats()
        self.samples += 1
        self.rss_peak = max(self.rss_peak, rss_bytes())
        self.table_peak = max(self.table_peak, stats.sessions_active + stats.handshakes_active)
        self.by_address_peak = max(self.by_address_peak, len(self.server._by_address))

    @property
    def rss_growth(self) -> int:
        return self.rss_peak - self.rss_before

    def stop(self, **figures: object) -> Gauge:
        self.sample()
        self._scope.cancel()
        elapsed = time.monotonic() - self.started
        shown = " ".join(f"{name}={value}" for name, value in figures.items())
        print(
            f"\n[hostile] {self.label}: {shown} elapsed={elapsed:.2f}s "
            f"rss_before={self.rss_before / MIB:.1f}MiB "
            f"rss_peak_growth={self.rss_growth / MIB:.1f}MiB "
            f"hwm_growth={(hwm_bytes() - self.hwm_before) / MIB:.1f}MiB "
            f"table_peak={self.table_peak} by_address_peak={self.by_address_peak} "
            f"samples={self.samples}",
            flush=True,
        )
        return self


# -- handlers and clients ----------------------------------------------------------------


class Recorder:
    """Echoes, and remembers what each session received and how it ended."""

    def __init__(self) -> None:
        self.sessions: list[DTLSSession] = []
        self.received: dict[int, list[bytes]] = {}
        self.ended: list[CloseReason | None] = []
        self.errors: list[BaseException] = []

    async def __call__(self, session: DTLSSession) -> None:
        self.sessions.append(session)
        got = self.received.setdefault(session.session_id, [])
        try:
            async for datagram in session:
                got.append(datagram)
                await session.send(datagram)
        except BaseException as exc:
            self.errors.append(exc)
            raise
        self.ended.append(session.close_reason)


async def start_server(
    nursery: trio.Nursery,
    handler: Recorder,
    config: DTLSServerConfig,
    host: str = "127.0.0.1",
) -> DTLSServer:
    server: DTLSServer = await nursery.start(
        partial(serve_dtls, handler, 0, config=config, host=host)
    )
    return server


async def assert_served(
    server: DTLSServer,
    config: DTLSClientConfig,
    *,
    source: str | None = None,
    host: str = "127.0.0.1",
) -> None:
    """A new client gets a session and an echo within PROMPT seconds; the server is alive."""
    assert not server._stopped.is_set()
    with trio.fail_after(PROMPT):
        session = await connect_dtls(
            host,
            server.port,
            config,
            local_address=(source, 0) if source is not None else None,
        )
        try:
            assert await exchange(session, b"legitimate") == b"legitimate"
        finally:
            await session.aclose()


async def finish_raw_handshake(
    raw: RawHandshake, *, append_to_final_flight: bytes = b"", timeout: float = 3.0
) -> None:
    """Complete a RawHandshake by hand (it stops after the ClientHello with the cookie)."""
    extra = append_to_final_flight
    with trio.fail_after(timeout):
        while True:
            raw.conn.bio_write(await raw.sock.recv(65535))
            try:
                raw.conn.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            outgoing = drain_bio(raw.conn)
            if outgoing:
                await raw.sock.send(outgoing + extra)
                extra = b""
            if done:
                return


async def raw_exchange(raw: RawHandshake, payload: bytes) -> bytes:
    raw.conn.write(payload)
    await raw.sock.send(drain_bio(raw.conn))
    with trio.fail_after(PROMPT):
        while True:
            raw.conn.bio_write(await raw.sock.recv(65535))
            with contextlib.suppress(SSL.WantReadError):
                return raw.conn.read(65535)


async def hello_with_cookie(
    sock: trio.socket.SocketType, config: DTLSClientConfig
) -> SSL.Connection:
    """From ``sock`` (connected to a server), a fresh handshake up to the ClientHello with
    its cookie, like RawHandshake.start but from a socket the caller chose."""
    conn = SSL.Connection(config.build_context().context, None)
    conn.set_connect_state()
    conn.set_ciphertext_mtu(1400)
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    await sock.send(drain_bio(conn))
    with trio.fail_after(PROMPT):
        while True:
            reply = await sock.recv(65535)
            if cookie_of(reply) is not None:  # skip flights of the handshake it replaced
                break
    conn.bio_write(reply)
    with contextlib.suppress(SSL.WantReadError):
        conn.do_handshake()
    await sock.send(drain_bio(conn))
    return conn


# -- attacks (the first, property-based, with hypothesis) ------------------------------------

records = st.builds(
    record,
    st.sampled_from([20, 21, 22, 23]) | st.integers(0, 255),
    st.integers(0, 3),
    st.integers(0, 2**48 - 1),
    st.binary(max_size=300),
    st.sampled_from([0, 0, 0, -1, 1, -13, 100]),
)


@st.composite
def mutated_hellos(draw: st.DrawFn) -> bytes:
    out = bytearray(HELLO)
    out[_RANDOM_AT:_SESSION_ID_AT] = draw(st.binary(min_size=32, max_size=32))
    for _ in range(draw(st.integers(0, 6))):
        out[draw(st.integers(0, len(out) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del out[draw(st.integers(0, len(out))) :]
    return bytes(out) + draw(st.binary(max_size=16))


@dataclasses.dataclass
class PropertyFigures:
    """What the property test saw over all its examples (printed once, at the end)."""

    examples: int = 0
    datagrams: int = 0
    rss_first: int = 0
    rss_peak: int = 0
    by_address_peak: int = 0

    def note(self, server: DTLSServer) -> None:
        rss = rss_bytes()
        self.rss_first = self.rss_first or rss
        self.rss_peak = max(self.rss_peak, rss)
        self.by_address_peak = max(self.by_address_peak, len(server._by_address))


@pytest.fixture(scope="module")
def property_figures() -> Iterator[PropertyFigures]:
    figures = PropertyFigures()
    yield figures
    if figures.examples:
        print(
            f"\n[hostile] property test: examples={figures.examples} "
            f"datagrams={figures.datagrams} rss_first={figures.rss_first / MIB:.1f}MiB "
            f"rss_peak_growth={(figures.rss_peak - figures.rss_first) / MIB:.1f}MiB "
            f"by_address_peak={figures.by_address_peak}",
            flush=True,
        )


datagrams = st.one_of(st.binary(max_size=1500), records, mutated_hellos())
#: (from the established session's own address?, datagram, send it again with a valid cookie?)
inputs = st.lists(st.tuples(st.booleans(), datagrams, st.booleans()), min_size=1, max_size=50)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(batch=inputs)
async def test_generated_datagrams_from_strangers_and_from_a_session_harm_nobody(
    dtls_pki: TestPKI, property_figures: PropertyFigures, batch: list[tuple[bool, bytes, bool]]
) -> None:
    """Property: whatever datagrams arrive, a stranger gets at most a HelloVerifyRequest
    smaller than what it sent, and only for a ClientHello; no state is kept for it until
    it returns a valid cookie; datagrams from an established session's address never
    reach its handler nor end it; the table stays within max_sessions; a new client is
    served."""
    max_sessions = 4
    recorder = Recorder()
    async with trio.open_nursery() as nursery:
        server = await start_server(
            nursery,
            recorder,
            dtls_pki.server_config(max_sessions=max_sessions, handshake_timeout=0.5),
        )
        target = await connect_dtls(*server.address, dtls_pki.client_config())
        with stranger_sockets(["127.0.0.1"]) as (stranger,), contextlib.ExitStack() as stack:
            stack.callback(abandon, target)  # if an assertion fails; else closed below
            for from_session, datagram, with_cookie in batch:
                if from_session:
                    send_raw(target, datagram)
                    continue
                table_before = set(server._by_address)
                stranger.sendto(datagram, server.address)
                await trio.testing.wait_all_tasks_blocked()
                replies = drain_socket(stranger)
                # (A session the stranger opened with a valid cookie may end meanwhile.)
                assert set(server._by_address) <= table_before, "state kept for a stranger"
                if stranger.getsockname() in table_before:
                    continue  # not a stranger any more: that went into its handshake
                if not parses(datagram):
                    assert replies == []
                    continue
                assert len(replies) == 1
                (reply,) = replies
                assert reply[0] == 22 and reply[13] == 3, "not a HelloVerifyRequest"
                assert len(reply) < len(datagram), "amplification"
                cookie = cookie_of(reply)
                spliced = splice_cookie(datagram, cookie) if cookie is not None else None
                if with_cookie and spliced is not None:
                    stranger.sendto(spliced, server.address)
                    await trio.testing.wait_all_tasks_blocked()
                    drain_socket(stranger)
                assert len(server._by_address) <= max_sessions
                property_figures.note(server)
            property_figures.examples += 1
            property_figures.datagrams += len(batch)
            property_figures.note(server)
            assert property_figures.rss_peak - property_figures.rss_first < 50 * MIB
            with trio.fail_after(PROMPT):
                assert await exchange(target, b"still here") == b"still here"
            await assert_served(server, dtls_pki.client_config())
            stats = server.stats()
            assert stats.handler_errors == 0 and not recorder.errors
            assert recorder.received[recorder.sessions[0].session_id] == [b"still here"]
            assert target.is_established
            await target.aclose()
        nursery.cancel_scope.cancel()


async def test_flood_of_random_datagrams_and_mutated_hellos_stays_bounded(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    """10,000 datagrams: random bytes, crafted records and mutated ClientHellos (a tenth
    of them with valid cookies, so they reach OpenSSL), from strangers on IPv4 and IPv6
    and from an established session's own address."""
    v6 = needs.ipv6_loopback()
    max_sessions = 8
    recorder = Recorder()
    server = await start_server(
        nursery,
        recorder,
        dtls_pki.server_config(
            max_sessions=max_sessions, handshake_timeout=0.5, evict_idle_after=60
        ),
        host="::" if v6 else "127.0.0.1",
    )
    target = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
    assert await exchange(target, b"before") == b"before"
    hosts = [f"127.0.0.{1 + i % 4}" for i in range(12)] + (["::1"] * 4 if v6 else [])
    rng = random.Random(20240611)
    counts = dict.fromkeys(("random", "records", "raw_into_session", "hellos", "cookied"), 0)
    gauge = Gauge.start(nursery, server, "flood 10k datagrams")
    with stranger_sockets(hosts) as strangers, trio.fail_after(40):

        def target_of(sock: socket.socket) -> tuple[str, int]:
            return ("::1" if sock.family == socket.AF_INET6 else "127.0.0.1", server.port)

        for i in range(10_000):
            sock = strangers[i % len(strangers)]
            kind = i % 10
            if kind < 3:
                counts["random"] += 1
                sock.sendto(rng.randbytes(rng.randrange(1500)), target_of(sock))
            elif kind < 5:
                counts["records"] += 1
                body = rng.randbytes(rng.randrange(200))
                datagram = record(
                    rng.choice((20, 21, 22, 23, rng.randrange(256))),
                    rng.randrange(3),
                    rng.randrange(2**48),
                    body,
                    rng.choice((0, 0, -1, 7)),
                )
                sock.sendto(datagram, target_of(sock))
            elif kind < 7:
                counts["raw_into_session"] += 1
                choice = rng.randrange(3)
                if choice == 0:
                    datagram = rng.randbytes(rng.randrange(1, 1500))
                elif choice == 1:
                    datagram = record(
                        rng.choice((21, 22, 23)), 1, rng.randrange(2**48), rng.randbytes(48)
                    )
                else:
                    datagram = mutate_hello(rng, keep_cookie_fields=False)
                send_raw(target, datagram)
            elif kind < 9:
                counts["hellos"] += 1
                sock.sendto(mutate_hello(rng, keep_cookie_fields=False), target_of(sock))
            else:
                # The cookie round trip, then the same mutated hello with its cookie.
                counts["cookied"] += 1
                hello = mutate_hello(rng, keep_cookie_fields=True)
                drain_socket(sock)
                sock.sendto(hello, target_of(sock))
                await trio.testing.wait_all_tasks_blocked()
                cookies = [c for c in map(cookie_of, drain_socket(sock)) if c is not None]
                assert cookies, "no HelloVerifyRequest for a ClientHello that parses"
                spliced = splice_cookie(hello, cookies[-1])
                assert spliced is not None
                sock.sendto(spliced, target_of(sock))
            if i % 64 == 63:
                await trio.testing.wait_all_tasks_blocked()
                gauge.sample()
                for sock in strangers:
                    drain_socket(sock)
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(PROMPT):
            assert await exchange(target, b"after") == b"after"
    stats = server.stats()
    gauge.stop(
        datagrams=10_000,
        **counts,
        ipv6=v6,
        handshakes_started=stats.handshakes_started,
        handshakes_failed=stats.handshakes_failed,
        handshakes_aborted=stats.handshakes_aborted,
        refused=stats.sessions_refused,
        invalid=stats.datagrams_invalid,
        unmatched=stats.datagrams_unmatched,
        cookies_sent=stats.cookies_sent,
    )
    assert gauge.rss_growth < 50 * MIB
    assert gauge.by_address_peak <= max_sessions
    # The counters agree with the table at every moment (each handshake's end is
    # counted when it happens), so they are held to the same bound.
    assert gauge.table_peak <= max_sessions
    assert stats.cookies_sent >= counts["cookied"]
    assert stats.handshakes_started > 0 and stats.datagrams_invalid > 0
    assert stats.handler_errors == 0 and not recorder.errors
    # Nothing injected from the session's address reached its handler.
    assert recorder.received[recorder.sessions[0].session_id] == [b"before", b"after"]
    await wait_for_stats(server, handshakes_active=0, timeout=3)
    await assert_served(server, dtls_pki.client_config())
    await target.aclose()


async def test_many_half_open_handshakes_are_cleared_by_the_handshake_timeout(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    count = 200
    server = await start_server(nursery, Recorder(), dtls_pki.server_config(handshake_timeout=0.5))
    half_open: list[RawHandshake] = []

    async def open_one() -> None:
        half_open.append(await RawHandshake.start(server.address, dtls_pki.client_config()))

    gauge = Gauge.start(nursery, server, f"{count} half-open handshakes")
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as attackers:
                for _ in range(count):
                    attackers.start_soon(open_one)
            await wait_for_stats(server, handshakes_started=count)
            gauge.sample()
            stats = await wait_for_stats(
                server, handshake_timeouts=count, handshakes_active=0, timeout=5
            )
            await wait_until(lambda: not server._by_address and not server._running)
    finally:
        for raw in half_open:
            raw.close()
    gauge.stop(half_open=count, handshake_timeouts=stats.handshake_timeouts)
    assert gauge.table_peak <= count and gauge.by_address_peak <= count
    assert gauge.rss_growth < 64 * MIB
    assert stats.sessions_refused == 0 and stats.handshakes_completed == 0
    await assert_served(server, dtls_pki.client_config())


async def test_many_abandoned_sessions_are_cleared_by_the_idle_timeout(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    count = 100
    recorder = Recorder()
    server = await start_server(
        nursery, recorder, dtls_pki.server_config(idle_timeout=0.5, evict_idle_after=60)
    )
    config = dtls_pki.client_config()
    limiter = trio.CapacityLimiter(25)

    async def connect_and_vanish(source: str) -> None:
        async with limiter:
            session = await connect_dtls(*server.address, config, local_address=(source, 0))
            assert await exchange(session, b"bye?") == b"bye?"
            abandon(session)  # no close_notify: the peer is just gone

    gauge = Gauge.start(nursery, server, f"{count} abandoned sessions")
    with trio.fail_after(20):
        async with trio.open_nursery() as clients:
            # One source IP each: a closed client's port can be handed to the next one,
            # whose handshake would then replace the abandoned session (not what we test).
            for i in range(count):
                clients.start_soon(connect_and_vanish, f"127.0.1.{i + 1}")
        stats = await wait_for_stats(
            server, sessions_idle_timeout=count, sessions_active=0, timeout=5
        )
        await wait_until(lambda: not server._by_address and not server._running)
    gauge.stop(abandoned=count, idle_timeouts=stats.sessions_idle_timeout)
    assert gauge.table_peak <= count and gauge.by_address_peak <= count
    assert gauge.rss_growth < 64 * MIB
    assert recorder.ended == [CloseReason.IDLE_TIMEOUT] * count
    assert server.stats().handler_errors == 0 and not recorder.errors
    await assert_served(server, dtls_pki.client_config())


async def test_half_open_handshakes_are_never_evicted(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    """Eviction makes room by ending an idle *established* session only: with everything
    idle enough to go (evict_idle_after=0), a table full of half-open handshakes still
    refuses newcomers, and frees up when the handshakes time out."""
    server = await start_server(
        nursery,
        Recorder(),
        dtls_pki.server_config(max_sessions=3, evict_idle_after=0, handshake_timeout=1.0),
    )
    config = dtls_pki.client_config()
    half_open = [await RawHandshake.start(server.address, config) for _ in range(3)]
    try:
        late = await RawHandshake.start(server.address, config)
        late.close()
        stats = await wait_for_stats(server, sessions_refused=1, handshakes_active=3)
        assert stats.sessions_evicted == 0 and len(server._by_address) == 3
        await wait_for_stats(server, handshake_timeouts=3, handshakes_active=0, timeout=3)
    finally:
        for raw in half_open:
            raw.close()
    await assert_served(server, config)


async def test_sessions_from_one_ip_are_held_at_max_sessions_per_ip(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    """Established sessions and half-open handshakes from 127.0.0.1 together stay at the
    per-IP bound; 127.0.0.2 is admitted meanwhile; 127.0.0.1 again once handshakes expire."""
    per_ip, established_count, attempts = 8, 6, 60
    server = await start_server(
        nursery,
        Recorder(),
        dtls_pki.server_config(
            # Long enough for all the newcomers to meet the two half-open handshakes.
            max_sessions_per_ip=per_ip,
            evict_idle_after=60,
            handshake_timeout=2.0,
        ),
    )
    config = dtls_pki.client_config()
    established = [await connect_dtls(*server.address, config) for _ in range(established_count)]
    half_open: list[RawHandshake] = []
    gauge = Gauge.start(nursery, server, f"{attempts} newcomers from one IP")
    try:
        with trio.fail_after(10):
            for _ in range(attempts):
                half_open.append(await RawHandshake.start(server.address, config))
                await trio.testing.wait_all_tasks_blocked()
                assert len(server._by_ip.get("127.0.0.1", ())) <= per_ip
            stats = await wait_for_stats(server, sessions_refused=attempts - 2)
            assert len(server._by_ip["127.0.0.1"]) == per_ip
            # Another source IP is not held back ...
            await assert_served(server, config, source="127.0.0.2")
            # ... and the established sessions from the crowded IP still work.
            for session in established:
                assert await exchange(session, b"still") == b"still"
            gauge.sample()
            await wait_for_stats(server, handshake_timeouts=2, handshakes_active=0, timeout=4)
            await assert_served(server, config, source="127.0.0.1")
    finally:
        for raw in half_open:
            raw.close()
        for session in established:
            await session.aclose()
    gauge.stop(attempts=attempts, refused=stats.sessions_refused, per_ip=per_ip)
    assert gauge.by_address_peak <= per_ip + 1  # + the one from 127.0.0.2
    assert gauge.rss_growth < 50 * MIB


async def test_reconnect_storm_from_one_address_keeps_one_session(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    reconnects = 50
    recorder = Recorder()
    server = await start_server(nursery, recorder, dtls_pki.server_config())
    config = dtls_pki.client_config()
    session = await connect_dtls(*server.address, config)
    address = local_address(session)
    gauge = Gauge.start(nursery, server, f"{reconnects} reconnects from one address")
    with trio.fail_after(20):
        for i in range(reconnects):
            abandon(session)  # the peer reboots and comes back from the same port
            session = await connect_dtls(*server.address, config, local_address=address)
            assert await exchange(session, b"%d" % i) == b"%d" % i
            assert list(server._by_address) == [address]
            gauge.sample()
        stats = await wait_for_stats(server, sessions_replaced=reconnects, sessions_active=1)
        await wait_until(lambda: len(recorder.ended) == reconnects)
    gauge.stop(reconnects=reconnects, replaced=stats.sessions_replaced)
    assert recorder.ended == [CloseReason.REPLACED] * reconnects
    assert stats.handler_errors == 0 and not recorder.errors
    assert gauge.by_address_peak == 1 and gauge.rss_growth < 50 * MIB
    await assert_served(server, config)
    assert await exchange(session, b"last") == b"last"
    await session.aclose()


async def test_half_open_storm_from_one_address_keeps_one_handshake(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    """Each ClientHello with a valid cookie from the same address replaces the handshake
    before it; the last one is dropped by the handshake timeout."""
    storm = 50
    server = await start_server(nursery, Recorder(), dtls_pki.server_config(handshake_timeout=1.0))
    config = dtls_pki.client_config()
    gauge = Gauge.start(nursery, server, f"{storm} half-open handshakes from one address")
    with trio.socket.socket(type=socket.SOCK_DGRAM) as sock, trio.fail_after(10):
        await sock.connect(server.address)
        for _ in range(storm):
            await hello_with_cookie(sock, config)
            await trio.testing.wait_all_tasks_blocked()
            assert len(server._by_address) == 1
            gauge.sample()
        stats = await wait_for_stats(
            server,
            handshakes_started=storm,
            handshakes_aborted=storm - 1,
            handshake_timeouts=1,
            handshakes_active=0,
            timeout=3,
        )
    gauge.stop(storm=storm, aborted=stats.handshakes_aborted)
    assert gauge.by_address_peak == 1 and not server._by_address
    assert stats.handler_errors == 0
    await assert_served(server, config)


EPOCH_1_APPLICATION_DATA = record(23, 1, 0, os.urandom(48))
EPOCH_0_APPLICATION_DATA = record(23, 0, 9, b"early data")
EPOCH_0_FATAL_ALERT = record(21, 0, 9, b"\x02\x28")  # handshake_failure


@pytest.mark.parametrize(
    ("injected", "with_final_flight", "completes"),
    [
        pytest.param(EPOCH_1_APPLICATION_DATA, False, True, id="epoch1-appdata-mid-handshake"),
        pytest.param(EPOCH_1_APPLICATION_DATA, True, True, id="epoch1-appdata-with-finished"),
        pytest.param(EPOCH_0_APPLICATION_DATA, False, False, id="epoch0-appdata"),
        pytest.param(EPOCH_0_FATAL_ALERT, False, False, id="epoch0-fatal-alert"),
    ],
)
async def test_records_injected_into_a_handshake_end_at_most_that_handshake(
    dtls_pki: TestPKI,
    nursery: trio.Nursery,
    injected: bytes,
    with_final_flight: bool,
    completes: bool,
) -> None:
    """Application data before the handshake ends, from the handshaking address: records
    of the next epoch that do not authenticate are dropped and the handshake completes;
    plaintext application data or an alert in epoch 0 makes OpenSSL fail that handshake
    (as DTLS says), cleanly and for that peer only."""
    recorder = Recorder()
    server = await start_server(nursery, recorder, dtls_pki.server_config(handshake_timeout=2))
    config = dtls_pki.client_config()
    bystander = await connect_dtls(*server.address, config)
    raw = await RawHandshake.start(server.address, config)
    try:
        await wait_for_stats(server, handshakes_active=1)
        if with_final_flight:
            await finish_raw_handshake(raw, append_to_final_flight=injected)
        else:
            await raw.sock.send(injected)
            await trio.testing.wait_all_tasks_blocked()
            if completes:
                await finish_raw_handshake(raw)
        if completes:
            assert await raw_exchange(raw, b"ping") == b"ping"
            stats = await wait_for_stats(server, handshakes_completed=2, sessions_active=2)
            assert recorder.received[recorder.sessions[1].session_id] == [b"ping"]
        else:
            stats = await wait_for_stats(
                server, handshakes_failed=1, handshakes_active=0, sessions_active=1
            )
            assert not server._by_address.get(raw.sock.getsockname())
    finally:
        raw.close()
    assert stats.handler_errors == 0 and not recorder.errors
    assert await exchange(bystander, b"unaffected") == b"unaffected"
    await assert_served(server, config)
    await bystander.aclose()


async def test_records_replayed_after_close_notify_are_dropped(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    """After a session's close_notify its records (replayed from its own address) are
    dropped as datagrams for no session; into a new session from the same address they
    fail to authenticate and are dropped; data after close_notify in the same datagram
    is never delivered. None of it is a handler error."""
    recorder = Recorder()
    server = await start_server(nursery, recorder, dtls_pki.server_config())
    config = dtls_pki.client_config()

    # 1. Records of a closed session, replayed from its address.
    first = await connect_dtls(*server.address, config)
    captured = []
    for i in range(20):
        first._conn.write(b"record %d" % i)
        captured.append(first._conn.bio_read(65535))
        send_raw(first, captured[-1])
        with trio.fail_after(PROMPT):
            assert await first.receive() == b"record %d" % i
    address = local_address(first)
    await first.aclose()
    await wait_for_stats(server, sessions_closed=1, sessions_active=0)
    before = server.stats()
    with trio.socket.socket(type=socket.SOCK_DGRAM) as sock:
        await sock.bind(address)
        for datagram in captured:
            await sock.sendto(datagram, server.address)
    stats = await wait_for_stats(
        server, datagrams_unmatched=before.datagrams_unmatched + len(captured)
    )
    assert stats.datagrams_invalid == before.datagrams_invalid
    assert stats.datagrams_in == before.datagrams_in

    # 2. The same records, into a new session from the same address.
    second = await connect_dtls(*server.address, config, local_address=address)
    for datagram in captured:
        send_raw(second, datagram)
    assert await exchange(second, b"fresh") == b"fresh"
    await wait_until(lambda: len(recorder.sessions) == 2)
    assert recorder.received[recorder.sessions[1].session_id] == [b"fresh"]

    # 3. close_notify with application data after it, in one datagram, then the data alone.
    second._conn.write(b"after close_notify")
    late = second._conn.bio_read(65535)
    second._conn.shutdown()
    close_notify = second._conn.bio_read(65535)
    send_raw(second, close_notify + late)
    await wait_until(lambda: len(recorder.ended) == 2)
    send_raw(second, late)
    await wait_for_stats(
        server, sessions_active=0, datagrams_unmatched=lambda n: n > stats.datagrams_unmatched
    )
    abandon(second)
    assert recorder.ended == [CloseReason.PEER_CLOSED, CloseReason.PEER_CLOSED]
    assert recorder.received[recorder.sessions[1].session_id] == [b"fresh"]
    assert server.stats().handler_errors == 0 and not recorder.errors
    await assert_served(server, config)


async def test_a_bug_in_per_datagram_handling_ends_only_that_session(
    dtls_pki: TestPKI,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The reading task's last line of defence: an exception escaping the handling of
    one datagram (a planted bug here) is logged and ends only the session it was for."""
    server: DTLSServer = await nursery.start(
        partial(serve_dtls, echo_handler, 0, config=dtls_pki.server_config())
    )
    config = dtls_pki.client_config()
    victim = await connect_dtls(*server.address, config)
    bystander = await connect_dtls(*server.address, config)
    original = DTLSSession._on_datagram

    def buggy(session: DTLSSession, datagram: bytes) -> None:
        if b"PLANTED" in datagram:
            raise IndexError("planted bug")
        original(session, datagram)

    monkeypatch.setattr(DTLSSession, "_on_datagram", buggy)
    send_raw(victim, record(23, 1, 99, b"PLANTED" + bytes(24)))
    await wait_for_stats(server, sessions_active=1, sessions_closed=1)
    assert local_address(victim) not in server._by_address
    logged = [r for r in caplog.records if "internal error handling a datagram" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
    assert await exchange(bystander, b"unaffected") == b"unaffected"
    assert server.stats().handler_errors == 0
    await assert_served(server, config)
    abandon(victim)  # the server dropped it without a word: nothing to close politely
    await bystander.aclose()


async def test_last_datagram_then_close_notify_is_not_a_handler_error(
    dtls_pki: TestPKI, nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    """A peer says its last word and closes at once (a datagram, then close_notify, read
    in one go by the reading task). The handler written as the README shows gets the
    datagram, and its echo meets the ended session: that ends the handler normally, it
    is no handler error and logs no ERROR (else any peer could make the server log
    tracebacks at will)."""
    server: DTLSServer = await nursery.start(
        partial(serve_dtls, echo_handler, 0, config=dtls_pki.server_config())
    )
    client = await connect_dtls(*server.address, dtls_pki.client_config())
    assert await exchange(client, b"hello") == b"hello"
    client._conn.write(b"last words")
    last = drain_bio(client._conn)
    client._conn.shutdown()
    send_raw(client, last + drain_bio(client._conn))  # the datagram, then close_notify
    stats = await wait_for_stats(server, sessions_closed=1)
    abandon(client)
    assert stats.datagrams_in == 2
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    assert stats.handler_errors == 0


# -- each handshake is counted once ------------------------------------------------


async def test_handshake_completed_and_closed_in_one_datagram_is_counted_once(
    dtls_pki: TestPKI, nursery: trio.Nursery
) -> None:
    """A resuming client's last flight carries its Finished, a datagram and close_notify
    (all legal in one datagram): the reading task completes the handshake, delivers the
    datagram and ends the session before the session's task first runs."""
    received: list[bytes] = []

    async def collect(session: DTLSSession) -> None:
        async for datagram in session:
            received.append(datagram)

    server: DTLSServer = await nursery.start(
        partial(serve_dtls, collect, 0, config=dtls_pki.server_config())
    )
    config = dtls_pki.client_config()
    first = await connect_dtls(*server.address, config)
    ticket = first.tls_session
    assert ticket is not None
    await first.aclose()
    await wait_for_stats(server, sessions_closed=1)

    with trio.socket.socket(type=socket.SOCK_DGRAM) as sock, trio.fail_after(5):
        await sock.connect(server.address)
        conn = SSL.Connection(config.build_context().context, None)
        conn.set_connect_state()
        conn.set_session(ticket)
        conn.set_ciphertext_mtu(1400)
        while True:
            try:
                conn.do_handshake()
                break
            except SSL.WantReadError:
                await sock.send(drain_bio(conn))
                conn.bio_write(await sock.recv(65535))
        conn.write(b"one datagram")
        with contextlib.suppress(SSL.Error):
            conn.shutdown()
        await sock.send(drain_bio(conn))  # CCS, Finished, the datagram, close_notify
        await wait_for_stats(server, sessions_closed=2)
    assert received == [b"one datagram"]
    stats = server.stats()
    assert stats.handshakes_completed == 2
    assert stats.handshakes_aborted == 0
    assert stats.handshakes_active == 0


async def test_final_flight_at_the_handshake_deadline_is_counted_once(
    dtls_pki: TestPKI, nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    """The client's final flight arrives in the very tick the handshake deadline expires.
    Either outcome is fine (a timeout, or a live session), not both. Trio orders the two
    tasks at random in that tick, so a few attempts meet both orders."""
    handshake_timeout = 5.0
    server: DTLSServer = await nursery.start(
        partial(
            serve_dtls,
            Recorder(),
            0,
            config=dtls_pki.server_config(handshake_timeout=handshake_timeout),
        )
    )
    config = dtls_pki.client_config()
    for _attempt in range(20):
        raw = await RawHandshake.start(server.address, config)
        try:
            final = b""
            while not final:  # the server's flight, until the client has its last one
                raw.conn.bio_write(await raw.sock.recv(65535))
                with contextlib.suppress(SSL.WantReadError):
                    raw.conn.do_handshake()
                final = drain_bio(raw.conn)
            await trio.testing.wait_all_tasks_blocked()
            before = server.stats()
            mock_clock.jump(handshake_timeout + 1)
            await raw.sock.send(final)
            await trio.testing.wait_all_tasks_blocked()
            after = server.stats()
            completed = after.handshakes_completed - before.handshakes_completed
            timed_out = after.handshake_timeouts - before.handshake_timeouts
            assert (completed, timed_out) in ((1, 0), (0, 1))
            if completed:
                assert raw.sock.getsockname() in server._by_address
        finally:
            raw.close()
