"""``make bench-scaling``: how many volunteer cores one head can feed.

Measures, on this machine:

1. **Ingestion.** Results per second that ``record_results`` writes to the store (one call
   and one commit per batch, as the dispatcher does), with batches of 200 to 50,000 rows,
   on SQLite and on PostgreSQL (a private server from Debian's package, started here,
   with its default ``synchronous_commit = on`` and with ``off``).
2. **Dispatcher overhead per batch.** A real dispatcher runs trivial rows on a real local
   Ray head (sandbox on) with fixed batches of 200, 2,000 and 50,000 rows. Its thread's
   CPU in each step of a batch is timed (payload build + Ray submit, result fetch +
   unpickle, store), as well as the whole process's CPU per batch (Ray's own threads
   included). ``ray.wait`` over many pending batches is timed too: the dispatcher calls
   it on every loop, and at a thousand volunteer cores two thousand batches are in flight.
3. **The estimate.** For W2-like rows (5 ms each) and adaptive batches of ``batch_seconds``
   of work (200 rows for 1 s, 2,000 for 10 s), each core needs one batch per
   ``batch_seconds``; the head saturates when the dispatcher's thread spends all its time
   on batches (see ``estimate``).

Writes bench/results/scaling.json and prints Markdown tables. ``--quick`` uses small
sizes (about a minute). Timings on a shared 2-core machine are noisy: the load average
is recorded with the results.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
# tests/support/postgres.py, the private PostgreSQL server, imported alone (not the support
# package, which sets up a test session).
sys.path.insert(0, str(ROOT / "tests" / "support"))

W2_ROW_SECONDS = 0.005
NODE = "ab" * 28  # shaped like a Ray node id
# Batch size -> rows measured. 200 and 2,000 rows are W2 batches of 1 s and 10 s of work
# (what the estimate needs); 1,000 is the first batches' size, 50,000 a large batch.
SIZES = {200: 40_000, 1_000: 200_000, 2_000: 200_000, 50_000: 200_000}


def _process_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _settings(name: str, db_url: str = "", **extra):
    from engine.settings import Settings

    data_dir = tempfile.mkdtemp(prefix=f"cs-{name}-", dir="/tmp")
    return Settings(data_dir=data_dir, db_url=db_url, max_upload_mb=4000, replication=1, **extra)


def _project(store, settings, rows: int, script: bytes, **options) -> int:
    from engine import accounts, projects

    return projects.submit_project(
        store, settings, accounts.local_admin(store), title="scaling", script_name="s.py",
        script_bytes=script, dataset_name="d.csv",
        dataset_bytes=b"x\n" + b"".join(b"%d\n" % i for i in range(rows)), **options)


def _databases(server) -> dict[str, str]:
    """Backend name -> database URL ('' is SQLite in the data directory)."""
    import psycopg

    urls = {"sqlite": ""}
    if server is not None:
        urls["postgresql"] = server.create_database("sync")
        urls["postgresql, synchronous_commit=off"] = server.create_database("async")
        with psycopg.connect(server.conninfo("postgres"), autocommit=True) as connection:
            connection.execute("ALTER DATABASE async SET synchronous_commit = off")
    return urls


# -- 1. ingestion ----------------------------------------------------------------------


def ingestion(urls: dict[str, str], scale: float) -> list[dict]:
    from engine.ledger import record_results
    from engine.node.result import RowResult
    from engine.status import ProjectStatus, transition_project
    from engine.store import Store

    rows = []
    for backend, url in urls.items():
        settings = _settings("ingest", url)
        store = Store(settings)
        for batch, total in SIZES.items():
            total = max(batch, int(total * scale))
            pid = _project(store, settings, total, b"def main(row):\n    return 1\n")
            with store.session() as session:
                transition_project(session, pid, ProjectStatus.RUNNING)
            walls, cpus = [], []
            for start in range(0, total, batch):
                # What a W2 batch returns: a small integer per row, its CPU time.
                results = [RowResult(i, True, str(i * 7919 % 1_000_003), None, None, 0.005)
                           for i in range(start, min(total, start + batch))]
                wall, cpu = time.perf_counter(), time.process_time()
                with store.session() as session:
                    record_results(session, pid, results, NODE)
                walls.append(time.perf_counter() - wall)
                cpus.append(time.process_time() - cpu)
            rows.append({"backend": backend, "batch_rows": batch, "rows": total,
                         "rows_per_second": total / sum(walls),
                         "median_batch_ms": statistics.median(walls) * 1000,
                         "head_cpu_us_per_row": sum(cpus) / total * 1e6})
            print(f"ingestion {backend} {batch}: {total / sum(walls):,.0f} rows/s", file=sys.stderr)
        store.engine.dispose()
        shutil.rmtree(settings.data_dir, ignore_errors=True)
    return rows


# -- 2. dispatcher overhead --------------------------------------------------------------


def _timed_dispatcher(store, settings):
    """A Dispatcher that adds up its own thread's CPU time in each step of a batch."""
    from engine.scheduler import Dispatcher

    class Timed(Dispatcher):
        def __init__(self, *args):
            super().__init__(*args)
            self.steps = {"dispatch": 0.0, "finish": 0.0, "store": 0.0, "store_wall": 0.0}
            self.batches = 0
            # Every result reaches the store through the one writer (engine.recorder).
            record = self.writer.record

            def timed_record(*args, **kwargs):
                started, wall = time.thread_time(), time.perf_counter()
                record(*args, **kwargs)
                self.steps["store"] += time.thread_time() - started
                self.steps["store_wall"] += time.perf_counter() - wall

            self.writer.record = timed_record

        def _dispatch(self, run, batch):
            started = time.thread_time()
            super()._dispatch(run, batch)
            self.steps["dispatch"] += time.thread_time() - started
            self.batches += 1

        def _finish(self, run, batch, ref):
            started = time.thread_time()
            super()._finish(run, batch, ref)
            self.steps["finish"] += time.thread_time() - started

    return Timed(store, settings)


