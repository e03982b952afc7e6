"""The performance suite in one command: every figure beside bare trio's, in the same run.

    python benchmarks/run.py             # the full suite, about 15 minutes
    python benchmarks/run.py --quick     # a smoke run, about 3 minutes

It uses the load generator and reference servers in ``../shared/bench`` where
they are (copied to a scratch folder to build, never into the project):

1. the certificate matrix, bare ``trio.DTLSEndpoint`` echo (``raw_trio``) and
   ``trio-dtls-server serve --app echo`` alternately, server pinned to CPU 0 and
   ``dtlsload`` to CPU 1: full handshakes/s at 1, 8, 64 in flight; echo round
   trips/s and latency at 1, 16, 256, 1024 sessions x 1 and 8 in flight; RSS per
   idle session at 1,000 and 10,000 sessions; server CPU per datagram and per
   handshake; the generator's own CPU share;
2. PSK handshakes (bare trio has no PSK: the reference is its certificate figure);
3. abbreviated (resumed) against full handshakes, with benchmarks/resume_load.py;
4. 1 against 2 workers sharing the port (SO_REUSEPORT), unpinned, the load
   generator sharing the two cores.

Writes ``OUT/results.md``, ``OUT/results.json`` and ``OUT/echo.png`` (OUT is
benchmarks/out by default). Only loopback is used, and every load is bounded in
time. Performance is never asserted in the test suite; this is where it is
measured.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SHARED_BENCH = ROOT.parent / "shared" / "bench"
PY = sys.executable
PSK = "bench:00112233445566778899aabbccddeeff"
PROJECT = f"{PY} -m trio_dtls_server serve --app echo --no-client-auth --max-sessions 20000"
RAW_TRIO = f"{PY} servers/raw_trio_echo.py"


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def prepare(work: Path, static_openssl: bool) -> Path:
    """A built copy of ../shared/bench under ``work`` (shared/ may be read-only)."""
    if not SHARED_BENCH.is_dir():
        raise SystemExit(f"cannot find the shared bench at {SHARED_BENCH}")
    bench = work / "bench"
    if not bench.exists():
        shutil.copytree(SHARED_BENCH, bench, ignore=shutil.ignore_patterns("build", "out"))
    if static_openssl and not (bench / "build/openssl/lib/libssl.a").exists():
        log("building a static OpenSSL 3.5 for the load generator (once, ~6-10 min)")
        # build_openssl.sh can die of SIGPIPE under pipefail; one retry covers it.
        for _ in range(2):
            if subprocess.run(["bash", "build_openssl.sh"], cwd=bench).returncode == 0:
                break
        else:
            log("static OpenSSL failed; the generator uses the system OpenSSL")
        subprocess.run(["make", "-s", "clean"], cwd=bench, check=False)
    subprocess.run(["make", "-s", "all"], cwd=bench, check=True)
    if not (bench / "out/certs/server.pem").exists():
        subprocess.run(
            ["bash", "gen_certs.sh", "out/certs"], cwd=bench, check=True, stdout=subprocess.DEVNULL
        )
    return bench


def matrix(
    bench: Path, out: Path, options: list[str], servers: dict[str, str]
) -> list[dict[str, Any]]:
    out.mkdir(parents=True, exist_ok=True)
    command = ["bash", "run_matrix.sh", *options, "--out", str(out)]
    for name, cmd in servers.items():
        command += ["--server", f"{name}={cmd}"]
    log(f"matrix -> {out}")
    env = dict(os.environ, PYTHON=PY)
    subprocess.run(command, cwd=bench, check=True, env=env, stdout=subprocess.DEVNULL)
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


class Server:
    """A ``trio-dtls-server serve`` process; CPU time summed over its process tree."""

    def __init__(self, args: list[str], cpu: str | None) -> None:
        prefix = ["taskset", "-c", cpu] if cpu is not None else []
        self.proc = subprocess.Popen(
            [*prefix, *args], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening on "):
            self.stop()
            raise RuntimeError(f"server did not start: {line!r}")
        self.port = int(line.rsplit(":", 1)[1])

    def cpu_seconds(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0.0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            pid, ppid = int(stat.parent.name), int(fields[1])
            if self.proc.pid in (pid, ppid):
                total += (int(fields[11]) + int(fields[12])) / ticks
        return total

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def project_server(bench: Path, *options: str, cpu: str | None) -> Server:
    """``trio-dtls-server serve --app echo`` on an ephemeral port with the bench's certificate."""
    certs = bench / "out/certs"
    return Server(
        [
            *PROJECT.split(),
            *options,
            "--port",
            "0",
            "--cert",
            str(certs / "server.pem"),
            "--key",
            str(certs / "server.key"),
        ],
        cpu=cpu,
    )


