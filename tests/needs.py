"""What a test needs from this machine, as marks decided when tests are collected.

pytest-trio 0.8 with pytest >= 8.4 reports a ``pytest.skip("why")`` raised inside
an async test as a bare "Skipped", without the reason (pytest-trio issue #151),
so a test that depends on the machine says so with one of these marks instead.
"""

from __future__ import annotations

import importlib.util
import shutil
import socket

import pytest


def ipv6_loopback() -> bool:
    """Whether ``::1`` can be bound here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


#: The test binds or sends to ``::1`` (or ``::``).
ipv6 = pytest.mark.skipif(not ipv6_loopback(), reason="no IPv6 loopback (::1) here")


def tool(name: str) -> pytest.MarkDecorator:
    """The test runs the program ``name``, found on PATH."""
    return pytest.mark.skipif(shutil.which(name) is None, reason=f"{name} is not on PATH")


def module(name: str) -> pytest.MarkDecorator:
    """The test runs a client that imports the Python package ``name``."""
    return pytest.mark.skipif(
        importlib.util.find_spec(name) is None,
        reason=f"the Python package {name!r} is not installed",
    )
