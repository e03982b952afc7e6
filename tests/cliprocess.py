"""Running the ``trio-dtls-server`` command as real processes, for the CLI and interop tests.

Every process started here is killed when its ``Launcher`` is done, whatever
happened; every wait is bounded by ``TIMEOUT``.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Mapping

import trio

from trio_dtls_server.testing import TestPKI

CLI = (sys.executable, "-m", "trio_dtls_server")
#: Bound on anything a test waits for: a process start, a reply, an exit.
TIMEOUT = 15.0


class Output:
    """The lines of one pipe of a process, collected as they arrive."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.closed = False
        self._changed = trio.Event()

    async def collect(self, stream: trio.abc.ReceiveStream) -> None:
        pending = b""
        while chunk := await stream.receive_some():
            *lines, pending = (pending + chunk).split(b"\n")
            self.lines.extend(line.decode(errors="replace") for line in lines)
            self._wake()
        if pending:
            self.lines.append(pending.decode(errors="replace"))
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, predicate: Callable[[str], object], timeout: float = TIMEOUT) -> str:
        """The first line for which ``predicate`` is true, waiting for it if need be."""
        with trio.move_on_after(timeout):
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                if self.closed:
                    break
                await self._changed.wait()
        raise AssertionError(f"no such line within {timeout} s; got: {self.lines}")


class ServerProcess:
    def __init__(self, process: trio.Process, stdout: Output, stderr: Output) -> None:
        self.process = process
        self.stdout = stdout
        self.stderr = stderr
        self.host = ""
        self.port = 0

    async def wait_ready(self) -> None:
        try:
            line = await self.stdout.wait_for(lambda line: line.startswith("listening on "))
        except AssertionError:
            raise AssertionError(f"server not ready; stderr: {self.stderr.lines}") from None
        host, _, port = line.removeprefix("listening on ").rpartition(":")
        self.host, self.port = host, int(port)

    async def stop(self, signum: int = signal.SIGTERM) -> int:
        self.process.send_signal(signum)
        with trio.fail_after(TIMEOUT):
            return await self.process.wait()


class Launcher:
    """Starts ``serve`` processes in the test's nursery; kills them at the end."""

    def __init__(self, nursery: trio.Nursery, env: dict[str, str]) -> None:
        self.nursery = nursery
        self.env = env
        self.processes: list[trio.Process] = []

    async def serve(self, *args: str, env: Mapping[str, str] | None = None) -> ServerProcess:
        process = await trio.lowlevel.open_process(
            [*CLI, "serve", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=dict(env if env is not None else self.env),
        )
        self.processes.append(process)
        assert process.stdout is not None
        assert process.stderr is not None
        server = ServerProcess(process, Output(), Output())
        self.nursery.start_soon(server.stdout.collect, process.stdout)
        self.nursery.start_soon(server.stderr.collect, process.stderr)
        await server.wait_ready()
        return server

    async def kill_all(self) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(TIMEOUT):
            for process in self.processes:
                if process.returncode is None:
                    process.kill()
                await process.wait()


async def run_cli(
    *args: str, env: Mapping[str, str], stdin: bytes = b"", timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[bytes]:
    """Run one command to its end (killed if it takes longer than ``timeout``)."""
    with trio.fail_after(timeout):
        return await trio.run_process(
            [*CLI, *args],
            stdin=stdin,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env=dict(env),
        )


def certificate_args(pki: TestPKI) -> list[str]:
    """The test server certificate, requiring client certificates from the test CA."""
    files = pki.files
    return [
        "--cert",
        str(files.server_cert),
        "--key",
        str(files.server_key),
        "--client-ca",
        str(files.ca_cert),
    ]


def client_certificate_args(pki: TestPKI) -> list[str]:
    """A client's options: trust the test CA, present the test client certificate."""
    files = pki.files
    return [
        "--ca",
        str(files.ca_cert),
        "--cert",
        str(files.client_cert),
        "--key",
        str(files.client_key),
    ]


def containing(*parts: str) -> Callable[[str], bool]:
    """A line predicate: the line contains every one of ``parts``."""
    return lambda line: all(part in line for part in parts)


def stderr_lines(result: subprocess.CompletedProcess[bytes]) -> list[str]:
    return result.stderr.decode(errors="replace").splitlines()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
