"""The atheris fuzz target (fuzz/fuzz_datagrams.py): a bounded run in CI, and proof it bites.

See fuzz/README.md for running it longer.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.importorskip("atheris")

TARGET = Path(__file__).resolve().parent.parent / "fuzz" / "fuzz_datagrams.py"
FUZZ_SECONDS = 20
#: What a finished run left: its exit status, its output, and its directory.
Outcome = tuple[int, str, Path]


def _command(*args: str) -> list[str]:
    return [sys.executable, str(TARGET), *args]


def _run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        _command(*args),
        cwd=cwd,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture(scope="module")
def bounded_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], Outcome]]:
    """The CI fuzzing run, started at once in the background; call the result to wait."""
    directory = tmp_path_factory.mktemp("fuzz")
    corpus = directory / "corpus"
    corpus.mkdir()
    log = directory / "output.txt"
    with log.open("w") as output:
        process = subprocess.Popen(
            _command(
                f"-max_total_time={FUZZ_SECONDS}",
                "-rss_limit_mb=2048",
                "-timeout=30",
                f"-artifact_prefix={directory}{os.sep}",
                str(corpus),
            ),
            cwd=directory,
            stdout=output,
            stderr=subprocess.STDOUT,
        )

    def wait() -> Outcome:
        returncode = process.wait(timeout=FUZZ_SECONDS + 100)
        return returncode, log.read_text(), directory

    try:
        yield wait
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_fuzz_target_reports_an_exception_escaping_dispatch(
    tmp_path: Path, bounded_run: Callable[[], Outcome]
) -> None:
    """With a bug planted in the per-datagram session path, the target crashes on an input
    that reaches it: exceptions escaping DTLSServer._dispatch are not swallowed.

    (It asks for ``bounded_run`` only to start that first: the two overlap.)"""
    # The FuzzedDataProvider takes numbers from the end: draw 2 (mode 1, a raw datagram
    # from the established session's address), then a stranger; the rest is the datagram.
    datagram = b"\x17\xfe\xfd\x00\x01INJECTED-BUG" + bytes(8)
    crash_input = tmp_path / "input"
    crash_input.write_bytes(datagram + b"\x00\x02")
    result = _run([str(crash_input)], tmp_path, FUZZ_DATAGRAMS_INJECT_BUG="1")
    report = result.stdout + result.stderr  # atheris prints the traceback on stdout
    assert result.returncode != 0
    assert "IndexError: injected bug" in report
    assert "in _dispatch" in report
    # And without the planted bug the same input is harmless.
    clean = _run([str(crash_input)], tmp_path)
    assert clean.returncode == 0, clean.stderr[-4000:]


@pytest.mark.slow
def test_fuzz_target_runs_clean_for_a_bounded_time(bounded_run: Callable[[], Outcome]) -> None:
    returncode, output, directory = bounded_run()
    lines = output.splitlines()
    progress = [line for line in lines if line.startswith("fuzz_datagrams:")]
    done = [line for line in lines if "DONE" in line or line.startswith("Done")]
    print(f"\n[fuzz] {progress[-1] if progress else 'no progress line'}\n[fuzz] {done}")
    assert returncode == 0, output[-4000:]
    assert done, output[-4000:]
    assert not list(directory.glob("crash-*")), output[-4000:]
    # It got past the stateless cookie into real handshakes and an established session.
    assert progress, output[-4000:]
    assert "'handshakes_started'" in progress[-1] and "'datagrams_in'" in progress[-1]
