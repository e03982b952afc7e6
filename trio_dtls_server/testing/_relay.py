"""A fault-injecting UDP relay for testing DTLS programs on loopback.

Put a :class:`FaultyRelay` between a client and a server to show that a
protocol survives the things real networks do to datagrams: loss, reordering,
duplication, delay and jitter, bit flips, small path MTUs, and one-way
blackholes.  The relay is plain UDP: it neither knows nor cares that the
payload is DTLS.

Each direction has its own :class:`Faults`, which a test may replace or mutate
at any time; the change applies from the next datagram on.  Every decision is
counted in :attr:`FaultyRelay.stats`, appended to :attr:`FaultyRelay.events`
and logged at DEBUG to the ``trio_dtls_server.testing.relay`` logger, so a
failing test can show exactly what the relay did.  Decisions come from a
seeded random generator per direction, so a run with the same seed and the
same sequence of datagrams makes the same decisions.

The relay only ever sends to loopback addresses (``127.0.0.0/8`` and ``::1``),
so a typo in a test cannot spray faulty traffic at a real host.

Example::

    async with open_fault_relay(
        server_address,
        client_to_server=Faults(loss=0.2, reorder=0.1),
        server_to_client=Faults(duplicate=0.1, delay=0.01),
    ) as relay:
        # Point the client at the relay instead of at the server.
        await run_client(relay.address)
        # Cut the server off from the client and check the client gives up.
        relay.set_faults(s2c=Faults(blackhole=True))
        with pytest.raises(trio.TooSlowError):
            await run_client(relay.address)
        print(relay.stats["c2s"].dropped, "datagrams lost on the way in")
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import heapq
import ipaddress
import logging
import math
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Literal

import trio

__all__ = ["DirectionStats", "Faults", "FaultyRelay", "RelayEvent", "open_fault_relay"]

logger = logging.getLogger("trio_dtls_server.testing.relay")

Direction = Literal["c2s", "s2c"]

# Large enough for any UDP payload, so the relay never truncates a datagram.
_MAX_DATAGRAM = 65536

# Upper bound on datagrams waiting in the relay (delayed or held back for
# reordering) plus pending timers; past it new datagrams are dropped, so a test
# that floods a slow relay runs out of patience rather than memory.
_MAX_PENDING = 10_000

_PROBABILITY_FIELDS = frozenset({"loss", "duplicate", "reorder", "corrupt"})
_DURATION_FIELDS = frozenset({"reorder_hold", "delay", "jitter"})


def _check_fault_field(name: str, value: object) -> None:
    """Raise ValueError (naming the field) if ``value`` is not valid for ``Faults.name``."""
    if name in _PROBABILITY_FIELDS:
        if not isinstance(value, int | float) or not 0.0 <= value <= 1.0:
            raise ValueError(f"Faults.{name} must be a probability in [0.0, 1.0], got {value!r}")
    elif name in _DURATION_FIELDS:
        if not isinstance(value, int | float) or not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"Faults.{name} must be a finite, non-negative number of seconds, got {value!r}"
            )
    elif name == "mtu":
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ValueError(f"Faults.mtu must be None or an integer >= 1, got {value!r}")
    elif name == "max_losses":
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 0
        ):
            raise ValueError(f"Faults.max_losses must be None or an integer >= 0, got {value!r}")
    elif name == "blackhole" and not isinstance(value, bool):
        raise ValueError(f"Faults.blackhole must be a bool, got {value!r}")


@dataclasses.dataclass
class Faults:
    """Faults applied to one direction. Every probability is per datagram, 0.0-1.0.

    Fields are checked whenever they are set, at construction and on later
    assignment, and an invalid value raises :exc:`ValueError` naming the field.
    Checking assignments too matters because tests mutate a relay's faults
    while it runs, and a bad value should fail in the test, not in the relay.
    """

    #: Probability of dropping the datagram.
    loss: float = 0.0
    #: At most this many of one client's datagrams are dropped by :attr:`loss`
    #: in this direction; after that, :attr:`loss` spares the client.  DTLS
    #: backs off exponentially (OpenSSL retransmits after 1 s, then 2 s, 4 s,
    #: ...), so unbounded random loss gives handshake times a long tail: at
    #: 30% loss each way, several handshakes in a hundred take over 30 s.
    #: Budgets of *n* and *m* for the two directions bound the time a
    #: handshake spends waiting for retransmissions to 2**(n + m) - 1 s, so a
    #: test can pick a timeout that bad luck cannot reach.
    max_losses: int | None = None
    #: Probability of delivering the datagram twice.
    duplicate: float = 0.0
    #: Probability of holding the datagram back and delivering it right after
    #: the next datagram from the same client in the same direction, or after
    #: :attr:`reorder_hold` seconds if none comes.  Several datagrams in a row
    #: may be held; the next one that is not releases them all, oldest first.
    reorder: float = 0.0
    #: Seconds a reordered datagram waits for a successor before it is sent anyway.
    reorder_hold: float = 0.05
    #: Seconds added to every datagram.
    delay: float = 0.0
    #: Up to this many extra seconds (uniformly random) added to every
    #: datagram; because each datagram gets its own value, this reorders too.
    jitter: float = 0.0
    #: Probability of flipping one random bit in one random byte.
    corrupt: float = 0.0
    #: Datagrams longer than this many bytes are dropped, as if by a path MTU.
    mtu: int | None = None
    #: Drop everything in this direction.
    blackhole: bool = False

    def __setattr__(self, name: str, value: object) -> None:
        _check_fault_field(name, value)
        super().__setattr__(name, value)


@dataclasses.dataclass
class DirectionStats:
    """Counts of what the relay did in one direction.

    ``received`` counts datagrams that reached the relay.  ``delivered``
    counts datagrams the relay sent on, each copy of a duplicate separately,
    so it always equals what the other side could have received.  ``dropped``
    counts random loss and datagrams the relay had to give up on (too many
    clients, too many pending datagrams, or a failed send); MTU clamps and
    blackholes are counted only in ``clamped`` and ``blackholed``.
    """

    received: int = 0
    delivered: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    corrupted: int = 0
    clamped: int = 0
    blackholed: int = 0


@dataclasses.dataclass(frozen=True)
class RelayEvent:
    """One decision the relay made about one datagram."""

    #: :func:`trio.current_time` when the decision was made.
    time: float
    #: ``"c2s"`` (client to server) or ``"s2c"`` (server to client).
    direction: str
    #: ``"pass"`` (sent on; once per copy), ``"drop"``, ``"duplicate"``,
    #: ``"reorder"``, ``"corrupt"``, ``"clamp"``, ``"blackhole"`` or ``"delay"``.
    action: str
    #: The client's address, in both directions.
    peer: tuple[str, int]
    #: The datagram's size in bytes.
    size: int


@dataclasses.dataclass
class _Held:
    """A datagram held back for reordering, with the decisions already made for it."""

    data: bytes
    copies: int
    delay: float


@dataclasses.dataclass(eq=False)
class _Peer:
    """The relay's state for one client address."""

    client: tuple[str, int]
    # Connected to the target, so the server sees one distinct peer per client.
    upstream: trio.socket.SocketType
    last_active: float
    # Datagrams held back for reordering. The list is replaced (not cleared)
    # when released, so a release timer can tell whether its list is still held.
    held: dict[Direction, list[_Held]] = dataclasses.field(
        default_factory=lambda: {"c2s": [], "s2c": []}
    )
    # The receive loop and the timer task both send; the lock keeps their
    # sends from racing for socket writability and keeps them in order.
    send_lock: trio.StrictFIFOLock = dataclasses.field(default_factory=trio.StrictFIFOLock)
    closed: bool = False
    # Datagrams dropped by Faults.loss, for Faults.max_losses.
    losses: dict[Direction, int] = dataclasses.field(default_factory=lambda: {"c2s": 0, "s2c": 0})


