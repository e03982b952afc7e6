"""Third-party DTLS 1.2 clients against ``trio-dtls-server serve``, a real process.

Clients: OpenSSL's ``openssl s_client``, GnuTLS's ``gnutls-cli``, Mbed TLS
through python-mbedtls (tests/interop/mbedtls_client.py) and Qt's QDtls through
PySide6 (tests/interop/qt_client.py, built like Qt's ``secureudpclient``
example). Each test starts its own server with the ``dtls_pki`` certificates
(the server processes are started and killed by tests/test_cli.py's
``Launcher``), runs clients as subprocesses with a timeout, and kills whatever
is still running at the end.

A test is skipped only when its client is not installed (a tool not on PATH, a
Python package not importable); CI installs them all (see .ci/run and the
``test`` extra).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import needs
import pytest
import trio
from cliprocess import (
    TIMEOUT,
    Launcher,
    Output,
    ServerProcess,
    certificate_args,
    client_certificate_args,
    containing,
)

from trio_dtls_server.testing import FaultyRelay, TestPKI

DRIVERS = Path(__file__).parent / "interop"

#: The PSK of Qt's secureudpclient example (association.cpp): the connection
#: name as identity and a six-byte key, with the server left unverified.
QT_EXAMPLE_IDENTITY = "Alice (clone number 1)"
QT_EXAMPLE_KEY = bytes.fromhex("1a2b3c4d5e6f")

#: The echo server's handshake timeout: a client whose Finished cannot be
#: decrypted (a wrong PSK key) gets no alert, its records are just discarded
#: (RFC 6347, 4.1.2.7), so the server gives up after this.
HANDSHAKE_TIMEOUT = 3.0

RelayFactory = Callable[..., Awaitable[FaultyRelay]]


# -- running clients -----------------------------------------------------------------------


@dataclasses.dataclass
class ClientRun:
    """What a client process did: ``returncode`` is None if it had to be killed."""

    argv: Sequence[str]
    returncode: int | None
    stdout: list[str]
    stderr: list[str]

    def __str__(self) -> str:
        return (
            f"{' '.join(self.argv)}\n  exit: {self.returncode}\n"
            f"  stdout: {self.stdout}\n  stderr: {self.stderr}"
        )


async def run_client(
    argv: Sequence[str],
    *,
    env: dict[str, str],
    stdin: bytes = b"",
    until: str | None = None,
    timeout: float = TIMEOUT,
) -> ClientRun:
    """Run a client: feed it ``stdin`` (left open), then wait until it prints the
    line ``until`` (if given) or exits, at most ``timeout`` seconds; then kill it."""
    process = await trio.lowlevel.open_process(
        list(argv),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert process.stdin is not None
    assert process.stdout is not None
    assert process.stderr is not None
    stdout, stderr = Output(), Output()
    killed = False
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stdout.collect, process.stdout)
            nursery.start_soon(stderr.collect, process.stderr)
            if stdin:
                # A client that is already gone shows that in its output and exit status.
                with contextlib.suppress(trio.BrokenResourceError):
                    await process.stdin.send_all(stdin)
            with trio.move_on_after(timeout):
                printed = False
                if until is not None:
                    # AssertionError: stdout closed without it, the process is exiting.
                    with contextlib.suppress(AssertionError):
                        await stdout.wait_for(lambda line: line == until, timeout)
                        printed = True
                if not printed:
                    await process.wait()
            if process.returncode is None:
                killed = True
                process.kill()
            with trio.fail_after(TIMEOUT):
                await process.wait()
    finally:
        with trio.CancelScope(shield=True):
            if process.returncode is None:
                process.kill()
            await process.wait()
            await process.stdin.aclose()
    return ClientRun(argv, None if killed else process.returncode, stdout.lines, stderr.lines)


def which(name: str) -> str:
    """The path of a client program; its test is marked with ``needs.tool(name)``."""
    path = shutil.which(name)
    assert path is not None, f"{name} is not on PATH: mark the test with needs.tool({name!r})"
    return path


# Each client's mark: its tests are skipped, with this reason, where it is missing.
OPENSSL = needs.tool("openssl")
GNUTLS = needs.tool("gnutls-cli")
MBEDTLS = needs.module("mbedtls")
QT = needs.module("PySide6")


# -- the clients ---------------------------------------------------------------------------


def s_client(port: int, *credentials: str) -> list[str]:
    """``openssl s_client`` over DTLS 1.2; with -quiet its stdout is only the echo."""
    openssl = which("openssl")
    return [
        openssl,
        "s_client",
        "-dtls1_2",
        "-connect",
        f"127.0.0.1:{port}",
        "-quiet",
        *credentials,
    ]


def s_client_certificate(pki: TestPKI, *, untrusted: bool = False) -> list[str]:
    files = pki.untrusted if untrusted else pki.files
    return [
        "-CAfile",
        str(pki.files.ca_cert),
        "-verify_return_error",
        "-cert",
        str(files.client_cert),
        "-key",
        str(files.client_key),
    ]


def s_client_psk(identity: str, key: bytes) -> list[str]:
    # PSK suites only: a client that offers certificate suites too gets ECDHE-ECDSA from
    # this server (it has a certificate), which then requires a client certificate.
    return ["-psk", key.hex(), "-psk_identity", identity, "-cipher", "PSK"]


def gnutls_cli(port: int, pki: TestPKI, *, certificate: bool = True) -> list[str]:
    argv = [
        which("gnutls-cli"),
        "--udp",
        "-p",
        str(port),
        "--x509cafile",
        str(pki.files.ca_cert),
    ]
    if certificate:
        argv += [
            "--x509certfile",
            str(pki.files.client_cert),
            "--x509keyfile",
            str(pki.files.client_key),
        ]
    return [*argv, "127.0.0.1"]  # checked against the server certificate's IP SAN


def mbedtls_client(port: int, *options: str, send: Sequence[str]) -> list[str]:
    sends = [part for text in send for part in ("--send", text)]
    return [
        sys.executable,
        str(DRIVERS / "mbedtls_client.py"),
        "127.0.0.1",
        str(port),
        *options,
        *sends,
    ]


def mbedtls_certificate(pki: TestPKI, *, untrusted: bool = False) -> list[str]:
    files = pki.untrusted if untrusted else pki.files
    return [
        "--ca",
        str(pki.files.ca_cert),
        # Mbed TLS 2.28 matches DNS names only, not IP SANs: verify the name localhost.
        "--server-name",
        "localhost",
        "--cert",
        str(files.client_cert),
        "--key",
        str(files.client_key),
    ]


def qt_client(port: int, *options: str, send: Sequence[str]) -> list[str]:
    sends = [part for text in send for part in ("--send", text)]
    return [
        sys.executable,
        str(DRIVERS / "qt_client.py"),
        "127.0.0.1",
        str(port),
        *options,
        *sends,
    ]


def reply(text: str) -> str:
    """The line the Python drivers print for a reply of ``text``."""
    return f"reply {text.encode().hex()}"


# -- fixtures --------------------------------------------------------------------------------


def psk_args(pki: TestPKI) -> list[str]:
    return [
        part
        for identity, key in pki.psk_identities.items()
        for part in ("--psk", f"{identity}:{key.hex()}")
    ]


@pytest.fixture
async def echo_server(cli: Launcher, dtls_pki: TestPKI) -> ServerProcess:
    """``--app echo`` with the test certificate, requiring client certificates from the
    test CA or one of the test PSK identities; stats on stderr every 0.2 s."""
    return await cli.serve(
        "--port",
        "0",
        "--app",
        "echo",
        *certificate_args(dtls_pki),
        *psk_args(dtls_pki),
        "--handshake-timeout",
        str(HANDSHAKE_TIMEOUT),
        "--stats-interval",
        "0.2",
    )


@pytest.fixture
async def ack_server(cli: Launcher) -> ServerProcess:
    """``--app ack`` with only the PSK of Qt's example: Qt's secureudpserver, safely."""
    return await cli.serve(
        "--port", "0", "--app", "ack", "--psk", f"{QT_EXAMPLE_IDENTITY}:{QT_EXAMPLE_KEY.hex()}"
    )


async def wait_for_stat(server: ServerProcess, name: str, at_least: int) -> dict[str, int]:
    """The first ``stats`` line on the server's stderr with ``name`` >= ``at_least``."""

    def matches(line: str) -> bool:
        if not line.startswith("stats "):
            return False
        value: int = json.loads(line.removeprefix("stats "))[name]
        return value >= at_least

    line = await server.stderr.wait_for(matches)
    stats: dict[str, int] = json.loads(line.removeprefix("stats "))
    return stats


