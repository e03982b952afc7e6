"""The settings of ``trio-dtls-server serve``: one table of options, from the
command line and from a TOML file, merged into one :class:`ServeSettings`.

The option table is the single source for both: argparse options are made from
it, and a config file may use exactly its keys (``handshake-timeout`` or
``handshake_timeout``). The command line wins over the file, key by key; for a
repeatable option (``--psk``, ``--client-ca``) the command line's list replaces
the file's. Relative paths in a file are relative to the file's directory.

Every problem raises :class:`UsageError` with a one-line message.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import stat
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from ._config import DTLSServerConfig
from .apps import APPS

_T = TypeVar("_T")


class UsageError(Exception):
    """A mistake in the command line, a config file or a file they name (exit status 2)."""


Kind = Literal["str", "path", "port", "count", "seconds", "flag", "strs", "paths", "choice"]

_LIBRARY_DEFAULTS: Final[Mapping[str, Any]] = {
    f.name: f.default for f in dataclasses.fields(DTLSServerConfig)
}

LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclasses.dataclass(frozen=True)
class Option:
    """One ``serve`` option: its long name, what values it takes, its help."""

    name: str
    kind: Kind
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] = ()

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    @property
    def flag(self) -> str:
        return "--" + self.name


def _default(name: str) -> str:
    return f"(default: {_LIBRARY_DEFAULTS[name]})"


SERVE_OPTIONS: Final[tuple[Option, ...]] = (
    Option("host", "str", "address to bind, '::' for IPv6 and IPv4 (default: 127.0.0.1)"),
    Option("port", "port", "UDP port; 0 picks a free one (default: 4433)"),
    Option(
        "cert",
        "path",
        "server certificate chain, PEM (default: a development certificate, "
        "generated on first use; see TRIO_DTLS_SERVER_CERT_DIR below)",
        "PEM",
    ),
    Option("key", "path", "private key of --cert, PEM (default: in the --cert file)", "PEM"),
    Option(
        "client-ca",
        "paths",
        "require client certificates signed by the CA in this PEM file (repeatable)",
        "PEM",
    ),
    Option(
        "psk",
        "strs",
        "accept this PSK identity with this key in hex (repeatable); the last ':' "
        "separates the key. Keys on the command line show in the process list: "
        "prefer --psk-file",
        "IDENTITY:HEXKEY",
    ),
    Option(
        "psk-file",
        "path",
        "PSK identities, one 'identity:hexkey' per line ('#' comments and blank lines allowed)",
        "FILE",
    ),
    Option("psk-hint", "str", "PSK identity hint sent to clients", "TEXT"),
    Option(
        "no-client-auth",
        "flag",
        "accept clients that do not authenticate at all (logs a warning)",
    ),
    Option(
        "app",
        "choice",
        "what to do with datagrams: echo them back; ack them like Qt's secureudpserver "
        "('to (ADDR:PORT): ACK'); chat: send each to every other session (default: echo)",
        choices=tuple(APPS),
    ),
    Option(
        "handshake-timeout",
        "seconds",
        "bound on one handshake " + _default("handshake_timeout"),
        "S",
    ),
    Option(
        "idle-timeout",
        "seconds",
        "end a session that received nothing for S seconds; 0 disables "
        + _default("idle_timeout"),
        "S",
    ),
    Option(
        "max-sessions",
        "count",
        "bound on sessions, handshaking and established " + _default("max_sessions"),
        "N",
    ),
    Option("max-sessions-per-ip", "count", "bound on sessions per source IP (default: none)", "N"),
    Option(
        "evict-idle-after",
        "seconds",
        "at a session bound, a session idle this long may make room for a new one "
        + _default("evict_idle_after"),
        "S",
    ),
    Option(
        "max-queued-datagrams",
        "count",
        "datagrams held for a handler that is behind; more are dropped "
        + _default("max_queued_datagrams"),
        "N",
    ),
    Option(
        "mtu",
        "count",
        "largest UDP payload to send, in bytes (default: 1472 on IPv4, 1452 on IPv6)",
        "BYTES",
    ),
    Option(
        "read-lease",
        "seconds",
        "longest a datagram no task waits for can go unread while the handler that read "
        "the socket last is busy; 0: the receive loop reads every datagram "
        + _default("read_lease"),
        "S",
    ),
    Option(
        "workers",
        "count",
        "processes sharing the port with SO_REUSEPORT (default: 1)",
        "N",
    ),
    Option(
        "shutdown-grace",
        "seconds",
        "time handlers get on SIGINT/SIGTERM " + _default("shutdown_grace"),
        "S",
    ),
    Option(
        "stats-interval",
        "seconds",
        "every S seconds, write one stderr line 'stats {json}' with the counters (default: off)",
        "S",
    ),
    Option(
        "keylog",
        "path",
        "append session secrets to FILE in NSS key log format, for Wireshark; debugging "
        "only (default: $SSLKEYLOGFILE if set)",
        "FILE",
    ),
    Option(
        "log-format",
        "choice",
        "text, or json: one JSON object per line (default: text)",
        choices=("text", "json"),
    ),
    Option(
        "log-level",
        "choice",
        "least severe log level shown (default: INFO)",
        choices=LOG_LEVELS,
    ),
)

_BY_DEST: Final = {option.dest: option for option in SERVE_OPTIONS}


@dataclasses.dataclass
class ServeSettings:
    """Everything ``serve`` runs with, resolved: files read, defaults applied.

    Plain data (JSON-able), so that the supervising process can hand it to its workers.
    """

    cert: str | None = None
    key: str | None = None
    client_ca: list[str] = dataclasses.field(default_factory=list)
    psk: dict[str, str] = dataclasses.field(default_factory=dict)
    """PSK identity -> key in hex, from --psk and --psk-file."""
    psk_hint: str | None = None
    no_client_auth: bool = False
    host: str = "127.0.0.1"
    port: int = 4433
    app: str = "echo"
    handshake_timeout: float = _LIBRARY_DEFAULTS["handshake_timeout"]
    idle_timeout: float = _LIBRARY_DEFAULTS["idle_timeout"]
    max_sessions: int = _LIBRARY_DEFAULTS["max_sessions"]
    max_sessions_per_ip: int | None = None
    evict_idle_after: float = _LIBRARY_DEFAULTS["evict_idle_after"]
    max_queued_datagrams: int = _LIBRARY_DEFAULTS["max_queued_datagrams"]
    mtu: int | None = None
    read_lease: float = _LIBRARY_DEFAULTS["read_lease"]
    workers: int = 1
    shutdown_grace: float = _LIBRARY_DEFAULTS["shutdown_grace"]
    stats_interval: float | None = None
    keylog: str | None = None
    log_format: str = "text"
    log_level: str = "INFO"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ServeSettings:
        return cls(**data)


# -- values --------------------------------------------------------------------


def _port(value: int) -> int:
    if not 0 <= value <= 65535:
        raise ValueError(f"must be 0 to 65535, not {value}")
    return value


def _count(value: int) -> int:
    # Lower bounds of library settings are the library's to check (with its
    # own message); a count is never negative.
    if value < 0:
        raise ValueError(f"must not be negative, not {value}")
    return value


def _seconds(value: float) -> float:
    if math.isnan(value):
        raise ValueError("must be a number of seconds, not nan")
    return value


def _checked(convert: Callable[[str], _T], check: Callable[[_T], _T]) -> Callable[[str], _T]:
    def parse(text: str) -> _T:
        try:
            return check(convert(text))
        except ValueError as exc:
            message = str(exc) if str(exc).startswith("must") else f"invalid value {text!r}"
            raise argparse.ArgumentTypeError(message) from None

    return parse


_parse_port = _checked(int, _port)
_parse_count = _checked(int, _count)
_parse_seconds = _checked(float, _seconds)
_ARGPARSE_TYPES: Final[Mapping[str, Callable[[str], object]]] = {
    "port": _parse_port,
    "count": _parse_count,
    "seconds": _parse_seconds,
}


def add_serve_options(parser: argparse.ArgumentParser) -> None:
    """Add every option of the table; an option not given stays None."""
    for option in SERVE_OPTIONS:
        if option.kind == "flag":
            parser.add_argument(option.flag, action="store_true", default=None, help=option.help)
            continue
        kwargs: dict[str, Any] = {"default": None, "help": option.help}
        if option.metavar:
            kwargs["metavar"] = option.metavar
        if option.choices:
            kwargs["choices"] = option.choices
        if option.kind in _ARGPARSE_TYPES:
            kwargs["type"] = _ARGPARSE_TYPES[option.kind]
        elif option.name == "log-level":
            kwargs["type"] = str.upper
        if option.kind in ("strs", "paths"):
            kwargs["action"] = "append"
        parser.add_argument(option.flag, **kwargs)


def _toml_value(path: Path, key: str, option: Option, value: object) -> object:
    """Check one value from a config file; resolve its paths against the file's directory."""

    def wrong(expected: str) -> UsageError:
        return UsageError(f"{path}: {key!r} must be {expected}, not {value!r}")

    def as_path(item: object) -> str:
        if not isinstance(item, str) or not item:
            raise wrong("a file name")
        return str(path.parent / Path(item).expanduser())

    kind = option.kind
    try:
        if kind in ("port", "count"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise wrong("a whole number")
            return _port(value) if kind == "port" else _count(value)
        if kind == "seconds":
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise wrong("a number of seconds")
            return _seconds(float(value))
    except ValueError as exc:
        raise UsageError(f"{path}: {key!r} {exc}") from None
    if kind == "flag":
        if not isinstance(value, bool):
            raise wrong("true or false")
        return value
    if kind == "path":
        return as_path(value)
    if kind in ("strs", "paths"):
        items = [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise wrong("a string or a list of strings")
        return [as_path(i) for i in items] if kind == "paths" else list(items)
    if not isinstance(value, str):
        raise wrong("a string")
    if kind == "choice":
        text = value.upper() if option.name == "log-level" else value
        if text not in option.choices:
            raise wrong("one of " + ", ".join(option.choices))
        return text
    return value


def load_config_file(path: Path) -> dict[str, object]:
    """The settings in a TOML file, by option dest; unknown keys are an error."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"--config: cannot read {str(path)!r}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path}: not valid TOML: {exc}") from None
    values: dict[str, object] = {}
    for key, value in data.items():
        option = _BY_DEST.get(key.replace("-", "_"))
        if option is None:
            raise UsageError(f"{path}: unknown key {key!r}")
        if option.dest in values:
            raise UsageError(f"{path}: {key!r} is given twice (with '-' and with '_')")
        values[option.dest] = _toml_value(path, key, option, value)
    return values


# -- PSK -------------------------------------------------------------------------


def parse_psk(text: str, where: str) -> tuple[str, bytes]:
    """``IDENTITY:HEXKEY`` -> (identity, key); the last ':' separates the key."""
    identity, colon, hexkey = text.rpartition(":")
    if not colon or not identity:
        raise UsageError(f"{where}: expected IDENTITY:HEXKEY")
    try:
        key = bytes.fromhex(hexkey.strip())
    except ValueError:
        # Never echo the key: it is a secret.
        raise UsageError(
            f"{where}: the key of PSK identity {identity!r} is not valid hex"
        ) from None
    if not key:
        raise UsageError(f"{where}: the key of PSK identity {identity!r} is empty")
    return identity, key


def read_psk_file(path: str, warnings: list[str]) -> list[tuple[str, bytes, str]]:
    """(identity, key, "file:line") for each line of a PSK file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise UsageError(f"--psk-file: cannot read {path!r}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--psk-file: {path!r} is not UTF-8 text") from None
    entries = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        identity, key = parse_psk(line, where)
        entries.append((identity, key, where))
    if not entries:
        raise UsageError(f"--psk-file: {path!r} holds no PSK identities")
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        warnings.append(
            f"PSK file {path} is open to other users (mode {stat.S_IMODE(mode):o}); chmod 600 it"
        )
    return entries


# -- merging ---------------------------------------------------------------------

CLIENT_AUTH_CHOICE: Final = (
    "choose how clients authenticate: --client-ca PEM (client certificates), "
    "--psk IDENTITY:HEXKEY or --psk-file FILE (pre-shared keys), or --no-client-auth"
)


def resolve_settings(
    given: Mapping[str, Any], config_file: str | None, environ: Mapping[str, str]
) -> tuple[ServeSettings, list[str]]:
    """Merge the command line (``given``: dest -> value or None) over the config file.

    Returns the settings and warnings to log once logging is set up.
    """
    warnings: list[str] = []
    values: dict[str, Any] = {}
    if config_file is not None:
        values.update(load_config_file(Path(config_file)))
    for dest in _BY_DEST:
        if given.get(dest) is not None:
            values[dest] = given[dest]

    psk: dict[str, str] = {}
    sources: dict[str, str] = {}

    def add(identity: str, key: bytes, where: str) -> None:
        if identity in psk:
            raise UsageError(
                f"{where}: PSK identity {identity!r} is given twice (also {sources[identity]})"
            )
        psk[identity] = key.hex()
        sources[identity] = where

    for text in values.pop("psk", None) or ():
        add(*parse_psk(text, "--psk"), "--psk")
    psk_file = values.pop("psk_file", None)
    if psk_file is not None:
        for identity, key, where in read_psk_file(psk_file, warnings):
            add(identity, key, where)

    client_ca: Sequence[str] = values.get("client_ca") or ()
    no_client_auth = bool(values.get("no_client_auth"))
    if not (client_ca or psk or no_client_auth):
        raise UsageError(CLIENT_AUTH_CHOICE)
    if no_client_auth and client_ca:
        raise UsageError("--no-client-auth cannot be combined with --client-ca")
    if values.get("key") is not None and values.get("cert") is None:
        raise UsageError("--key needs --cert")
    if values.get("workers") == 0:
        raise UsageError("--workers: must be at least 1")
    interval = values.get("stats_interval")
    if interval is not None and not interval > 0:
        raise UsageError(f"--stats-interval: must be more than 0, not {interval}")
    if values.get("keylog") is None and environ.get("SSLKEYLOGFILE"):
        values["keylog"] = environ["SSLKEYLOGFILE"]
    return ServeSettings(psk=psk, **values), warnings