@dataclasses.dataclass(order=True)
class _Timer:
    deadline: float
    # Breaks ties in arrival order, so datagrams with equal delays stay in order.
    seq: int
    action: Callable[[], Awaitable[None]] = dataclasses.field(compare=False)


def _roll(rng: random.Random, probability: float) -> bool:
    # Not drawing for disabled faults keeps a direction with no faults from
    # consuming randomness at all.
    return probability > 0 and rng.random() < probability


def _flip_random_bit(data: bytes, rng: random.Random) -> bytes:
    corrupted = bytearray(data)
    corrupted[rng.randrange(len(corrupted))] ^= 1 << rng.randrange(8)
    return bytes(corrupted)


def _check_loopback_target(
    target: tuple[str, int],
) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """Return the target's IP address, or raise ValueError unless it is a loopback IP and port."""
    try:
        host, port = target
        if not isinstance(host, str):
            raise TypeError(host)
        ip = ipaddress.ip_address(host)
    except (TypeError, ValueError):
        raise ValueError(
            f"target must be a (loopback IP, port) pair like ('127.0.0.1', 4433), got {target!r}"
        ) from None
    if not ip.is_loopback:
        raise ValueError(f"the relay only sends to loopback addresses, not {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"target port must be an integer in 1-65535, got {port!r}")
    return ip


class FaultyRelay:
    """A UDP relay between clients and one server that injects faults.

    Create one with :func:`open_fault_relay`, point clients at
    :attr:`address`, and read :attr:`stats` and :attr:`events` to see what it
    did.  Change faults with :meth:`set_faults`, by assigning
    :attr:`client_to_server` / :attr:`server_to_client`, or by mutating them.
    """

    #: Where clients should send: the relay's own bound (numeric) address.
    address: tuple[str, int]
    #: The server the relay forwards to.
    target: tuple[str, int]
    #: Faults applied to datagrams from clients to the server.
    client_to_server: Faults
    #: Faults applied to datagrams from the server to clients.
    server_to_client: Faults
    #: Counters per direction, keyed ``"c2s"`` and ``"s2c"``.
    stats: dict[str, DirectionStats]
    #: The most recent decisions, oldest first (bounded by ``max_events``).
    events: collections.deque[RelayEvent]

    def __init__(
        self,
        *,
        listener: trio.socket.SocketType,
        target: tuple[str, int],
        client_to_server: Faults,
        server_to_client: Faults,
        seed: int | None,
        max_peers: int,
        idle_timeout: float,
        max_events: int,
        nursery: trio.Nursery,
    ) -> None:
        host, port = listener.getsockname()[:2]
        self.address = (host, port)
        self.target = target
        self.client_to_server = client_to_server
        self.server_to_client = server_to_client
        self.stats = {"c2s": DirectionStats(), "s2c": DirectionStats()}
        self.events = collections.deque(maxlen=max_events)
        # One generator per direction, so the decisions in one direction do not
        # depend on how traffic in the other direction interleaves with it.
        self._rngs: dict[Direction, random.Random] = {
            direction: random.Random() if seed is None else random.Random(f"{seed}/{direction}")
            for direction in ("c2s", "s2c")
        }
        self._listener = listener
        self._listener_lock = trio.StrictFIFOLock()
        self._max_peers = max_peers
        self._idle_timeout = idle_timeout
        self._nursery = nursery
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._timers: list[_Timer] = []
        self._timer_seq = 0
        self._timers_changed = trio.Event()
        self._held_count = 0

    @property
    def active_peers(self) -> int:
        """How many client addresses currently have an upstream socket."""
        return len(self._peers)

    def set_faults(
        self, *, c2s: Faults | None = None, s2c: Faults | None = None, both: Faults | None = None
    ) -> None:
        """Replace the faults for one or both directions, from the next datagram on.

        ``both`` gives each direction its own copy, so mutating one direction's
        faults later does not change the other's.
        """
        if both is not None:
            if c2s is not None or s2c is not None:
                raise ValueError("pass either both= or c2s=/s2c=, not both")
            c2s, s2c = dataclasses.replace(both), dataclasses.replace(both)
        if c2s is not None:
            self.client_to_server = c2s
        if s2c is not None:
            self.server_to_client = s2c

    # -- receiving ---------------------------------------------------------

    async def _receive_from_clients(self) -> None:
        while True:
            try:
                data, address = await self._listener.recvfrom(_MAX_DATAGRAM)
            except OSError as exc:
                logger.debug("relay %s: receive from clients failed: %r", self.address, exc)
                continue
            client = (address[0], address[1])
            peer = self._peers.get(client) or await self._open_peer(client)
            if peer is None:
                # _open_peer has logged why.
                self.stats["c2s"].received += 1
                self.stats["c2s"].dropped += 1
                self._record("c2s", "drop", client, len(data))
                continue
            peer.last_active = trio.current_time()
            await self._relay_datagram("c2s", peer, data)

    async def _open_peer(self, client: tuple[str, int]) -> _Peer | None:
        """Open an upstream socket for a new client, or log why not and return None."""
        if len(self._peers) >= self._max_peers:
            logger.warning(
                "relay %s: already relaying for max_peers=%d clients, dropping from %s",
                self.address,
                self._max_peers,
                client,
            )
            return None
        upstream = trio.socket.socket(self._listener.family, trio.socket.SOCK_DGRAM)
        try:
            await upstream.bind((self.address[0], 0))
            await upstream.connect(self.target)
        except OSError as exc:
            upstream.close()
            logger.warning("relay %s: cannot open upstream for %s: %r", self.address, client, exc)
            return None
        except BaseException:
            upstream.close()
            raise
        peer = _Peer(client=client, upstream=upstream, last_active=trio.current_time())
        self._peers[client] = peer
        logger.debug(
            "relay %s: client %s relayed from %s", self.address, client, upstream.getsockname()
        )
        self._nursery.start_soon(self._receive_from_server, peer)
        return peer

    async def _receive_from_server(self, peer: _Peer) -> None:
        try:
            while True:
                deadline = peer.last_active + self._idle_timeout
                if trio.current_time() >= deadline:
                    logger.debug("relay %s: client %s idle, closing", self.address, peer.client)
                    return
                data: bytes | None = None
                with trio.move_on_at(deadline):
                    try:
                        data = await peer.upstream.recv(_MAX_DATAGRAM)
                    except OSError as exc:
                        # Typically ECONNREFUSED: an ICMP error from a server
                        # that is not listening (yet, or any more).
                        logger.debug(
                            "relay %s: receive for %s failed: %r", self.address, peer.client, exc
                        )
                if data is not None:
                    peer.last_active = trio.current_time()
                    await self._relay_datagram("s2c", peer, data)
        finally:
            peer.closed = True
            if self._peers.get(peer.client) is peer:
                del self._peers[peer.client]
            for direction in ("c2s", "s2c"):
                self._held_count -= len(peer.held[direction])
                peer.held[direction] = []
            peer.upstream.close()

    # -- deciding ------------------------------------------------------------

    async def _relay_datagram(self, direction: Direction, peer: _Peer, data: bytes) -> None:
        """Apply this direction's faults to one datagram, in the documented order."""
        faults = self.client_to_server if direction == "c2s" else self.server_to_client
        rng = self._rngs[direction]
        stats = self.stats[direction]
        stats.received += 1
        size = len(data)

        if faults.blackhole:
            stats.blackholed += 1
            self._record(direction, "blackhole", peer.client, size)
            return
        if faults.mtu is not None and size > faults.mtu:
            stats.clamped += 1
            self._record(direction, "clamp", peer.client, size)
            return
        spared = faults.max_losses is not None and peer.losses[direction] >= faults.max_losses
        if not spared and _roll(rng, faults.loss):
            peer.losses[direction] += 1
            stats.dropped += 1
            self._record(direction, "drop", peer.client, size)
            return
        if size and _roll(rng, faults.corrupt):
            data = _flip_random_bit(data, rng)
            stats.corrupted += 1
            self._record(direction, "corrupt", peer.client, size)
        copies = 1
        if _roll(rng, faults.duplicate):
            copies = 2
            stats.duplicated += 1
            self._record(direction, "duplicate", peer.client, size)
        reorder = _roll(rng, faults.reorder)
        delay = faults.delay + (rng.uniform(0.0, faults.jitter) if faults.jitter else 0.0)

        if reorder:
            self._hold(direction, peer, _Held(data, copies, delay), faults.reorder_hold)
            return
        await self._dispatch(direction, peer, data, copies, delay)
        # This datagram is the "next datagram" that held ones wait for; they
        # are dispatched after it, so they arrive after it.
        await self._release_held(direction, peer)

    def _hold(self, direction: Direction, peer: _Peer, held: _Held, hold_for: float) -> None:
        if not self._has_room():
            self._drop(direction, peer.client, len(held.data), "too many pending datagrams")
            return
        held_list = peer.held[direction]
        held_list.append(held)
        self._held_count += 1
        self.stats[direction].reordered += 1
        self._record(direction, "reorder", peer.client, len(held.data))
        if len(held_list) == 1:

            async def release_if_still_held() -> None:
                if peer.held[direction] is held_list:
                    await self._release_held(direction, peer)

            self._schedule(trio.current_time() + hold_for, release_if_still_held)

    async def _release_held(self, direction: Direction, peer: _Peer) -> None:
        held_list = peer.held[direction]
        if not held_list:
            return
        peer.held[direction] = []
        self._held_count -= len(held_list)
        for held in held_list:
            await self._dispatch(direction, peer, held.data, held.copies, held.delay)

    # -- sending ---------------------------------------------------------------

    async def _dispatch(
        self, direction: Direction, peer: _Peer, data: bytes, copies: int, delay: float
    ) -> None:
        if delay <= 0:
            await self._send_copies(direction, peer, data, copies)
            return
        if not self._has_room():
            self._drop(direction, peer.client, len(data), "too many pending datagrams")
            return
        self._record(direction, "delay", peer.client, len(data))
        self._schedule(
            trio.current_time() + delay,
            functools.partial(self._send_copies, direction, peer, data, copies),
        )

    async def _send_copies(
        self, direction: Direction, peer: _Peer, data: bytes, copies: int
    ) -> None:
        for _ in range(copies):
            await self._send(direction, peer, data)

    async def _send(self, direction: Direction, peer: _Peer, data: bytes) -> None:
        try:
            if direction == "c2s":
                if peer.closed:
                    self._drop(direction, peer.client, len(data), "client's upstream was closed")
                    return
                async with peer.send_lock:
                    await peer.upstream.send(data)
            else:
                async with self._listener_lock:
                    await self._listener.sendto(data, peer.client)
        except OSError as exc:
            self._drop(direction, peer.client, len(data), f"send failed: {exc!r}")
            return
        self.stats[direction].delivered += 1
        self._record(direction, "pass", peer.client, len(data))

    # -- timers ----------------------------------------------------------------

    def _has_room(self) -> bool:
        return len(self._timers) + self._held_count < _MAX_PENDING

    def _schedule(self, deadline: float, action: Callable[[], Awaitable[None]]) -> None:
        self._timer_seq += 1
        heapq.heappush(self._timers, _Timer(deadline, self._timer_seq, action))
        self._timers_changed.set()

    async def _run_timers(self) -> None:
        # One task and a heap, rather than a task per delayed datagram, so
        # datagrams with equal deadlines go out in the order they were scheduled.
        while True:
            self._timers_changed = trio.Event()
            if self._timers:
                with trio.move_on_at(self._timers[0].deadline):
                    await self._timers_changed.wait()
            else:
                await self._timers_changed.wait()
            now = trio.current_time()
            while self._timers and self._timers[0].deadline <= now:
                await heapq.heappop(self._timers).action()

    # -- bookkeeping -------------------------------------------------------------

    def _drop(self, direction: Direction, client: tuple[str, int], size: int, reason: str) -> None:
        """Count and log a datagram the relay gave up on for a reason other than a fault."""
        self.stats[direction].dropped += 1
        logger.warning(
            "relay %s: %s dropped %d bytes for %s: %s",
            self.address,
            direction,
            size,
            client,
            reason,
        )
        self._record(direction, "drop", client, size)

    def _record(
        self, direction: Direction, action: str, client: tuple[str, int], size: int
    ) -> None:
        logger.debug(
            "relay %s: %s %s %d bytes for %s", self.address, direction, action, size, client
        )
        self.events.append(RelayEvent(trio.current_time(), direction, action, client, size))


@contextlib.asynccontextmanager
async def open_fault_relay(
    target: tuple[str, int],
    *,
    seed: int | None = 0,
    client_to_server: Faults | None = None,
    server_to_client: Faults | None = None,
    max_peers: int = 1024,
    idle_timeout: float = 60.0,
    max_events: int = 10_000,
) -> AsyncIterator[FaultyRelay]:
    """Run a :class:`FaultyRelay` in front of ``target`` for the duration of the block.

    Args:
      target: The server's ``(host, port)``; host must be a loopback IP literal
        (``127.0.0.0/8`` or ``::1``), or :exc:`ValueError` is raised.
      seed: Seeds the per-direction random generators; ``None`` for a fresh,
        unpredictable run.
      client_to_server, server_to_client: Initial faults; none by default.
      max_peers: At most this many clients are relayed at once; datagrams from
        further clients are dropped (and logged).
      idle_timeout: Close a client's upstream socket after this many seconds
        without a datagram in either direction.
      max_events: How many recent :class:`RelayEvent` to keep.

    The relay listens on ``127.0.0.1`` or ``::1`` (matching the target's
    family) on an ephemeral port.  Leaving the block cancels pending datagrams
    and closes every socket.
    """
    ip = _check_loopback_target(target)
    if max_peers < 1:
        raise ValueError(f"max_peers must be >= 1, got {max_peers!r}")
    if not idle_timeout > 0:
        raise ValueError(f"idle_timeout must be > 0, got {idle_timeout!r}")
    if max_events < 0:
        raise ValueError(f"max_events must be >= 0, got {max_events!r}")

    if ip.version == 4:
        family, bind_host = trio.socket.AF_INET, "127.0.0.1"
    else:
        family, bind_host = trio.socket.AF_INET6, "::1"
    listener = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
    with listener:
        await listener.bind((bind_host, 0))
        # An exception from the body is caught and re-raised after the nursery
        # has closed, so callers see it as raised rather than wrapped in the
        # ExceptionGroup a nursery would put around it.
        body_error: BaseException | None = None
        # Each client's upstream socket is closed by its own task (in a
        # finally), which the cancellation below ends.
        async with trio.open_nursery() as nursery:
            relay = FaultyRelay(
                listener=listener,
                target=(str(ip), target[1]),
                client_to_server=client_to_server or Faults(),
                server_to_client=server_to_client or Faults(),
                seed=seed,
                max_peers=max_peers,
                idle_timeout=idle_timeout,
                max_events=max_events,
                nursery=nursery,
            )
            nursery.start_soon(relay._receive_from_clients)
            nursery.start_soon(relay._run_timers)
            try:
                yield relay
            except BaseException as exc:
                body_error = exc
            finally:
                nursery.cancel_scope.cancel()
        if body_error is not None:
            raise body_error
