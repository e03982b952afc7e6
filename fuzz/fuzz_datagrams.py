"""Atheris fuzz target: every datagram a server can receive, through ``DTLSServer._dispatch``.

The task reading the socket hands each datagram to ``DTLSServer._dispatch(datagram, address)``
synchronously and, as a last line of defence, logs and contains any exception
that escapes it. This target calls ``_dispatch`` directly instead, so that any
exception escaping it reaches libFuzzer as a crash, with the input that caused it.

A real server runs (``serve_dtls`` on a loopback socket, in a trio run on a
background thread): session tasks, handshake and idle timeouts, eviction and the
socket's reading all work as in production. Each input is dispatched on that trio
thread, as the reading task would, then the server's tables are checked. A number
taken from the input (atheris' FuzzedDataProvider takes numbers from its end, bytes
from its start) picks where the rest goes:

0. raw, from a stranger address (the cookie exchange; no state may be kept);
1. raw, from an established session's own address (``DTLSSession._on_datagram``);
2. raw, from a session in its handshake (OpenSSL's handshake state machine);
3. as a ClientHello from a stranger with its cookie fixed up to be valid, so
   that it gets past the stateless check into ``DTLSv1_listen`` and a session;
4. a real ClientHello mutated at input-chosen offsets, cookie fixed up, from a stranger;
5. as the body of a record (input-chosen type, epoch and sequence number, correct
   length) into the established session;
6. as application data encrypted by the established client (a valid record);
7. a mutated ClientHello, cookie fixed up, from the address of another established
   session (replacement by a new handshake; that session is set up again when needed);
8. a mutated ClientHello as is, from a stranger (mostly the stateless cookie exchange).

Detected as crashes: an exception escaping ``_dispatch``; a server table that
breaks its invariants or its bounds; handshake counters that disagree; an ERROR
logged by the server (a handler error, an internal error); the server's trio run
ending.

Run it:  python fuzz/fuzz_datagrams.py -max_total_time=600 [corpus_dir]   (see fuzz/README.md)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import sys
import tempfile
import threading
from collections.abc import Callable
from functools import partial
from typing import Any

import atheris  # type: ignore[import-untyped]

with atheris.instrument_imports(include=["trio_dtls_server"]):
    import trio
    from OpenSSL import SSL

    from trio_dtls_server import DTLSServer, serve_dtls
    from trio_dtls_server._records import BadRecord, parse_client_hello
    from trio_dtls_server._session import DTLSSession
    from trio_dtls_server.testing import (
        TestPKI,
        drain_bio,
        drain_socket,
        echo_handler,
        splice_cookie,
    )
    from trio_dtls_server.testing._harness import CLIENT_HELLO_SESSION_ID_AT

_MODES = 9
#: How often each mode is picked: replacing the established session (7) costs a new
#: handshake to set it up again, so it gets one draw in sixteen.
_MODE_DRAWS = (0, 0, 1, 1, 1, 2, 2, 3, 4, 4, 5, 5, 6, 6, 8, 7)
#: A payload that makes the injected bug fire (see FUZZ_DATAGRAMS_INJECT_BUG below).
INJECTED_BUG_MARKER = b"INJECTED-BUG"


def _loopback_socket(host: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((host, 0))
    sock.setblocking(False)
    return sock


class _Peer:
    """A client at a real loopback address whose datagrams we dispatch by hand."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.sock = _loopback_socket(host)
        self.address: tuple[str, int] = self.sock.getsockname()
        self.conn: SSL.Connection | None = None
        #: The last session's ticket: setting up again resumes it (a cheaper handshake).
        self.ticket: SSL.Session | None = None