def resumption(bench: Path, reps: int, duration: float) -> list[dict[str, Any]]:
    certs = bench / "out/certs"
    results = []
    for rep in range(reps):
        for mode in ("full", "resumed") if rep % 2 == 0 else ("resumed", "full"):
            server = project_server(bench, cpu="0")
            try:
                cpu0 = server.cpu_seconds()
                done = subprocess.run(
                    [
                        "taskset",
                        "-c",
                        "1",
                        PY,
                        str(ROOT / "benchmarks/resume_load.py"),
                        "--port",
                        str(server.port),
                        "--ca",
                        str(certs / "ca.pem"),
                        "--mode",
                        mode,
                        "--duration",
                        str(duration),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    timeout=duration + 60,
                )
                cpu = server.cpu_seconds() - cpu0
            finally:
                server.stop()
            result = json.loads(done.stdout)
            total = result["handshakes"] + 1
            result["server_cpu_us_per_handshake"] = round(1e6 * cpu / max(total, 1))
            result["rep"] = rep
            results.append(result)
            log(f"resumption {mode}: {result['handshakes_per_s']:.0f}/s")
    return results


def workers(
    bench: Path, reps: int, duration: float, cells: list[tuple[int, int]]
) -> list[dict[str, Any]]:
    results = []
    for rep in range(reps):
        for sessions, window in cells:
            for count in (1, 2) if rep % 2 == 0 else (2, 1):
                server = project_server(bench, "--workers", str(count), cpu=None)
                try:
                    cpu0, wall0 = server.cpu_seconds(), time.monotonic()
                    done = subprocess.run(
                        [
                            str(bench / "build/dtlsload"),
                            "--host",
                            "127.0.0.1",
                            "--port",
                            str(server.port),
                            "--mode",
                            "echo",
                            "--sessions",
                            str(sessions),
                            "--window",
                            str(window),
                            "--duration",
                            str(duration),
                            "--warmup",
                            "1",
                            "--ciphers",
                            "ECDHE-ECDSA-AES128-GCM-SHA256",
                            "--groups",
                            "P-256",
                        ],
                        capture_output=True,
                        text=True,
                        timeout=duration + 120,
                    )
                    cpu = server.cpu_seconds() - cpu0
                    wall = time.monotonic() - wall0
                finally:
                    server.stop()
                load = json.loads(done.stdout)
                results.append(
                    {
                        "workers": count,
                        "sessions": sessions,
                        "window": window,
                        "rep": rep,
                        "msgs_per_s": load["msgs_per_s"],
                        "lost": load.get("lost", 0),
                        "client_cpu_pct": load.get("client_cpu_pct"),
                        "server_cpu_pct_whole_run": round(100 * cpu / wall, 1),
                        "latency_us": load.get("latency_us"),
                    }
                )
                log(f"workers {count} {sessions}x{window}: {load['msgs_per_s']:.0f}/s")
    return results


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def by_cell(records: list[dict[str, Any]]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    cells: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in records:
        cells.setdefault((record["server"], record["cell"]), []).append(record["result"])
    return cells


def summarize(
    cert: list[dict[str, Any]],
    psk: list[dict[str, Any]],
    resumed: list[dict[str, Any]],
    scaled: list[dict[str, Any]],
    out: Path,
) -> dict[str, Any]:
    cells = by_cell(cert)
    psk_cells = by_cell(psk)
    names = sorted({cell for _, cell in cells}, key=_cell_order)
    rows = []
    for cell in names:
        raw, ours = cells.get(("raw_trio", cell), []), cells.get(("project", cell), [])
        metric = _metric(cell)
        row: dict[str, Any] = {"cell": cell, "metric": metric}
        for name, results in (("raw_trio", raw), ("project", ours)):
            row[name] = median([r[metric] for r in results if metric in r])
            row[f"{name}_server_cpu_pct"] = median([r.get("server_cpu_pct", 0) for r in results])
            row[f"{name}_client_cpu_pct_max"] = max(
                (r.get("client_cpu_pct", 0) for r in results), default=0
            )
            if cell.startswith("echo"):
                row[f"{name}_p50_us"] = median([r["latency_us"]["p50"] for r in results])
                row[f"{name}_p99_us"] = median([r["latency_us"]["p99"] for r in results])
                row[f"{name}_server_us_per_msg"] = median(
                    [
                        1e6 * r["server_cpu_pct"] / 100 / r["msgs_per_s"]
                        for r in results
                        if r.get("msgs_per_s")
                    ]
                )
            if cell.startswith("hs"):
                row[f"{name}_server_us_per_hs"] = median(
                    [
                        1e6 * r["server_cpu_pct"] / 100 / r["handshakes_per_s"]
                        for r in results
                        if r.get("handshakes_per_s")
                    ]
                )
        if cell.startswith("idle"):
            row["raw_trio"], row["project"] = _kib_per_session(cert, cell)
        row["ratio"] = row["project"] / row["raw_trio"] if row["raw_trio"] else float("nan")
        rows.append(row)
    psk_rows = []
    for (server, cell), results in sorted(psk_cells.items()):
        if server != "project":
            continue
        value = median([r["handshakes_per_s"] for r in results])
        reference = next((r["raw_trio"] for r in rows if r["cell"] == cell), float("nan"))
        psk_rows.append(
            {
                "cell": cell,
                "project_psk": value,
                "raw_trio_cert": reference,
                "ratio": value / reference if reference else float("nan"),
                "server_us_per_hs": median(
                    [
                        1e6 * r["server_cpu_pct"] / 100 / r["handshakes_per_s"]
                        for r in results
                        if r.get("handshakes_per_s")
                    ]
                ),
            }
        )
    summary = {
        "cert_matrix": rows,
        "psk_handshakes": psk_rows,
        "resumption": _summarize_resumption(resumed),
        "workers": _summarize_workers(scaled),
    }
    (out / "results.json").write_text(
        json.dumps(
            {
                "summary": summary,
                "runs": {"cert": cert, "psk": psk, "resumption": resumed, "workers": scaled},
            },
            indent=1,
        )
    )
    (out / "results.md").write_text(_markdown(summary))
    _plot(rows, out / "echo.png")
    return summary


def _cell_order(cell: str) -> tuple[int, int, int]:
    parts = cell.split("_")
    kind = {"hs": 0, "echo": 1, "idle": 2}[parts[0]]
    numbers = [int("".join(c for c in p if c.isdigit())) for p in parts[1:]]
    return (kind, numbers[1] if len(numbers) > 1 else 0, numbers[0])


def _metric(cell: str) -> str:
    return {"hs": "handshakes_per_s", "echo": "msgs_per_s", "idle": "kib_per_session"}[
        cell.split("_")[0]
    ]


def _kib_per_session(records: list[dict[str, Any]], cell: str) -> tuple[float, float]:
    values: dict[str, list[float]] = {"raw_trio": [], "project": []}
    for record in records:
        if record["cell"] == cell and record["server"] in values and "kib_per_session" in record:
            values[record["server"]].append(record["kib_per_session"])
    return median(values["raw_trio"]), median(values["project"])


def _summarize_resumption(results: list[dict[str, Any]]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for mode in ("full", "resumed"):
        mine = [r for r in results if r["mode"] == mode]
        summary[mode] = {
            "handshakes_per_s": median([r["handshakes_per_s"] for r in mine]),
            "server_cpu_us_per_handshake": median(
                [r["server_cpu_us_per_handshake"] for r in mine]
            ),
            "client_cpu_pct": median([r["client_cpu_pct"] for r in mine]),
            "resumed_fraction": median([r["resumed"] / max(r["handshakes"], 1) for r in mine]),
        }
    if results:
        summary["cpu_ratio_resumed_to_full"] = (
            summary["resumed"]["server_cpu_us_per_handshake"]
            / summary["full"]["server_cpu_us_per_handshake"]
        )
    return summary


def _summarize_workers(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    cells = sorted({(r["sessions"], r["window"]) for r in results})
    rows = []
    for sessions, window in cells:
        row: dict[str, Any] = {"sessions": sessions, "window": window}
        for count in (1, 2):
            mine = [
                r
                for r in results
                if (r["sessions"], r["window"], r["workers"]) == (sessions, window, count)
            ]
            row[f"w{count}_msgs_per_s"] = median([r["msgs_per_s"] for r in mine])
            row[f"w{count}_client_cpu_pct"] = median([r["client_cpu_pct"] or 0 for r in mine])
            row[f"w{count}_server_cpu_pct"] = median([r["server_cpu_pct_whole_run"] for r in mine])
        row["ratio"] = row["w2_msgs_per_s"] / row["w1_msgs_per_s"]
        rows.append(row)
    return rows


def _fmt(value: float, digits: int = 0) -> str:
    if value != value:  # NaN
        return "-"
    return f"{value:,.{digits}f}"


def _markdown(summary: dict[str, Any]) -> str:
    lines = [
        "# trio-dtls-server against bare trio: one run",
        "",
        "Medians; ratios are project / raw_trio for the same cell in the same run.",
        "",
        "## Certificate matrix (server on CPU 0, dtlsload on CPU 1)",
        "",
        "| cell | raw_trio | project | ratio | server CPU/op raw / project | "
        "p50 / p99 µs raw | p50 / p99 µs project | dtlsload CPU max % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in summary["cert_matrix"]:
        cell = row["cell"]
        unit = {"hs": " hs/s", "echo": " rt/s", "idle": " KiB/session"}[cell.split("_")[0]]
        per_op = ""
        latency_raw = latency_ours = ""
        if cell.startswith("echo"):
            per_op = (
                f"{_fmt(row['raw_trio_server_us_per_msg'], 1)} / "
                f"{_fmt(row['project_server_us_per_msg'], 1)} µs"
            )
            latency_raw = f"{_fmt(row['raw_trio_p50_us'])} / {_fmt(row['raw_trio_p99_us'])}"
            latency_ours = f"{_fmt(row['project_p50_us'])} / {_fmt(row['project_p99_us'])}"
        elif cell.startswith("hs"):
            per_op = (
                f"{_fmt(row['raw_trio_server_us_per_hs'])} / "
                f"{_fmt(row['project_server_us_per_hs'])} µs"
            )
        digits = 1 if cell.startswith("idle") else 0
        client = max(
            row.get("raw_trio_client_cpu_pct_max", 0), row.get("project_client_cpu_pct_max", 0)
        )
        lines.append(
            f"| {cell} | {_fmt(row['raw_trio'], digits)}{unit} "
            f"| {_fmt(row['project'], digits)}{unit} | {_fmt(row['ratio'], 2)}× "
            f"| {per_op} | {latency_raw} | {latency_ours} | "
            f"{_fmt(client)} |"
        )
    lines += [
        "",
        "## PSK handshakes (project; bare trio has no PSK, so its certificate figure is "
        "the reference)",
        "",
        "| cell | project PSK hs/s | raw_trio cert hs/s | ratio | server CPU µs/hs |",
        "|---|---|---|---|---|",
    ]
    for row in summary["psk_handshakes"]:
        lines.append(
            f"| {row['cell']} | {_fmt(row['project_psk'])} | {_fmt(row['raw_trio_cert'])} "
            f"| {_fmt(row['ratio'], 2)}× | {_fmt(row['server_us_per_hs'])} |"
        )
    res = summary["resumption"]
    if res:
        lines += [
            "",
            "## Session resumption (8 in flight, Python client on CPU 1)",
            "",
            "| handshake | hs/s | server CPU µs/hs | client CPU % | resumed |",
            "|---|---|---|---|---|",
        ]
        for mode in ("full", "resumed"):
            r = res[mode]
            lines.append(
                f"| {mode} | {_fmt(r['handshakes_per_s'])} | "
                f"{_fmt(r['server_cpu_us_per_handshake'])} | {_fmt(r['client_cpu_pct'])} | "
                f"{_fmt(100 * r['resumed_fraction'])}% |"
            )
        lines.append(
            f"\nServer CPU per resumed handshake / per full one: "
            f"{_fmt(res['cpu_ratio_resumed_to_full'], 2)}×"
        )
    if summary["workers"]:
        lines += [
            "",
            "## Workers (SO_REUSEPORT), unpinned, dtlsload sharing the 2 cores",
            "",
            "| cell | 1 worker rt/s | 2 workers rt/s | ratio | dtlsload CPU % (1 / 2) | "
            "server CPU % (1 / 2) |",
            "|---|---|---|---|---|---|",
        ]
        for row in summary["workers"]:
            lines.append(
                f"| {row['sessions']}×{row['window']} | {_fmt(row['w1_msgs_per_s'])} | "
                f"{_fmt(row['w2_msgs_per_s'])} | {_fmt(row['ratio'], 2)}× | "
                f"{_fmt(row['w1_client_cpu_pct'])} / {_fmt(row['w2_client_cpu_pct'])} | "
                f"{_fmt(row['w1_server_cpu_pct'])} / {_fmt(row['w2_server_cpu_pct'])} |"
            )
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib missing (pip install '.[bench]'): no plot")
        return
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for window, style in (("1", "-"), ("8", "--")):
        echo = sorted(
            (
                r
                for r in rows
                if r["cell"].startswith("echo") and r["cell"].endswith(f"_w{window}")
            ),
            key=lambda r: int(r["cell"].split("_")[1][1:]),
        )
        sessions = [int(r["cell"].split("_")[1][1:]) for r in echo]
        for name, color in (("raw_trio", "tab:gray"), ("project", "tab:blue")):
            ax.plot(
                sessions,
                [r[name] for r in echo],
                style,
                marker="o",
                color=color,
                label=f"{'bare trio' if name == 'raw_trio' else 'trio-dtls-server'}, "
                f"{window} in flight",
            )
    ax.set_xscale("log")
    ax.set_xlabel("concurrent sessions")
    ax.set_ylabel("echo round trips / s (100-byte datagrams)")
    ax.set_title("DTLS echo on one core: trio-dtls-server vs bare trio")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    log(f"plot -> {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short repetition of fewer cells")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/out")
    parser.add_argument(
        "--work",
        type=Path,
        default=None,
        help="scratch folder for the built bench (default OUT/work)",
    )
    parser.add_argument(
        "--no-static-openssl",
        action="store_true",
        help="link the generator to the system OpenSSL (slower handshakes)",
    )
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    bench = prepare(args.work or out / "work", static_openssl=not args.no_static_openssl)
    servers = {"raw_trio": RAW_TRIO, "project": PROJECT}
    if args.quick:
        reps, duration = 1, 1.5
        cert_cells = [
            "--hs-conc",
            "8",
            "--echo-sessions",
            "1,16,256",
            "--windows",
            "1",
            "--idle-sessions",
            "1000",
        ]
        worker_cells = [(256, 8)]
    else:
        reps, duration = args.reps, args.duration
        cert_cells = [
            "--hs-conc",
            "1,8,64",
            "--echo-sessions",
            "1,16,256,1024",
            "--windows",
            "1,8",
            "--idle-sessions",
            "1000,10000",
        ]
        worker_cells = [(16, 8), (256, 8), (1024, 1)]
    common = ["--reps", str(reps), "--duration", str(duration), "--warmup", "1"]
    cert = matrix(bench, out / "cert", [*common, "--kinds", "hs,echo,idle", *cert_cells], servers)
    psk = matrix(
        bench,
        out / "psk",
        [
            *common,
            "--kinds",
            "hs",
            "--hs-conc",
            "8" if args.quick else "1,8,64",
            "--client-args",
            f"--psk {PSK} --ciphers PSK-AES128-GCM-SHA256",
        ],
        {"project": f"{PROJECT} --psk {PSK}"},
    )
    resumed = resumption(bench, reps, duration)
    scaled = workers(bench, reps, duration, worker_cells)
    summary = summarize(cert, psk, resumed, scaled, out)
    print((out / "results.md").read_text())
    log(
        f"wrote {out / 'results.md'}, {out / 'results.json'}; "
        f"{len(summary['cert_matrix'])} matrix cells"
    )


if __name__ == "__main__":
    main()
