"""``make bench``: Constellation against its baselines, side by side, in one run.

Constellation is measured as users run it: ``engine serve --no-portal`` is up (a warm
head and dispatcher) and each workload is submitted with ``python -m engine submit
--wait``, timed from submission to ``complete`` with results in SQLite, sandbox on,
replication 1. The baselines run first (the Ray ones on the same head, as a driver of
their own), then a small warm-up project, then the three workloads. Writes
bench/results/latest.json, prints a Markdown table, saves a PNG.

``--smoke`` runs tiny sizes in well under a minute; it checks that the benchmark works
and asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare_passages.csv"

FULL = {"W1": 1_000_000, "W2": 2_000, "W3": None, "B2_rows": 20_000}
SMOKE = {"W1": 20_000, "W2": 40, "W3": 200, "B2_rows": 300}
W2_ITERATIONS = 100_000  # about 5 ms of pure Python per row on the reference machine


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def _datasets(workdir: Path, sizes: dict) -> dict[str, Path]:
    w1 = workdir / "w1.csv"
    w1.write_text("x\n" + "".join(f"{i}\n" for i in range(sizes["W1"])))
    w2 = workdir / "w2.csv"
    w2.write_text("n\n" + f"{W2_ITERATIONS}\n" * sizes["W2"])
    w3 = workdir / "w3.csv"
    with open(SHAKESPEARE, newline="") as src, open(w3, "w", newline="") as dst:
        reader, writer = csv.reader(src), csv.writer(dst)
        for i, record in enumerate(reader):
            if sizes["W3"] is not None and i > sizes["W3"]:
                break
            writer.writerow(record)
    return {"W1": w1, "W2": w2, "W3": w3}


def _rows(path: Path) -> list[dict]:
    from engine.dataset import parse_dataset

    dataset = parse_dataset(path.name, path.read_bytes(), max_bytes=1 << 31)
    return [dict(zip(dataset.columns, r)) for r in dataset.rows]


class Stack:
    """``engine serve --no-portal`` in its own data directory, stopped by process group."""

    def __init__(self, workdir: Path, name: str, extra_env: dict[str, str]):
        self.data_dir = Path(tempfile.mkdtemp(prefix=f"cb-{name}-", dir="/tmp"))
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "CONSTELLATION_"))}
        self.env.update({"CONSTELLATION_DATA_DIR": str(self.data_dir),
                         "CONSTELLATION_RAY_PORT": str(_free_port()),
                         "CONSTELLATION_LOG_LEVEL": "WARNING",
                         # The issue measures replication 1: one machine, no volunteers.
                         "CONSTELLATION_REPLICATION": "1",
                         "CONSTELLATION_MAX_UPLOAD_MB": "2000",
                         # Stacks may overlap (a baseline's, then ours): Ray picks the ports.
                         "CONSTELLATION_HEAD_PORTS": "",
                         "PYTHONPATH": str(ROOT), **extra_env})
        started = time.perf_counter()
        self.process = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--no-portal"],
                                        env=self.env, cwd=ROOT, start_new_session=True,
                                        stdout=subprocess.DEVNULL,
                                        stderr=open(workdir / f"serve-{name}.log", "wb"))
        from sqlalchemy.exc import OperationalError

        from engine.settings import Settings
        from engine.status import ClusterStatus
        from engine.store import Store

        self.settings = Settings.from_env(self.env)
        deadline = time.monotonic() + 120
        while True:
            try:
                self.store = Store(self.settings)
                if self.store.cluster_health()["status"] == ClusterStatus.ONLINE:
                    break
            except OperationalError:  # "database is locked": serve is creating it
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.stop()
                raise RuntimeError(f"the stack did not come up; see {workdir}/serve-{name}.log")
            time.sleep(0.1)
        self.startup_seconds = time.perf_counter() - started

    def submit(self, script: Path, dataset: Path) -> tuple[int, float]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "engine", "submit", str(script), str(dataset),
                               "--wait"], env=self.env, cwd=ROOT, capture_output=True, text=True)
        elapsed = time.perf_counter() - started
        if done.returncode != 0:
            raise RuntimeError(f"submit failed ({done.returncode}): {done.stderr[-2000:]}")
        return int(done.stdout.strip()), elapsed

    def first_result_latency(self, project_id: int) -> float:
        from sqlalchemy import text

        with self.store.session() as session:
            return session.execute(text(
                "SELECT MIN(t.finished_at) - p.created_at FROM tasks t JOIN projects p "
                "ON p.id = t.project_id WHERE p.id = :p"), {"p": project_id}).scalar_one()

    def dispatcher_peak_rss_mib(self) -> float | None:
        for pid in Path("/proc").iterdir():
            if not pid.name.isdigit():
                continue
            try:
                cmdline = (pid / "cmdline").read_bytes().split(b"\0")
                environ = (pid / "environ").read_bytes()
            except OSError:
                continue
            if b"dispatcher" in cmdline and str(self.data_dir).encode() in environ:
                for line in (pid / "status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        return int(line.split()[1]) / 1024
        return None

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


def _warm_up(workdir: Path) -> tuple[Path, Path]:
    script, dataset = workdir / "warm_up.py", workdir / "warm_up.csv"
    script.write_text("def main(row):\n    return row['x']\n")
    dataset.write_text("x\n" + "".join(f"{i}\n" for i in range(10)))
    return script, dataset


def _rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else float("inf")


def run(smoke: bool, output: Path) -> dict:
    from bench import baselines

    sizes = SMOKE if smoke else FULL
    workdir = Path(tempfile.mkdtemp(prefix="cbench-", dir="/tmp"))
    data = _datasets(workdir, sizes)
    scripts = {"W1": BENCH / "workloads" / "w1_square.py", "W2": BENCH / "workloads" / "w2_cpu.py",
               "W3": BENCH / "workloads" / "w3_passages.py"}
    results: dict = {"smoke": smoke, "cpus": os.cpu_count(), "python": platform.python_version(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "workloads": {}}
    stack = Stack(workdir, "sandbox", {})
    results["ray_startup_seconds"] = stack.startup_seconds
    try:
        from engine import cluster

        cluster.connect(stack.settings)  # the Ray baselines drive the same warm head
        import ray

        ray.cloudpickle.register_pickle_by_value(baselines)
        for name in ("W1", "W2", "W3"):
            source = scripts[name].read_text()
            rows = _rows(data[name])
            n = len(rows)
            entry = {"rows": n}
            entry["B0"] = _rate(n, baselines.b0_loop(source, rows))
            entry["B1"] = _rate(n, baselines.b1_pool(source, rows))
            b2_rows = rows[:sizes["B2_rows"]] if name == "W1" else rows
            entry["B2"] = _rate(len(b2_rows), baselines.b2_task_per_row(source, b2_rows))
            entry["B3"] = _rate(n, baselines.b3_fixed_batches(source, rows))
            results["workloads"][name] = entry
            print(f"{name}: baselines done", file=sys.stderr)
        # The Ray baselines ran as a second driver on the head, and Ray retired the
        # dispatcher's idle workers to make room for theirs. A long-lived `make run` has no
        # second driver: end this one, and warm the dispatcher with a small project of
        # another script, as any earlier project would (each workload's own script still
        # starts cold, as a researcher's new script does).
        ray.shutdown()
        stack.submit(*_warm_up(workdir))
        for name in ("W1", "W2", "W3"):
            entry = results["workloads"][name]
            project_id, seconds = stack.submit(scripts[name], data[name])
            entry["constellation"] = _rate(entry["rows"], seconds)
            entry["constellation_seconds"] = seconds
            entry["first_result_seconds"] = stack.first_result_latency(project_id)
            if name == "W1":
                entry["dispatcher_peak_rss_mib"] = stack.dispatcher_peak_rss_mib()
                entry.update(_export_and_status(stack, project_id, workdir))
            print(f"{name}: done", file=sys.stderr)
    finally:
        stack.stop()
    if not smoke:
        plain = Stack(workdir, "nosandbox", {"CONSTELLATION_SANDBOX": "none"})
        try:
            plain.submit(*_warm_up(workdir))
            for name in ("W1", "W2"):
                _, seconds = plain.submit(scripts[name], data[name])
                results["workloads"][name]["constellation_no_sandbox"] = _rate(
                    results["workloads"][name]["rows"], seconds)
        finally:
            plain.stop()
    output.mkdir(parents=True, exist_ok=True)
    (output / "latest.json").write_text(json.dumps(results, indent=2))
    print(_table(results))
    _chart(results, output / "latest.png")
    return results


def _export_and_status(stack: Stack, project_id: int, workdir: Path) -> dict:
    from engine import accounts, projects

    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "engine", "results", str(project_id), "--format", "csv",
                    "--output", str(workdir / "w1.out.csv")], env=stack.env, cwd=ROOT, check=True)
    export_seconds = time.perf_counter() - started
    admin = accounts.local_admin(stack.store)
    timings = []
    for _ in range(20):
        started = time.perf_counter()
        projects.project_status(stack.store, admin, project_id)
        timings.append(time.perf_counter() - started)
    return {"export_csv_seconds": export_seconds, "status_query_ms": statistics.median(timings) * 1000}


def _table(results: dict) -> str:
    lines = ["| workload | rows | B0 loop | B1 pool | B2 task/row | B3 batches | Constellation "
             "| ÷B1 | ÷B2 | no sandbox | first result |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, e in results["workloads"].items():
        plain = e.get("constellation_no_sandbox")
        lines.append(
            f"| {name} | {e['rows']:,} | {e['B0']:,.0f} | {e['B1']:,.0f} | {e['B2']:,.0f} | "
            f"{e['B3']:,.0f} | {e['constellation']:,.0f} | {e['constellation'] / e['B1']:.2f} | "
            f"{e['constellation'] / e['B2']:.1f} | {f'{plain:,.0f}' if plain else '-'} | "
            f"{e['first_result_seconds']:.2f} s |")
    w1 = results["workloads"]["W1"]
    lines.append("")
    lines.append(f"rows/s. Ray start-up: {results['ray_startup_seconds']:.1f} s. W1 dispatcher peak RSS: "
                 f"{w1.get('dispatcher_peak_rss_mib') or 0:.0f} MiB; CSV export: "
                 f"{w1['export_csv_seconds']:.1f} s; status query: {w1['status_query_ms']:.1f} ms.")
    return "\n".join(lines)


def _chart(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    systems = ["B0", "B1", "B2", "B3", "constellation"]
    names = list(results["workloads"])
    figure, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.16
    for i, system in enumerate(systems):
        values = [results["workloads"][n][system] for n in names]
        axis.bar([x + i * width for x in range(len(names))], values, width, label=system)
    axis.set_xticks([x + 2 * width for x in range(len(names))], names)
    axis.set_yscale("log")
    axis.set_ylabel("rows per second (log)")
    axis.set_title(f"Constellation vs baselines on {results['cpus']} cores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes; checks the benchmark runs")
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    run(args.smoke, args.output)


if __name__ == "__main__":
    main()
