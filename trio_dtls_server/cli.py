"""The ``trio-dtls-server`` command: ``serve``, ``client`` and ``gen-certs``.

Its behaviour is a contract (docs: DESIGN.md, "The command-line contract"):

- ``serve`` prints exactly one stdout line, ``listening on HOST:PORT``, once it
  is ready; logs go to stderr. SIGINT/SIGTERM shut down gracefully (exit 0).
- A configuration mistake is one line on stderr and exit status 2, never a
  traceback.
- ``serve --workers N`` runs N worker processes (this command again, with a
  hidden ``--worker-index``) sharing the port with SO_REUSEPORT. The parent
  hands each its resolved settings as one JSON line on stdin (so keys never
  appear in the process list), reads its ``listening on`` line from its stdout,
  forwards signals as SIGTERM, and stops them all if one dies. A worker treats
  EOF on stdin as "the parent is gone" and shuts down.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from typing import Any, Final, NoReturn

import trio

from . import __version__
from ._certs import DEFAULT_HOSTS, development_certificates, generate_pki, parse_hosts
from ._cli_config import (
    SERVE_OPTIONS,
    ServeSettings,
    UsageError,
    add_serve_options,
    parse_psk,
    resolve_settings,
)
from ._client import connect_dtls
from ._config import DTLSClientConfig, DTLSServerConfig
from ._errors import ConfigError, HandshakeError
from ._server import DTLSServer, serve_dtls
from ._session import CloseReason, DTLSSession
from .apps import APPS, Handler

PROG: Final = "trio-dtls-server"

logger = logging.getLogger("trio_dtls_server.cli")

#: Library settings (``ConfigError.setting``) -> the option that sets them.
_SERVE_OPTION_OF: Final[Mapping[str, str]] = {
    **{option.dest: option.flag for option in SERVE_OPTIONS},
    "keylog_file": "--keylog",
    "psk_identity_hint": "--psk-hint",
}
_CLIENT_OPTION_OF: Final[Mapping[str, str]] = {"handshake_timeout": "--timeout"}

#: How long workers may take to report ready, and to exit after being told to.
_WORKER_START_TIMEOUT: Final = 60.0
_WORKER_STOP_MARGIN: Final = 10.0


# -- output ----------------------------------------------------------------------


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(message: str) -> None:
    """The one stderr line of a failed command (log records held until now are dropped)."""
    _error_reported()
    sys.stderr.write(f"{PROG}: error: {_one_line(message)}\n")
    sys.stderr.flush()


def _config_message(exc: ConfigError, options: Mapping[str, str]) -> str:
    """A library ConfigError, naming the option rather than the field where there is one."""
    option = options.get(exc.setting)
    return f"{option}: {exc.problem}" if option else str(exc)


def _os_error_text(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    return text[:1].lower() + text[1:]


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _announce(host: str, port: int) -> None:
    _release_logs()
    # The raw host, so that splitting on the last ':' gives host and port back.
    sys.stdout.write(f"listening on {host}:{port}\n")
    sys.stdout.flush()


class _Parser(argparse.ArgumentParser):
    """Reports a usage mistake as one line on stderr (exit status 2), not usage + error."""

    def error(self, message: str) -> NoReturn:
        _error(f"{message} (see '{self.prog} --help')")
        raise SystemExit(2)


# -- logging ---------------------------------------------------------------------


class _JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the session extras."""

    _EXTRAS: Final = ("session_id", "peer", "reason")

    def __init__(self, worker: int | None) -> None:
        super().__init__()
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, object] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in self._EXTRAS:
            value = getattr(record, name, None)
            if value is not None:
                data[name] = value
        if self._worker is not None:
            data["worker"] = self._worker
        if record.exc_info:
            data["exception"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


class _StartupLog(logging.Handler):
    """Holds log records until the server is ready.

    A configuration error must be the only line on stderr, but some errors only
    show when the server starts (the port in use), after warnings were logged
    (a development certificate, client authentication off): those are dropped
    then. Once the server is ready, they are written, and later records at once.
    """

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self.held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self.held is not None:
            self.held.append(record)
        else:
            self.target.handle(record)

    def write_held(self) -> None:
        held, self.held = self.held or [], None
        for record in held:
            self.target.handle(record)

    def drop_held(self) -> None:
        self.held = None


_startup_log: _StartupLog | None = None


def _setup_logging(
    log_format: str, level: str, *, worker: int | None = None, hold: bool = False
) -> None:
    """Log to stderr; with ``hold``, keep the records until :func:`_release_logs`."""
    global _startup_log
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JSONFormatter(worker))
    else:
        tag = f" [worker {worker}]" if worker is not None else ""
        text = f"%(asctime)s %(levelname)s{tag} %(name)s: %(message)s"
        handler.setFormatter(logging.Formatter(text))
    _startup_log = _StartupLog(handler) if hold else None
    root = logging.getLogger()
    root.handlers[:] = [_startup_log or handler]
    root.setLevel(level)


