"""The ``trio-dtls-server`` command, run as real processes on loopback.

Each test starts ``python -m trio_dtls_server`` and talks to it over UDP, with
the certificates of the ``dtls_pki`` fixture; every wait has a timeout and
every process is killed at the end, whatever happened.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import stat
from collections.abc import Callable
from pathlib import Path

import needs
import pytest
import trio
from cliprocess import (
    TIMEOUT,
    Launcher,
    ServerProcess,
    certificate_args,
    client_certificate_args,
    containing,
    free_udp_port,
    run_cli,
    stderr_lines,
)

from trio_dtls_server import DTLSSession, HandshakeError, connect_dtls
from trio_dtls_server.cli import main
from trio_dtls_server.testing import TestPKI, exchange

# -- serve: readiness and shutdown -----------------------------------------------------------


async def test_serve_prints_one_listening_line_with_the_actual_port(
    cli: Launcher, dtls_pki: TestPKI
) -> None:
    files = dtls_pki.files
    # The benchmark's order: its own options first, then host, port and certificate.
    server = await cli.serve(
        "--app",
        "echo",
        "--client-ca",
        str(files.ca_cert),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--cert",
        str(files.server_cert),
        "--key",
        str(files.server_key),
    )
    assert server.host == "127.0.0.1"
    assert 0 < server.port < 65536
    session = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"ping") == b"ping"
    finally:
        await session.aclose()
    assert await server.stop() == 0
    assert server.stdout.lines == [f"listening on 127.0.0.1:{server.port}"]


@needs.ipv6
async def test_serve_listening_line_for_ipv6_is_host_colon_port(
    cli: Launcher, dtls_pki: TestPKI
) -> None:
    server = await cli.serve("--host", "::1", "--port", "0", *certificate_args(dtls_pki))
    assert server.stdout.lines == [f"listening on ::1:{server.port}"]
    session = await connect_dtls("::1", server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"six") == b"six"
    finally:
        await session.aclose()


async def test_sigterm_sends_close_notify_to_sessions_and_exits_0(
    cli: Launcher, dtls_pki: TestPKI
) -> None:
    server = await cli.serve("--port", "0", *certificate_args(dtls_pki))
    session = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"before") == b"before"
        server.process.send_signal(signal.SIGTERM)
        with trio.fail_after(TIMEOUT), pytest.raises(trio.EndOfChannel):
            await session.receive()
    finally:
        await session.aclose()
    with trio.fail_after(TIMEOUT):
        assert await server.process.wait() == 0
    await server.stderr.wait_for(lambda line: "SIGTERM received" in line)


# -- the client subcommand and the apps ----------------------------------------------------


async def test_client_sends_stdin_lines_and_prints_echoes_with_certificates(
    cli: Launcher, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    server = await cli.serve("--port", "0", *certificate_args(dtls_pki))
    result = await run_cli(
        "client",
        "127.0.0.1",
        str(server.port),
        *client_certificate_args(dtls_pki),
        env=cli_env,
        stdin="one\ntwo words\n\nthree, no newline at the end ü".encode(),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == [
        "one",
        "two words",
        "three, no newline at the end ü",
    ]
    assert result.stderr == b""


async def test_client_and_server_with_a_psk_whose_identity_has_spaces_and_colons(
    cli: Launcher, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    identity = "sensor 7: kitchen"
    key = dtls_pki.psk_identities["device-1"].hex()
    server = await cli.serve("--port", "0", "--psk", f"{identity}:{key}")
    result = await run_cli(
        "client",
        "127.0.0.1",
        str(server.port),
        "--psk",
        f"{identity}:{key}",
        env=cli_env,
        stdin=b"hello over psk\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"hello over psk\n"
    await server.stderr.wait_for(lambda line: f"PSK identity {identity!r}" in line)


async def test_psk_only_server_refuses_a_client_without_credentials(
    cli: Launcher, dtls_pki: TestPKI
) -> None:
    key = dtls_pki.psk_identities["device-1"].hex()
    server = await cli.serve("--port", "0", "--psk", f"device-1:{key}")
    # Trusts the server, but has neither a PSK nor a client certificate.
    config = dtls_pki.client_config(certificate=False, handshake_timeout=3)
    session: DTLSSession | None = None
    try:
        with pytest.raises(HandshakeError):
            session = await connect_dtls("127.0.0.1", server.port, config)
    finally:
        if session is not None:
            await session.aclose()


async def test_ack_app_replies_like_the_qt_example(
    cli: Launcher, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    server = await cli.serve("--port", "0", "--app", "ack", *certificate_args(dtls_pki))
    result = await run_cli(
        "client",
        "127.0.0.1",
        str(server.port),
        *client_certificate_args(dtls_pki),
        env=cli_env,
        stdin=b"first\nsecond\n",
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.decode().splitlines()
    assert len(lines) == 2
    assert all(re.fullmatch(r"to \(127\.0\.0\.1:\d+\): ACK", line) for line in lines), lines
    assert lines[0] == lines[1]  # one session, so one client port


async def test_client_fails_with_one_line_when_nothing_listens(cli_env: dict[str, str]) -> None:
    port = free_udp_port()
    result = await run_cli(
        "client", "127.0.0.1", str(port), "--no-verify", "--timeout", "1", env=cli_env
    )
    assert result.returncode == 1
    lines = stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-dtls-server: error: ")
    assert f"127.0.0.1:{port}" in lines[0]
    assert "nothing is listening" in lines[0] or "no DTLS handshake" in lines[0]


# -- bad configuration: one line, exit status 2 ---------------------------------------------


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


BAD_CONFIGURATIONS: dict[str, Callable[[TestPKI, Path, int], tuple[list[str], str]]] = {
    "missing certificate file": lambda pki, tmp, busy: (
        ["--cert", str(tmp / "missing.pem"), "--no-client-auth"],
        "certfile: cannot read",
    ),
    "key does not match certificate": lambda pki, tmp, busy: (
        [
            "--cert",
            str(pki.files.server_cert),
            "--key",
            str(pki.untrusted.server_key),
            "--client-ca",
            str(pki.files.ca_cert),
        ],
        "keyfile: the private key does not match the certificate",
    ),
    "bad PSK hex": lambda pki, tmp, busy: (
        ["--psk", "device-1:0011zz"],
        "--psk: the key of PSK identity 'device-1' is not valid hex",
    ),
    "bad line in PSK file": lambda pki, tmp, busy: (
        ["--psk-file", _write(tmp / "keys.txt", "# keys\n\ndevice-1:00ff\nno key here\n")],
        f"{tmp / 'keys.txt'}:4: expected IDENTITY:HEXKEY",
    ),
    # The development certificate and client_auth='none' log warnings before
    # the bind fails: the error must still be the only line.
    "port in use": lambda pki, tmp, busy: (
        ["--port", str(busy), "--no-client-auth"],
        f"cannot bind 127.0.0.1:{busy}: address already in use",
    ),
    "port in use with workers": lambda pki, tmp, busy: (
        ["--port", str(busy), "--workers", "2", *certificate_args(pki)],
        f"cannot bind 127.0.0.1:{busy}: address already in use",
    ),
    "unknown option": lambda pki, tmp, busy: (
        ["--no-client-auth", "--colour", "blue"],
        "unrecognized arguments: --colour blue",
    ),
    "no client authentication choice": lambda pki, tmp, busy: (
        ["--cert", str(pki.files.server_cert), "--key", str(pki.files.server_key)],
        "choose how clients authenticate",
    ),
    "negative timeout": lambda pki, tmp, busy: (
        ["--no-client-auth", "--idle-timeout", "-1"],
        "--idle-timeout: must be at least 0",
    ),
    "read lease beyond its bound": lambda pki, tmp, busy: (
        ["--no-client-auth", "--read-lease", "5"],
        "--read-lease: must be at most 1",
    ),
    "unknown key in config file": lambda pki, tmp, busy: (
        ["--config", _write(tmp / "c.toml", "port = 0\nbogus-key = 1\n"), "--no-client-auth"],
        "unknown key 'bogus-key'",
    ),
    "bad TOML": lambda pki, tmp, busy: (
        ["--config", _write(tmp / "c.toml", "port = = 0\n"), "--no-client-auth"],
        "not valid TOML",
    ),
    "wrong type in config file": lambda pki, tmp, busy: (
        ["--config", _write(tmp / "c.toml", 'max-sessions = "many"\n'), "--no-client-auth"],
        "'max-sessions' must be a whole number",
    ),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGURATIONS))
async def test_bad_configuration_is_one_line_on_stderr_and_exit_2(
    case: str, dtls_pki: TestPKI, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        args, expected = BAD_CONFIGURATIONS[case](dtls_pki, tmp_path, busy.getsockname()[1])
        result = await run_cli("serve", *args, env=cli_env)
    lines = stderr_lines(result)
    assert result.returncode == 2, lines
    assert result.stdout == b""
    assert len(lines) == 1, lines
    assert lines[0].startswith("trio-dtls-server: error: ")
    assert expected in lines[0]
    assert "Traceback" not in lines[0]


def test_main_returns_the_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--no-such-option"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert main(["--version"]) == 0
    assert "trio-dtls-server" in capsys.readouterr().out


# -- configuration file, stats, keylog, logs -------------------------------------------------


async def test_config_file_applies_and_the_command_line_wins(
    cli: Launcher, dtls_pki: TestPKI, tmp_path: Path
) -> None:
    files = dtls_pki.files
    config_dir = tmp_path / "conf"
    config_dir.mkdir()
    shutil.copy(files.ca_cert, config_dir / "clients-ca.pem")
    key = dtls_pki.psk_identities["device-2"].hex()
    config = config_dir / "server.toml"
    config.write_text(
        "port = 0\n"
        'app = "ack"\n'
        "handshake_timeout = 5\n"
        'client-ca = "clients-ca.pem"\n'  # relative to the file
        f'psk = ["device-2:{key}"]\n'
    )
    server = await cli.serve(
        "--config",
        str(config),
        "--app",
        "echo",
        "--cert",
        str(files.server_cert),
        "--key",
        str(files.server_key),
    )
    assert server.port not in (0, 4433)  # port = 0 from the file
    for client_config in (dtls_pki.client_config(), dtls_pki.psk_client_config("device-2")):
        session = await connect_dtls("127.0.0.1", server.port, client_config)
        try:
            # echo from the command line, not ack from the file
            assert await exchange(session, b"which app?") == b"which app?"
        finally:
            await session.aclose()


async def test_stats_interval_writes_stats_json_lines(cli: Launcher, dtls_pki: TestPKI) -> None:
    server = await cli.serve("--port", "0", "--stats-interval", "0.2", *certificate_args(dtls_pki))
    session = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"count me") == b"count me"

        def completed(line: str) -> bool:
            return (
                line.startswith("stats ")
                and json.loads(line.removeprefix("stats "))["handshakes_completed"] >= 1
            )

        line = await server.stderr.wait_for(completed)
    finally:
        await session.aclose()
    stats = json.loads(line.removeprefix("stats "))
    for name in (
        "sessions_active",
        "handshakes_active",
        "handshakes_completed",
        "handshakes_failed",
        "sessions_closed",
        "sessions_evicted",
        "handler_errors",
        "datagrams_in",
    ):
        assert isinstance(stats[name], int), name
    assert stats["sessions_active"] == 1
    assert stats["datagrams_in"] >= 1


@pytest.mark.parametrize("how", ["--keylog", "SSLKEYLOGFILE"])
async def test_keylog_writes_nss_key_log_lines(
    how: str, cli: Launcher, dtls_pki: TestPKI, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    keylog = tmp_path / "keys.log"
    args = ["--port", "0", *certificate_args(dtls_pki)]
    env = dict(cli_env)
    if how == "--keylog":
        args += ["--keylog", str(keylog)]
    else:
        env["SSLKEYLOGFILE"] = str(keylog)
    server = await cli.serve(*args, env=env)
    session = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"secret") == b"secret"
    finally:
        await session.aclose()
    assert await server.stop() == 0
    lines = keylog.read_text().splitlines()
    assert lines
    assert all(re.fullmatch(r"[A-Z_]+ [0-9a-f]{64} [0-9a-f]+", line) for line in lines), lines
    assert any(line.startswith("CLIENT_RANDOM ") for line in lines)
    assert any("session secrets" in line and str(keylog) in line for line in server.stderr.lines)


async def test_log_format_json_writes_one_object_per_line(
    cli: Launcher, dtls_pki: TestPKI
) -> None:
    server = await cli.serve("--port", "0", "--log-format", "json", *certificate_args(dtls_pki))
    session = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
    try:
        assert await exchange(session, b"logged") == b"logged"
    finally:
        await session.aclose()
    await server.stderr.wait_for(lambda line: "ended" in line)
    assert await server.stop() == 0
    records = [json.loads(line) for line in server.stderr.lines if line]
    for record in records:
        assert {"time", "level", "logger", "message"} <= record.keys()
    ended = [r for r in records if "ended" in r["message"]]
    assert ended
    assert ended[0]["session_id"] >= 1
    assert ended[0]["peer"].startswith("127.0.0.1:")
    assert ended[0]["reason"] == "peer sent close_notify"


# -- certificates ------------------------------------------------------------------------------


async def test_gen_certs_writes_six_files_with_private_keys_0600(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    directory = tmp_path / "pki"
    result = await run_cli(
        "gen-certs", str(directory), "--hosts", "localhost,127.0.0.1,::1", env=cli_env
    )
    assert result.returncode == 0, result.stderr
    names = ("ca.pem", "ca.key", "server.pem", "server.key", "client.pem", "client.key")
    assert sorted(p.name for p in directory.iterdir()) == sorted(names)
    for name in names:
        mode = stat.S_IMODE((directory / name).stat().st_mode)
        assert mode == (0o600 if name.endswith(".key") else 0o644), (name, oct(mode))
        assert str(directory / name) in result.stdout.decode()

    bad = await run_cli("gen-certs", str(tmp_path / "other"), "--hosts", "a,,b", env=cli_env)
    assert bad.returncode == 2
    assert len(stderr_lines(bad)) == 1
    assert not (tmp_path / "other").exists()


async def test_development_certificate_is_made_on_first_use_and_trusted_by_client(
    cli: Launcher, cli_env: dict[str, str]
) -> None:
    ca = Path(cli_env["TRIO_DTLS_SERVER_CERT_DIR"]) / "ca.pem"
    assert not ca.exists()
    server = await cli.serve("--port", "0", "--no-client-auth")
    warning = await server.stderr.wait_for(lambda line: "development certificate" in line)
    assert "WARNING" in warning
    assert str(ca) in warning
    assert ca.is_file()
    # Without --ca, the client trusts the development CA.
    result = await run_cli(
        "client", "localhost", str(server.port), env=cli_env, stdin=b"trusted\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == b"trusted\n"


# -- workers ------------------------------------------------------------------------------------


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"


async def _worker_pids(server: ServerProcess, count: int) -> list[int]:
    pids = []
    for index in range(count):
        line = await server.stderr.wait_for(containing(f"started worker {index} "))
        match = re.search(r"\(pid (\d+)\)", line)
        assert match is not None
        pids.append(int(match[1]))
    return pids


@pytest.mark.slow
async def test_workers_share_the_port_and_stop_together(cli: Launcher, dtls_pki: TestPKI) -> None:
    server = await cli.serve("--port", "0", "--workers", "2", *certificate_args(dtls_pki))
    pids = await _worker_pids(server, 2)
    sessions = []

    async def one_session(number: int) -> None:
        session = await connect_dtls("127.0.0.1", server.port, dtls_pki.client_config())
        sessions.append(session)
        payload = f"session {number}".encode()
        assert await exchange(session, payload) == payload

    try:
        with trio.fail_after(TIMEOUT):
            async with trio.open_nursery() as nursery:
                for number in range(20):
                    nursery.start_soon(one_session, number)
        assert len(sessions) == 20
        # SO_REUSEPORT spreads peers by their address: both workers have some
        # (all 20 on one worker has a chance of 2**-19).
        for index in range(2):
            await server.stderr.wait_for(containing(f"[worker {index}]", "established"))
        started = trio.current_time()
        assert await server.stop() == 0
        assert trio.current_time() - started < 5
        with trio.fail_after(TIMEOUT):
            for session in sessions:
                with pytest.raises(trio.EndOfChannel):
                    await session.receive()
    finally:
        for session in sessions:
            await session.aclose()
    assert all(_gone(pid) for pid in pids)
    assert server.stdout.lines == [f"listening on 127.0.0.1:{server.port}"]


@pytest.mark.slow
async def test_a_dying_worker_stops_the_others(cli: Launcher, dtls_pki: TestPKI) -> None:
    server = await cli.serve("--port", "0", "--workers", "2", *certificate_args(dtls_pki))
    first, second = await _worker_pids(server, 2)
    os.kill(second, signal.SIGKILL)
    with trio.fail_after(TIMEOUT):
        status = await server.process.wait()
    assert status == 1
    await server.stderr.wait_for(lambda line: "worker 1" in line and "SIGKILL" in line)
    assert _gone(first)