def dispatcher_overhead(urls: dict[str, str], head_settings, scale: float) -> list[dict]:
    from engine.models import Project
    from engine.status import ProjectStatus
    from engine.store import Store

    script = (BENCH / "workloads" / "w1_square.py").read_bytes()
    rows = []
    for backend, url in urls.items():
        if "synchronous_commit" in backend:
            continue
        settings = head_settings.replace(db_url=url)
        store = Store(settings)
        for batch, total in SIZES.items():
            if batch == 1_000:
                continue  # between 200 and 2,000; the dispatcher runs take the longest
            total = max(batch, int(total * scale))
            pid = _project(store, settings, total, script, batch_size=batch)
            dispatcher = _timed_dispatcher(store, settings)

            def ended() -> bool:
                with store.session() as session:
                    return ProjectStatus(session.get(Project, pid).status).is_terminal()

            wall, cpu, thread = time.perf_counter(), _process_cpu(), time.thread_time()
            dispatcher.run(until=ended)
            wall, cpu = time.perf_counter() - wall, _process_cpu() - cpu
            thread = time.thread_time() - thread
            n = max(dispatcher.batches, 1)
            steps = dispatcher.steps
            in_steps = steps["dispatch"] + steps["finish"]
            rows.append({
                "backend": backend, "batch_rows": batch, "rows": total, "batches": n,
                "process_cpu_ms_per_batch": cpu / n * 1000,
                "dispatch_ms_per_batch": steps["dispatch"] / n * 1000,
                "fetch_unpickle_ms_per_batch": (steps["finish"] - steps["store"]) / n * 1000,
                "store_cpu_ms_per_batch": steps["store"] / n * 1000,
                "store_wall_ms_per_batch": steps["store_wall"] / n * 1000,
                # The loop itself and its timed chores (refresh every 0.25 s, registry
                # and credit every 2 s, the lease): a share of the thread, not per batch.
                "loop_cpu_share": max(thread - in_steps, 0.0) / wall,
                "end_to_end_rows_per_second": total / wall})
            print(f"dispatcher {backend} {batch}: {cpu / n * 1000:.1f} ms CPU per batch",
                  file=sys.stderr)
        store.engine.dispose()
    return rows


def wait_cost(counts=(100, 1000, 4000)) -> list[dict]:
    """Time of the dispatcher's two ``ray.wait`` calls per loop over N pending batches."""
    import ray

    @ray.remote(num_cpus=0, resources={"constellation-bench-absent": 1})
    def never():  # needs a resource no node has: stays pending, costs no CPU
        return None

    rows = []
    for count in counts:
        refs = [never.remote() for _ in range(count)]
        timings = []
        for _ in range(20):
            started = time.perf_counter()
            ray.wait(refs, num_returns=1, timeout=0)
            ray.wait(refs, num_returns=len(refs), timeout=0)
            timings.append(time.perf_counter() - started)
        for ref in refs:
            ray.cancel(ref, force=True)
        rows.append({"pending": count, "wait_ms": statistics.median(timings) * 1000})
    return rows


# -- 3. the estimate ---------------------------------------------------------------------


def _line(points: dict[float, float]) -> tuple[float, float]:
    """(intercept, slope) through the smallest and largest x, neither below zero."""
    small, large = min(points), max(points)
    slope = max((points[large] - points[small]) / (large - small), 0.0)
    return max(points[small] - slope * small, 0.0), slope