def _error_reported() -> None:
    """Someone (a worker) wrote the one line of a configuration error: drop held records."""
    if _startup_log is not None:
        _startup_log.drop_held()


def _release_logs() -> None:
    if _startup_log is not None:
        _startup_log.write_held()


# -- serve -----------------------------------------------------------------------


def _psk_only(settings: ServeSettings) -> bool:
    return bool(settings.psk) and not settings.client_ca and not settings.no_client_auth


def build_server_config(settings: ServeSettings) -> DTLSServerConfig:
    """The library configuration for ``settings`` (raises ConfigError)."""
    config = DTLSServerConfig(
        client_auth="none" if settings.no_client_auth else "required",
        psk_identity_hint=settings.psk_hint,
        handshake_timeout=settings.handshake_timeout,
        idle_timeout=settings.idle_timeout,
        max_sessions=settings.max_sessions,
        max_sessions_per_ip=settings.max_sessions_per_ip,
        evict_idle_after=settings.evict_idle_after,
        shutdown_grace=settings.shutdown_grace,
        max_queued_datagrams=settings.max_queued_datagrams,
        mtu=settings.mtu,
        read_lease=settings.read_lease,
        keylog_file=settings.keylog,
    )
    if settings.cert is not None:
        config.load_cert_chain(settings.cert, settings.key)
    for cafile in settings.client_ca:
        config.load_verify_locations(cafile)
    for identity, hexkey in settings.psk.items():
        config.add_psk_identity(identity, bytes.fromhex(hexkey))
    # PSK-only servers offer PSK suites only: the library sees to that.
    return config


async def _with_certificate(settings: ServeSettings) -> ServeSettings:
    """``settings`` with the development certificate if no --cert was given."""
    if settings.cert is not None or _psk_only(settings):
        return settings  # PSK suites use no certificate
    try:
        files, created = await trio.to_thread.run_sync(development_certificates)
    except (OSError, ValueError) as exc:
        text = _os_error_text(exc) if isinstance(exc, OSError) else str(exc)
        raise UsageError(
            f"cannot make the development certificate: {text}; give --cert and --key"
        ) from None
    if created:
        logger.info("generated a development CA and certificates in %s", files.directory)
    logger.warning(
        "no --cert given: using the development certificate %s (for %s only; not for "
        "production); clients trust it with the development CA %s",
        files.server_cert,
        ", ".join(DEFAULT_HOSTS),
        files.ca_cert,
    )
    return dataclasses.replace(settings, cert=str(files.server_cert), key=str(files.server_key))


def _make_handler(app: str) -> Handler:
    try:
        return APPS[app]()
    except ImportError as exc:
        raise UsageError(f"--app {app}: not available: {exc}") from None


