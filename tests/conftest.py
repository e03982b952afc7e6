"""Fixtures shared by the tests that run the command as processes (CLI, interop)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trio
from cliprocess import Launcher


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of every process: no key log, its own development certificate
    directory (never the user's), and Qt without a display."""
    env = {name: value for name, value in os.environ.items() if name != "SSLKEYLOGFILE"}
    env["TRIO_DTLS_SERVER_CERT_DIR"] = str(tmp_path / "development-certs")
    env["QT_QPA_PLATFORM"] = "offscreen"  # Qt clients run without a display
    return env


@pytest.fixture
async def cli(nursery: trio.Nursery, cli_env: dict[str, str]) -> AsyncIterator[Launcher]:
    launcher = Launcher(nursery, cli_env)
    try:
        yield launcher
    finally:
        await launcher.kill_all()
