"""``python examples/demo.py`` works on a fresh checkout: it runs, talks, and exits 0 by itself."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_scripted_chat_and_exits_0() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "demo.py")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "chat server listening on 127.0.0.1:" in out
    for line in (
        # each client's view, prefixed by its name
        "alice | < * welcome alice; here now: alice",
        "alice | > hi bob, hi carol!",
        "  bob | < alice: hi bob, hi carol!",
        "carol | < alice: hi bob, hi carol!",
        "carol | < * here now: alice, bob, carol",
        "carol | < ! message too long (258 bytes, limit 200)",
        "  bob | < * bye",
        "carol | < * bob left (quit)",
        "carol | < * alice left (disconnected)",
    ):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "=== server stats ===" in out
    assert "  handshakes_completed   3" in out
    assert "  handler_errors         0" in out
    assert "server stopped: 3 sessions closed, 0 active, 0 handler errors" in out
    assert result.stderr == "", result.stderr