async def _stop_on_signal(signals: AsyncIterator[int], stop: trio.Event, grace: float) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if stop.is_set():
            logger.info("%s received: already shutting down", name)
            continue
        logger.info("%s received: shutting down (handlers get %g s)", name, grace)
        stop.set()


async def _stop_when_parent_gone(stop: trio.Event) -> None:
    """A worker's stdin is a pipe from its parent: EOF means the parent is gone."""
    while await trio.to_thread.run_sync(os.read, 0, 4096, abandon_on_cancel=True):
        pass
    if not stop.is_set():
        logger.warning("the supervising process is gone: shutting down")
        stop.set()


async def _report_stats(server: DTLSServer, interval: float, worker: int | None) -> None:
    while True:
        await trio.sleep(interval)
        data: dict[str, object] = {} if worker is None else {"worker": worker}
        data.update(server.stats().as_dict())
        sys.stderr.write(f"stats {json.dumps(data)}\n")
        sys.stderr.flush()


async def _run_server(
    settings: ServeSettings, config: DTLSServerConfig, worker: int | None
) -> int:
    """Serve until SIGINT/SIGTERM (or, in a worker, until the parent is gone)."""
    handler = _make_handler(settings.app)
    # Open before announcing readiness, so that a signal right after it is ours.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async with trio.open_nursery() as nursery:
            try:
                server: DTLSServer = await nursery.start(
                    partial(
                        serve_dtls,
                        handler,
                        settings.port,
                        config=config,
                        host=settings.host,
                        reuse_port=worker is not None,
                    )
                )
            except ConfigError as exc:
                _error(_config_message(exc, _SERVE_OPTION_OF))
                return 2
            except OSError as exc:
                _error(
                    f"cannot bind {_host_port(settings.host, settings.port)}: "
                    f"{_os_error_text(exc)}"
                )
                return 2
            host, port = server.address
            logger.info("serving %s on %s", settings.app, _host_port(host, port))
            _announce(host, port)
            stop = trio.Event()
            nursery.start_soon(_stop_on_signal, signals, stop, settings.shutdown_grace)
            if worker is not None:
                nursery.start_soon(_stop_when_parent_gone, stop)
            if settings.stats_interval is not None:
                nursery.start_soon(_report_stats, server, settings.stats_interval, worker)
            await stop.wait()
            await server.aclose()
            nursery.cancel_scope.cancel()
    logger.info("stopped")
    return 0


async def _serve_main(settings: ServeSettings) -> int:
    settings = await _with_certificate(settings)
    config = build_server_config(settings)
    if settings.workers == 1:
        return await _run_server(settings, config, None)
    if settings.app == "chat":
        logger.warning(
            "--app chat with --workers %d: each worker has its own room", settings.workers
        )
    config.build_context()  # every check, before any worker starts
    return await _Supervisor(settings).run()


def _serve_command(args: argparse.Namespace) -> int:
    if args.worker_index is not None:
        return _worker_command(args.worker_index)
    given = {option.dest: getattr(args, option.dest) for option in SERVE_OPTIONS}
    settings, warnings = resolve_settings(given, args.config, os.environ)
    _setup_logging(settings.log_format, settings.log_level, hold=True)
    for warning in warnings:
        logger.warning("%s", warning)
    try:
        status = trio.run(_serve_main, settings)
    except (UsageError, ConfigError):
        raise
    except Exception:
        _release_logs()
        logger.critical("the server stopped on an unexpected error", exc_info=True)
        return 1
    if status == 2:  # a worker reported a configuration error: that is the one line
        _error_reported()
    _release_logs()  # e.g. stopped by a signal before it was ready
    return status


def _worker_command(index: int) -> int:
    line = sys.stdin.buffer.readline()
    if not line:
        _error(f"worker {index}: no settings on stdin (this option is for internal use)")
        return 2
    settings = ServeSettings.from_json(json.loads(line))
    _setup_logging(settings.log_format, settings.log_level, worker=index, hold=True)
    config = build_server_config(settings)
    try:
        status = trio.run(_run_server, settings, config, index)
    except Exception:
        _release_logs()
        logger.critical("the worker stopped on an unexpected error", exc_info=True)
        return 1
    _release_logs()
    return status