class Harness:
    """A live server, plus peers in each state, and ``one_input`` to feed it."""

    def __init__(self) -> None:
        self._directory = tempfile.TemporaryDirectory(prefix="fuzz-dtls-")
        self.pki = TestPKI.create(self._directory.name)
        self.config = self.pki.server_config(
            handshake_timeout=1.0,
            idle_timeout=3.0,
            max_sessions=12,
            max_sessions_per_ip=4,
            evict_idle_after=0.5,
            shutdown_grace=0.5,
            max_queued_datagrams=8,
        )
        self._client_context = self.pki.client_config().build_context()
        self.template = self._first_client_hello()
        self.established = _Peer()
        self.handshaking = _Peer()
        # Another established session, the one mode 7 replaces (set up again as needed).
        self.replaced = _Peer()
        # Strangers from other source IPs (127.0.0.0/8 is all loopback): more than
        # max_sessions_per_ip from 127.0.0.2, more than max_sessions in all.
        self.strangers = [_Peer(f"127.0.0.{ip}") for ip in (2, 2, 2, 2, 2, 2, 3, 3, 3, 4, 4, 4)]
        self.errors: list[str] = []
        self.failure: BaseException | None = None
        self.server: DTLSServer | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._ready = threading.Event()
        self._inputs = 0
        self._by_mode = [0] * _MODES
        logging.getLogger("trio_dtls_server").addHandler(_ErrorCollector(self.errors))
        thread = threading.Thread(target=self._run, name="dtls-server", daemon=True)
        thread.start()
        if not self._ready.wait(30) or self.failure is not None:
            raise RuntimeError(f"the server did not start: {self.failure!r}")

    # -- the server's trio run --------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._serve)
        except BaseException as exc:
            self.failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        async with trio.open_nursery() as nursery:
            self.server = await nursery.start(
                partial(serve_dtls, echo_handler, 0, config=self.config)
            )
            self._token = trio.lowlevel.current_trio_token()
            self._ready.set()
            await trio.sleep_forever()

    # -- one input ----------------------------------------------------------------

    def one_input(self, data: bytes) -> None:
        if self.failure is not None:
            raise RuntimeError("the server's trio run ended") from self.failure
        trio.from_thread.run_sync(self._dispatch_one, data, trio_token=self._token)

    def _dispatch_one(self, data: bytes) -> None:
        """Runs on the server's trio thread, like the task reading the socket."""
        server = self.server
        assert server is not None
        self._inputs += 1
        if self._inputs % 64 == 0:
            for each in (self.established, self.handshaking, self.replaced, *self.strangers):
                drain_socket(each.sock)
        fdp = atheris.FuzzedDataProvider(data)
        mode = _MODE_DRAWS[fdp.ConsumeIntInRange(0, len(_MODE_DRAWS) - 1)]
        self._by_mode[mode] += 1
        if self._inputs & (self._inputs - 1) == 0 and self._inputs >= 1024:
            self._report(server)
        stranger = self.strangers[fdp.ConsumeIntInRange(0, len(self.strangers) - 1)]
        if mode in (4, 7, 8):
            datagram = self._mutated_template(fdp)
        elif mode == 5:
            datagram = self._record(fdp)
        else:
            datagram = fdp.ConsumeBytes(fdp.remaining_bytes())

        if mode in (0, 3, 4, 8):
            address = stranger.address
            if mode in (3, 4):
                datagram = self._with_valid_cookie(datagram, address)
        else:
            target = {2: self.handshaking, 7: self.replaced}.get(mode, self.established)
            peer = self._ensure(target)
            if peer is None:
                return  # refused at max_sessions: no such session for now
            address = peer.address
            if mode == 6:
                if not datagram:
                    return  # DTLS has no empty application datagram
                assert peer.conn is not None
                peer.conn.write(datagram[:16384])
                datagram = drain_bio(peer.conn)
            elif mode == 7:
                datagram = self._with_valid_cookie(datagram, address)
        server._dispatch(datagram, address)
        self._check(server)

    def _with_valid_cookie(self, datagram: bytes, address: Any) -> bytes:
        try:
            hello = parse_client_hello(datagram)
        except BadRecord:
            return datagram
        assert self.server is not None
        spliced = splice_cookie(datagram, self.server._cookies.make(address, hello))
        return datagram if spliced is None else spliced

    def _mutated_template(self, fdp: Any) -> bytes:
        out = bytearray(self.template)
        for _ in range(fdp.ConsumeIntInRange(0, 8)):
            at = fdp.ConsumeIntInRange(0, len(out) - 1)
            out[at] = fdp.ConsumeInt(1) & 0xFF
        # A new ClientHello.random for each input, or the server takes it for a copy.
        random_at = CLIENT_HELLO_SESSION_ID_AT - 32
        out[random_at:CLIENT_HELLO_SESSION_ID_AT] = hashlib.sha256(b"%d" % self._inputs).digest()
        cut = fdp.ConsumeIntInRange(0, len(out))
        tail: bytes = fdp.ConsumeBytes(fdp.remaining_bytes())
        return bytes(out[:cut]) + tail

    def _record(self, fdp: Any) -> bytes:
        content_type: int = fdp.ConsumeIntInRange(19, 25)
        epoch: int = fdp.ConsumeIntInRange(0, 2)
        sequence: int = fdp.ConsumeIntInRange(0, 2**48 - 1)
        body: bytes = fdp.ConsumeBytes(fdp.remaining_bytes())
        return (
            bytes((content_type,))
            + b"\xfe\xfd"
            + epoch.to_bytes(2, "big")
            + sequence.to_bytes(6, "big")
            + len(body).to_bytes(2, "big")
            + body
        )

    # -- peers in a known state -------------------------------------------------

    def _ensure(self, peer: _Peer) -> _Peer | None:
        """``peer`` with a session in its state (handshaking, or established), set up
        anew if need be; None if the server refused it (its tables are full)."""
        assert self.server is not None
        session = self.server._by_address.get(peer.address)
        if peer is self.handshaking:
            ready = session is not None and not session.is_established
        else:
            ready = session is not None and session.is_established and peer.conn is not None
        if ready:
            return peer
        refused = self.server.stats().sessions_refused
        peer.conn = self._handshake(peer, until_established=peer is not self.handshaking)
        if peer.conn is None:
            if self.server.stats().sessions_refused > refused:
                return None
            raise AssertionError(f"no session for {peer.address}, and none refused")
        return peer

    def _handshake(self, peer: _Peer, *, until_established: bool) -> SSL.Connection | None:
        """Drive a client handshake by hand: its datagrams go straight to _dispatch."""
        server = self.server
        assert server is not None
        drain_socket(peer.sock)
        conn = SSL.Connection(self._client_context.context, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(1400)
        if until_established and peer.ticket is not None:
            conn.set_session(peer.ticket)
        for _ in range(8):
            try:
                conn.do_handshake()
                done = True
            except SSL.WantReadError:
                done = False
            outgoing = drain_bio(conn)
            if outgoing:
                server._dispatch(outgoing, peer.address)
            session = server._by_address.get(peer.address)
            if (
                session is not None
                and session.client_random == conn.client_random()
                and (not until_established or (done and session.is_established))
            ):
                if done:
                    peer.ticket = conn.get_session()
                return conn
            for datagram in drain_socket(peer.sock):
                conn.bio_write(datagram)
        return None

    def _first_client_hello(self) -> bytes:
        conn = SSL.Connection(self._client_context.context, None)
        conn.set_connect_state()
        conn.set_ciphertext_mtu(1400)
        with contextlib.suppress(SSL.WantReadError):
            conn.do_handshake()
        return drain_bio(conn)

    def _report(self, server: DTLSServer) -> None:
        """A progress line on stderr: inputs per mode, and the server's counters."""
        stats = {name: value for name, value in server.stats().as_dict().items() if value}
        print(
            f"fuzz_datagrams: {self._inputs} inputs, by mode {self._by_mode}; server {stats}",
            file=sys.stderr,
            flush=True,
        )

    # -- what must hold after every datagram ----------------------------------------

    def _check(self, server: DTLSServer) -> None:
        if self.errors:
            raise AssertionError(f"the server logged an error: {self.errors[0]}")
        by_address = server._by_address
        assert len(by_address) <= self.config.max_sessions, len(by_address)
        for address, session in by_address.items():
            assert session.peer_address == address, (address, session)
            assert session.close_reason is None, session
        for address, session in server._lru.items():
            assert by_address.get(address) is session, ("_lru", address, session)
            assert session.is_established, session
        per_ip = self.config.max_sessions_per_ip
        assert per_ip is not None
        assert sum(len(s) for s in server._by_ip.values()) == len(by_address)
        for ip, sessions in server._by_ip.items():
            assert 0 < len(sessions) <= per_ip, (ip, len(sessions))
            for session in sessions:
                assert by_address.get(session.peer_address) is session, ("_by_ip", session)
        # Every handshake ends exactly one way, so no counter can run behind.
        stats = server.stats()
        assert stats.handshakes_active >= 0, stats
        assert stats.sessions_active <= stats.handshakes_completed, stats


class _ErrorCollector(logging.Handler):
    def __init__(self, errors: list[str]) -> None:
        super().__init__(logging.ERROR)
        self._errors = errors

    def emit(self, record: logging.LogRecord) -> None:
        self._errors.append(record.getMessage())


def _inject_bug() -> None:
    """FUZZ_DATAGRAMS_INJECT_BUG=1: a planted bug, to show that the target catches one."""
    original: Callable[[DTLSSession, bytes], None] = DTLSSession._on_datagram

    def buggy(self: DTLSSession, datagram: bytes) -> None:
        if INJECTED_BUG_MARKER in datagram:
            raise IndexError("injected bug")
        original(self, datagram)

    DTLSSession._on_datagram = buggy  # type: ignore[method-assign]


def main(argv: list[str]) -> None:
    if os.environ.get("FUZZ_DATAGRAMS_INJECT_BUG") == "1":
        _inject_bug()
    harness = Harness()
    atheris.Setup(argv, harness.one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main(sys.argv)