def estimate(ingest: list[dict], overhead: list[dict], waits: list[dict]) -> list[dict]:
    """Cores one head can feed with W2-like rows, for batch_seconds of 1 and 10.

    The dispatcher is one thread, and it does every step of a batch itself: payload build
    and Ray submit, fetch and unpickle (its own CPU time, measured under Ray), and the
    store write (wall time, measured alone: the thread waits for the disk or the server).
    Its loop and timed chores take a share of the thread whatever the load. N cores keep
    2N batches in flight and finish N / batch_seconds batches a second; each also costs
    the loop's two ``ray.wait`` calls over the pending ones (at most: a loop that finds
    several batches done shares them). The head is saturated when
    N * (per_batch + w0 + w1 * 2N) = batch_seconds * (1 - loop share).
    """
    w0, w1 = _line({float(r["pending"]): r["wait_ms"] / 1000 for r in waits})
    out = []
    for backend in dict.fromkeys(r["backend"] for r in ingest):
        engine_backend = backend.split(",")[0]
        for batch_seconds in (1.0, 10.0):
            rows = int(batch_seconds / W2_ROW_SECONDS)
            run = next((r for r in overhead
                        if r["backend"] == engine_backend and r["batch_rows"] == rows), None)
            stored = next((r for r in ingest
                           if r["backend"] == backend and r["batch_rows"] == rows), None)
            if run is None or stored is None:
                continue
            work = (run["dispatch_ms_per_batch"] + run["fetch_unpickle_ms_per_batch"]) / 1000
            store = stored["median_batch_ms"] / 1000
            share = min(run["loop_cpu_share"], 0.5)
            a, b, c = 2 * w1, work + store + w0, batch_seconds * (1 - share)
            cores = c / b if a == 0 else (-b + (b * b + 4 * a * c) ** 0.5) / (2 * a)
            out.append({"backend": backend, "batch_seconds": batch_seconds, "batch_rows": rows,
                        "dispatch_fetch_ms": work * 1000, "store_ms": store * 1000,
                        "wait_ms": (w0 + w1 * 2 * cores) * 1000, "loop_share": share,
                        "cores": cores, "rows_per_second": cores / W2_ROW_SECONDS})
    return out


def _table(title: str, rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    lines = [f"### {title}", "", "| " + " | ".join(keys) + " |",
             "|" + "|".join("---" for _ in keys) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(f"{v:,.3g}" if isinstance(v, float) and v < 100
                                       else f"{v:,.0f}" if isinstance(v, float)
                                       else str(v) for v in row.values()) + " |")
    return "\n".join(lines) + "\n"


def run(quick: bool, output: Path) -> dict:
    from postgres import PostgresServer, PostgresUnavailable

    scale = 0.25 if quick else 1.0
    results: dict = {"quick": quick, "cpus": os.cpu_count(),
                     "load_average_before": os.getloadavg(),
                     "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    try:
        server = PostgresServer(durable=True).start()
    except PostgresUnavailable as exc:
        print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
        server = None
    head = None
    head_settings = _settings("head", ray_num_cpus=2)
    try:
        urls = _databases(server)
        results["ingestion"] = ingestion(urls, scale)
        from engine import cluster

        head = cluster.LocalHead(head_settings)
        cluster.connect(head_settings)
        results["dispatcher"] = dispatcher_overhead(urls, head_settings, scale)
        results["ray_wait"] = wait_cost()
        results["estimate"] = estimate(results["ingestion"], results["dispatcher"],
                                       results["ray_wait"])
    finally:
        import ray

        ray.shutdown()
        if head is not None:
            head.stop(grace=2)
        if server is not None:
            server.stop()
        shutil.rmtree(head_settings.data_dir, ignore_errors=True)
    results["load_average_after"] = os.getloadavg()
    output.mkdir(parents=True, exist_ok=True)
    (output / "scaling.json").write_text(json.dumps(results, indent=2))
    print(_table("Ingestion (record_results, one commit per batch)", results["ingestion"]))
    print(_table("Dispatcher overhead per batch (trivial rows, sandbox on)", results["dispatcher"]))
    print(_table("ray.wait over pending batches", results["ray_wait"]))
    print(_table("Cores one head can feed, W2-like rows (5 ms)", results["estimate"]))
    print(f"load average before {results['load_average_before']}, "
          f"after {results['load_average_after']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.scaling")
    parser.add_argument("--quick", action="store_true", help="small sizes (about a minute)")
    parser.add_argument("--output", type=Path, default=BENCH / "results")
    args = parser.parse_args()
    run(args.quick, args.output)


if __name__ == "__main__":
    main()