# -- serve --workers N: the supervising process ------------------------------------------


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


@dataclasses.dataclass
class _Worker:
    index: int
    process: trio.Process
    ready: bool = False

    @property
    def running(self) -> bool:
        return self.process.returncode is None


class _Supervisor:
    """Runs ``settings.workers`` worker processes on one port and speaks for them.

    Worker 0 starts first: it learns the port when ``--port 0``, and a
    configuration error (such as the port in use) is then reported once, by it,
    rather than by every worker. The others start once it is ready.
    """

    def __init__(self, settings: ServeSettings) -> None:
        self.settings = settings
        self.workers: list[_Worker] = []
        self.address: tuple[str, int] | None = None
        self.ready = False
        self.stopping = False
        self.status = 0
        self._events_in, self._events = trio.open_memory_channel[tuple[Any, ...]](math.inf)

    async def run(self) -> int:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._forward, signals)
                    nursery.start_soon(self._post_after, _WORKER_START_TIMEOUT, "start-timeout")
                    await self._spawn(0, self.settings.port)
                    async for event in self._events:
                        await self._handle(*event)
                        if self.stopping and not any(w.running for w in self.workers):
                            break
                    nursery.cancel_scope.cancel()
            finally:
                with trio.CancelScope(shield=True):
                    for worker in self.workers:
                        process = worker.process
                        if process.returncode is None:
                            process.kill()
                        await process.wait()
                        for pipe in (process.stdin, process.stdout):
                            if pipe is not None:
                                await pipe.aclose()
        return self.status

    async def _forward(self, signals: AsyncIterator[int]) -> None:
        async for signum in signals:
            await self._events_in.send(("signal", signum))

    async def _post_after(self, delay: float, event: str) -> None:
        await trio.sleep(delay)
        await self._events_in.send((event,))

    async def _spawn(self, index: int, port: int) -> None:
        process = await trio.lowlevel.open_process(
            [sys.executable, "-m", "trio_dtls_server", "serve", "--worker-index", str(index)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            # Terminal signals (Ctrl-C) go to this process only; it forwards them.
            start_new_session=True,
        )
        worker = _Worker(index, process)
        self.workers.append(worker)
        logger.info("started worker %d (pid %d)", index, process.pid)
        self._nursery.start_soon(self._read_ready, worker)
        self._nursery.start_soon(self._reap, worker)
        settings = dataclasses.replace(self.settings, port=port)
        assert process.stdin is not None
        # The pipe stays open: the worker stops when it closes.
        await process.stdin.send_all(json.dumps(settings.to_json()).encode() + b"\n")

    async def _read_ready(self, worker: _Worker) -> None:
        assert worker.process.stdout is not None
        data = b""
        while b"\n" not in data:
            chunk = await worker.process.stdout.receive_some()
            if not chunk:
                return  # it exited; _reap reports that
            data += chunk
        line = data.split(b"\n", 1)[0].decode(errors="replace")
        match = re.fullmatch(r"listening on (.+):(\d+)", line)
        if match is None:
            logger.error("worker %d said %r instead of 'listening on'", worker.index, line)
            return
        await self._events_in.send(("ready", worker.index, match[1], int(match[2])))

    async def _reap(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        await self._events_in.send(("exited", worker.index, code))

    def _stop(self, status: int) -> None:
        if self.status == 0:
            self.status = status
        if self.stopping:
            return
        self.stopping = True
        for worker in self.workers:
            if worker.running:
                worker.process.send_signal(signal.SIGTERM)
        limit = self.settings.shutdown_grace + _WORKER_STOP_MARGIN
        self._nursery.start_soon(self._post_after, limit, "stop-timeout")

    async def _handle(self, kind: str, *details: Any) -> None:
        if kind == "ready":
            index, host, port = details
            self.workers[index].ready = True
            logger.info("worker %d listening on %s", index, _host_port(host, port))
            if self.stopping:
                return
            if index == 0:
                self.address = (host, port)
                for other in range(1, self.settings.workers):
                    await self._spawn(other, port)
            if len(self.workers) == self.settings.workers and all(w.ready for w in self.workers):
                assert self.address is not None
                self.ready = True
                _announce(*self.address)
        elif kind == "exited":
            index, code = details
            worker = self.workers[index]
            if self.stopping:
                # SIGTERM before a worker had set up its handlers kills it: fine.
                if code not in (0, -signal.SIGTERM):
                    logger.error(
                        "worker %d (pid %d) %s", index, worker.process.pid, _describe_exit(code)
                    )
                    self._stop(1)
            elif code == 2 and not worker.ready:
                self._stop(2)  # a configuration error, which it reported on stderr
            else:
                logger.error(
                    "worker %d (pid %d) %s; stopping the others",
                    index,
                    worker.process.pid,
                    _describe_exit(code),
                )
                self._stop(1)
        elif kind == "signal":
            name = signal.Signals(details[0]).name
            if self.stopping:
                logger.info("%s received: already stopping the workers", name)
            else:
                logger.info("%s received: stopping %d worker(s)", name, len(self.workers))
                self._stop(0)
        elif kind == "start-timeout":
            if not self.ready and not self.stopping:
                logger.error("the workers were not ready within %g s", _WORKER_START_TIMEOUT)
                self._stop(1)
        elif kind == "stop-timeout":
            for worker in self.workers:
                if worker.running:
                    logger.error(
                        "worker %d (pid %d) did not stop in time: killing it",
                        worker.index,
                        worker.process.pid,
                    )
                    worker.process.kill()
                    self.status = 1


# -- client ------------------------------------------------------------------------


def _client_config(args: argparse.Namespace) -> DTLSClientConfig:
    if args.ca is not None and args.no_verify:
        raise UsageError("--ca and --no-verify contradict each other")
    if args.key is not None and args.cert is None:
        raise UsageError("--key needs --cert")
    config = DTLSClientConfig(handshake_timeout=args.timeout, verify_server=not args.no_verify)
    if args.ca is not None:
        config.load_verify_locations(args.ca)
    elif not args.no_verify:
        files, _ = development_certificates(create=False)
        if files.ca_cert.is_file():
            config.load_verify_locations(files.ca_cert)
    if args.cert is not None:
        config.load_cert_chain(args.cert, args.key)
    if args.psk is not None:
        config.set_psk(*parse_psk(args.psk, "--psk"))
    return config


class _Exchange:
    """Counts datagrams each way, and wakes whoever waits when something happens."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.ended: CloseReason | None = None
        self.last = trio.current_time()
        self._changed = trio.Event()

    def touch(self) -> None:
        self.last = trio.current_time()
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_replies(self, timeout: float) -> None:
        """Until every datagram sent has had a reply, or ``timeout`` s pass without traffic."""
        while self.received < self.sent and self.ended is None:
            deadline = self.last + timeout
            if trio.current_time() >= deadline:
                return
            with trio.move_on_at(deadline):
                await self._changed.wait()


async def _print_replies(
    session: DTLSSession, exchange: _Exchange, done: trio.CancelScope
) -> None:
    async for datagram in session:
        exchange.received += 1
        exchange.touch()
        try:
            sys.stdout.write(datagram.decode("utf-8", errors="replace") + "\n")
            sys.stdout.flush()
        except BrokenPipeError:
            # Nobody reads any more; keep the interpreter's final flush quiet.
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            break
    exchange.ended = session.close_reason or CloseReason.PEER_CLOSED
    exchange.touch()
    done.cancel()


async def _send_line(session: DTLSSession, exchange: _Exchange, line: bytes) -> bool:
    """Send one line; False once the session cannot send any more."""
    line = line.removesuffix(b"\r")
    if not line:
        return True  # DTLS has no empty datagram
    try:
        await session.send(line)
    except ValueError as exc:
        logger.warning("line not sent: %s", exc)
        return True
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    exchange.sent += 1
    exchange.touch()
    return True


async def _send_stdin(session: DTLSSession, exchange: _Exchange) -> None:
    if sys.stdin is None:
        return
    fd = sys.stdin.fileno()
    pending = b""
    while True:
        # A thread, abandoned if we stop first: stdin may be a terminal, a pipe
        # or a file, and a read from it cannot be cancelled.
        chunk = await trio.to_thread.run_sync(os.read, fd, 65536, abandon_on_cancel=True)
        if not chunk:
            break
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            if not await _send_line(session, exchange, line):
                return
    if pending:
        await _send_line(session, exchange, pending)


async def _client_main(args: argparse.Namespace, config: DTLSClientConfig) -> int:
    try:
        session = await connect_dtls(
            args.host, args.port, config, server_hostname=args.server_name
        )
    except HandshakeError as exc:
        _error(str(exc))
        return 1
    except OSError as exc:
        _error(f"cannot reach {_host_port(args.host, args.port)}: {_os_error_text(exc)}")
        return 1
    exchange = _Exchange()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_print_replies, session, exchange, nursery.cancel_scope)
        await _send_stdin(session, exchange)
        await exchange.wait_for_replies(args.reply_timeout)
        nursery.cancel_scope.cancel()
    await session.aclose()
    if exchange.ended not in (None, CloseReason.PEER_CLOSED):
        _error(f"the session ended: {exchange.ended}")
        return 1
    return 0


def _client_command(args: argparse.Namespace) -> int:
    _setup_logging("text", "WARNING")
    config = _client_config(args)
    return trio.run(_client_main, args, config)


# -- gen-certs -----------------------------------------------------------------------


def _gen_certs_command(args: argparse.Namespace) -> int:
    try:
        hosts = parse_hosts(args.hosts)
    except ValueError as exc:
        raise UsageError(f"--hosts: {exc}") from None
    try:
        files = generate_pki(args.directory, hosts=hosts)
    except OSError as exc:
        _error(f"cannot write to {args.directory!r}: {_os_error_text(exc)}")
        return 1
    for path, what in (
        (
            files.ca_cert,
            "CA certificate: for client --ca and serve --client-ca",
        ),
        (files.ca_key, "CA private key: keep it secret"),
        (files.server_cert, "server certificate for " + ", ".join(hosts)),
        (files.server_key, "server private key"),
        (files.client_cert, "client certificate"),
        (files.client_key, "client private key"),
    ):
        print(f"wrote {path} ({what})")
    return 0


# -- the command line --------------------------------------------------------------------

_SERVE_EPILOG = """\
client authentication is an explicit choice: give --client-ca, --psk/--psk-file,
or --no-client-auth. With PSK only, only PSK cipher suites are offered and no
certificate is used.

Once ready, serve prints one line on stdout, 'listening on HOST:PORT' (the
actual port); logs go to stderr. SIGINT or SIGTERM: close_notify to every
session, handlers get --shutdown-grace seconds, exit status 0.

--config FILE.toml takes the long options as keys (with '-' or '_'):
    port = 0
    handshake-timeout = 5
    client-ca = "ca.pem"
    psk = ["device-1:000102030405060708090a0b0c0d0e0f"]
The command line wins over the file (a repeatable option's list replaces the
file's); relative paths in the file are relative to its directory.

Without --cert, a development certificate for localhost, 127.0.0.1 and ::1 is
made on first use in $TRIO_DTLS_SERVER_CERT_DIR, else <source checkout>/certs,
else ~/.local/share/trio-dtls-server/certs; its ca.pem is what clients trust.

exit status: 0 after a graceful shutdown, 2 for a configuration error (one
line on stderr), 1 if the server fails."""

_CLIENT_EPILOG = """\
Sends each line of stdin (without its newline; empty lines are skipped) as one
datagram and prints each datagram received as one line on stdout. At the end
of stdin it waits until as many replies as lines sent have arrived, or until
--reply-timeout seconds pass without traffic, then closes (close_notify).

Server verification: with --ca, against that CA; without it, against the
development CA that 'serve' makes (see 'serve --help') if it exists, else
the system's CAs; --no-verify turns it off. The certificate must name HOST
(or --server-name).

exit status: 0 when done or when the server closed the session, 1 if the
handshake fails or the session breaks, 2 for a usage error."""


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Serve DTLS (TLS over UDP) with trio, talk to DTLS servers, make certs.",
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common: dict[str, Any] = {
        "allow_abbrev": False,
        "formatter_class": argparse.RawDescriptionHelpFormatter,
    }

    serve = commands.add_parser(
        "serve",
        help="run a DTLS server",
        description="Run a DTLS 1.2 server with a ready-made app.",
        epilog=_SERVE_EPILOG,
        **common,
    )
    serve.add_argument(
        "--config", metavar="FILE.toml", help="read settings from a TOML file (see below)"
    )
    add_serve_options(serve)
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    serve.set_defaults(run=_serve_command)

    client = commands.add_parser(
        "client",
        help="send stdin lines to a DTLS server, print its replies",
        description="Open a DTLS session, send stdin lines as datagrams, print the replies.",
        epilog=_CLIENT_EPILOG,
        **common,
    )
    client.add_argument("host", metavar="HOST")
    client.add_argument("port", metavar="PORT", type=int)
    client.add_argument("--ca", metavar="PEM", help="trust server certificates from this CA")
    client.add_argument("--cert", metavar="PEM", help="client certificate chain")
    client.add_argument("--key", metavar="PEM", help="its private key (default: in --cert)")
    client.add_argument("--psk", metavar="IDENTITY:HEXKEY", help="authenticate with a PSK")
    client.add_argument(
        "--server-name",
        metavar="NAME",
        help="name the server certificate must have (default: HOST)",
    )
    client.add_argument(
        "--no-verify", action="store_true", help="do not verify the server (testing only)"
    )
    client.add_argument(
        "--timeout", metavar="S", type=float, default=10.0, help="handshake timeout (default: 10)"
    )
    client.add_argument(
        "--reply-timeout",
        metavar="S",
        type=float,
        default=2.0,
        help="at the end of stdin, wait at most S seconds after the last datagram (default: 2)",
    )
    client.set_defaults(run=_client_command)

    gen_certs = commands.add_parser(
        "gen-certs",
        help="write a development CA, server and client certificates",
        description=(
            "Write ca.pem ca.key server.pem server.key client.pem client.key (ECDSA P-256) "
            "to DIRECTORY. For development and tests only: never trust ca.pem system-wide."
        ),
        **common,
    )
    gen_certs.add_argument("directory", metavar="DIRECTORY")
    gen_certs.add_argument(
        "--hosts",
        default=",".join(DEFAULT_HOSTS),
        help="comma-separated names and addresses for the server certificate "
        "(default: %(default)s)",
    )
    gen_certs.set_defaults(run=_gen_certs_command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns its exit status (console script and ``python -m``)."""
    parser = _build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error already reported
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    options = _CLIENT_OPTION_OF if args.command == "client" else _SERVE_OPTION_OF
    try:
        status: int = args.run(args)
    except UsageError as exc:
        _error(str(exc))
        return 2
    except ConfigError as exc:
        _error(_config_message(exc, options))
        return 2
    except KeyboardInterrupt:
        return 130
    return status