# -- OpenSSL ---------------------------------------------------------------------------------


@OPENSSL
async def test_interop_openssl_s_client_with_a_client_certificate(
    echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    message = "hello from openssl s_client, certificate ü"
    run = await run_client(
        s_client(echo_server.port, *s_client_certificate(dtls_pki)),
        env=cli_env,
        stdin=f"{message}\n".encode(),
        until=message,
    )
    assert run.stdout == [message], run  # -quiet: stdout is exactly what came back
    await echo_server.stderr.wait_for(containing("peer certificate"))


@OPENSSL
async def test_interop_openssl_s_client_with_psk(
    echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    for identity, key in dtls_pki.psk_identities.items():  # a 16- and a 32-byte key
        message = f"hello from openssl s_client as {identity}"
        run = await run_client(
            s_client(echo_server.port, *s_client_psk(identity, key)),
            env=cli_env,
            stdin=f"{message}\n".encode(),
            until=message,
        )
        assert run.stdout == [message], run
        await echo_server.stderr.wait_for(containing(f"PSK identity {identity!r}"))


# -- GnuTLS ----------------------------------------------------------------------------------


@GNUTLS
async def test_interop_gnutls_cli_with_a_client_certificate(
    echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    message = "hello from gnutls-cli"
    run = await run_client(
        gnutls_cli(echo_server.port, dtls_pki),
        env=cli_env,
        stdin=f"{message}\n".encode(),
        until=message,
    )
    assert run.stdout.count(message) == 1, run
    assert any("Handshake was completed" in line for line in run.stdout), run
    await echo_server.stderr.wait_for(containing("peer certificate"))


# -- Mbed TLS --------------------------------------------------------------------------------


@MBEDTLS
async def test_interop_mbedtls_with_a_client_certificate(
    echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    messages = ["hello from mbed tls", "a second datagram", "x" * 1000]
    run = await run_client(
        mbedtls_client(echo_server.port, *mbedtls_certificate(dtls_pki), send=messages),
        env=cli_env,
    )
    assert run.returncode == 0, run
    assert re.fullmatch(r"handshake TLS-ECDHE-ECDSA-\S+ DTLSVersion.DTLSv1_2", run.stdout[0]), run
    assert run.stdout[1:] == [reply(text) for text in messages], run


@MBEDTLS
async def test_interop_mbedtls_with_psk(
    echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    key = dtls_pki.psk_identities["device-2"]
    messages = ["hello from mbed tls with a psk"]
    run = await run_client(
        mbedtls_client(echo_server.port, "--psk", f"device-2:{key.hex()}", send=messages),
        env=cli_env,
    )
    assert run.returncode == 0, run
    assert run.stdout == ["handshake TLS-PSK-WITH-AES-128-GCM-SHA256 DTLSVersion.DTLSv1_2"] + [
        reply(text) for text in messages
    ], run


# -- Qt --------------------------------------------------------------------------------------


def qt_example_client(port: int, pings: int) -> list[str]:
    """Qt's secureudpclient example: its PSK, no server verification, its ping text."""
    return qt_client(
        port,
        "--psk",
        f"{QT_EXAMPLE_IDENTITY}:{QT_EXAMPLE_KEY.hex()}",
        "--verify-none",
        "--peer-name",
        QT_EXAMPLE_IDENTITY,
        send=[
            f"I am {QT_EXAMPLE_IDENTITY}, please, accept our ping {ping}" for ping in range(pings)
        ],
    )


@QT
async def test_interop_qt_secureudpclient_example_with_psk_gets_acks(
    ack_server: ServerProcess, cli_env: dict[str, str]
) -> None:
    run = await run_client(qt_example_client(ack_server.port, pings=2), env=cli_env)
    assert run.returncode == 0, run
    local = re.fullmatch(r"local (127\.0\.0\.1:\d+)", run.stdout[0])
    assert local is not None, run
    assert re.fullmatch(r"handshake \S*PSK\S* DtlsV1_2", run.stdout[1]), run
    # The reply names the client's own address, as Qt's secureudpserver does.
    assert run.stdout[2:] == [reply(f"to ({local[1]}): ACK")] * 2, run


@QT
async def test_interop_qt_client_hello_changes_between_hellos_and_still_passes_the_cookie(
    ack_server: ServerProcess, cli_env: dict[str, str], fault_relay: RelayFactory
) -> None:
    """With the cookie, Qt's second ClientHello crosses 256 bytes and OpenSSL adds its
    padding extension: a cookie over the whole hello (bare trio) never matches."""
    relay = await fault_relay(("127.0.0.1", ack_server.port))
    run = await run_client(qt_example_client(relay.address[1], pings=1), env=cli_env)
    assert run.returncode == 0, run
    assert re.fullmatch(r"reply .+", run.stdout[-1]), run
    passed = [event for event in relay.events if event.action == "pass"]
    c2s = [event.size for event in passed if event.direction == "c2s"]
    s2c = [event.size for event in passed if event.direction == "s2c"]
    # HelloVerifyRequest: record header 13, handshake header 12, version 2, length 1, cookie.
    cookie = s2c[0] - 28
    assert c2s[1] != c2s[0] + cookie, (
        f"the second ClientHello ({c2s[1]} bytes) is the first ({c2s[0]}) plus the "
        f"{cookie}-byte cookie: this client no longer changes its extensions"
    )


@QT
async def test_interop_qt_with_certificates_verifying_the_server(
    echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    messages = ["hello from qt", "second"]
    run = await run_client(
        qt_client(
            echo_server.port,
            *client_certificate_args(dtls_pki),
            send=messages,
        ),
        env=cli_env,
    )
    assert run.returncode == 0, run
    assert re.fullmatch(r"handshake ECDHE-ECDSA-\S+ DtlsV1_2", run.stdout[1]), run
    assert run.stdout[2:] == [reply(text) for text in messages], run


# -- refusals --------------------------------------------------------------------------------


@dataclasses.dataclass
class Refusal:
    """A client the server must refuse, what it shows, and a good client to follow it."""

    bad: Callable[[int, TestPKI], list[str]]
    #: Text in the bad client's output saying which alert it got; None: no alert comes.
    alert: str | None
    good: Callable[[int, TestPKI], list[str]]
    #: The good client's line showing the echo (the message is "carry on").
    echo: str
    #: What both clients need installed.
    needs: pytest.MarkDecorator


MESSAGE = "carry on"

REFUSALS = {
    "openssl-no-certificate": Refusal(
        bad=lambda port, pki: s_client(port, "-CAfile", str(pki.files.ca_cert)),
        alert="SSL alert number 40",  # handshake_failure
        good=lambda port, pki: s_client(port, *s_client_certificate(pki)),
        echo=MESSAGE,
        needs=OPENSSL,
    ),
    "gnutls-no-certificate": Refusal(
        bad=lambda port, pki: gnutls_cli(port, pki, certificate=False),
        alert="Received alert [40]",
        good=lambda port, pki: gnutls_cli(port, pki),
        echo=MESSAGE,
        needs=GNUTLS,
    ),
    "openssl-untrusted-certificate": Refusal(
        bad=lambda port, pki: s_client(port, *s_client_certificate(pki, untrusted=True)),
        alert="SSL alert number 48",  # unknown_ca
        good=lambda port, pki: s_client(port, *s_client_certificate(pki)),
        echo=MESSAGE,
        needs=OPENSSL,
    ),
    "mbedtls-untrusted-certificate": Refusal(
        bad=lambda port, pki: mbedtls_client(
            port, *mbedtls_certificate(pki, untrusted=True), send=[MESSAGE]
        ),
        alert="fatal alert",
        good=lambda port, pki: mbedtls_client(port, *mbedtls_certificate(pki), send=[MESSAGE]),
        echo=reply(MESSAGE),
        needs=MBEDTLS,
    ),
    "openssl-wrong-psk-key": Refusal(
        bad=lambda port, pki: s_client(
            port, *s_client_psk("device-1", bytes(b ^ 1 for b in pki.psk_identities["device-1"]))
        ),
        alert=None,
        good=lambda port, pki: s_client(
            port, *s_client_psk("device-1", pki.psk_identities["device-1"])
        ),
        echo=MESSAGE,
        needs=OPENSSL,
    ),
    "openssl-unknown-psk-identity": Refusal(
        bad=lambda port, pki: s_client(
            port, *s_client_psk("device-9", pki.psk_identities["device-1"])
        ),
        alert="SSL alert number 115",  # unknown_psk_identity
        good=lambda port, pki: s_client(
            port, *s_client_psk("device-1", pki.psk_identities["device-1"])
        ),
        echo=MESSAGE,
        needs=OPENSSL,
    ),
    "mbedtls-unknown-psk-identity": Refusal(
        bad=lambda port, pki: mbedtls_client(
            port, "--psk", f"device-9:{pki.psk_identities['device-2'].hex()}", send=[MESSAGE]
        ),
        alert="fatal alert",
        good=lambda port, pki: mbedtls_client(
            port, "--psk", f"device-2:{pki.psk_identities['device-2'].hex()}", send=[MESSAGE]
        ),
        echo=reply(MESSAGE),
        needs=MBEDTLS,
    ),
}


@pytest.mark.parametrize(
    "case", [pytest.param(case, marks=case.needs, id=name) for name, case in REFUSALS.items()]
)
async def test_interop_refuses_bad_credentials_and_carries_on(
    case: Refusal, echo_server: ServerProcess, dtls_pki: TestPKI, cli_env: dict[str, str]
) -> None:
    stdin = f"{MESSAGE}\n".encode()
    port = echo_server.port
    # A refused client that gets an alert exits at once; one that gets none is
    # killed once the server has given up on its handshake.
    bad = await run_client(
        case.bad(port, dtls_pki),
        env=cli_env,
        stdin=stdin,
        timeout=TIMEOUT if case.alert else HANDSHAKE_TIMEOUT + 1,
    )
    assert MESSAGE not in bad.stdout and reply(MESSAGE) not in bad.stdout, bad
    if case.alert is not None:
        assert bad.returncode not in (0, None), bad
        assert any(case.alert in line for line in bad.stdout + bad.stderr), bad
        stats = await wait_for_stat(echo_server, "handshakes_failed", 1)
    else:
        stats = await wait_for_stat(echo_server, "handshake_timeouts", 1)
    assert stats["handshakes_completed"] == 0, stats

    good = await run_client(case.good(port, dtls_pki), env=cli_env, stdin=stdin, until=case.echo)
    assert case.echo in good.stdout, good
    assert echo_server.process.returncode is None
    await wait_for_stat(echo_server, "handshakes_completed", 1)
