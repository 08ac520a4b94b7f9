"""The baselines Constellation is measured against, on rows already in memory.

B0 is the one-core limit (a plain loop), B1 the local parallel limit (a process pool
with chunks), B2 the naive Ray design (one task per row), B3 plain Ray batches with no
store and no sandbox.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from typing import Any, Callable

_main: Callable | None = None


def load_main(source: str) -> Callable:
    namespace: dict[str, Any] = {"__name__": "__bench__"}
    exec(compile(source, "workload.py", "exec"), namespace)
    return namespace["main"]


def b0_loop(source: str, rows: list[dict]) -> float:
    main = load_main(source)
    started = time.perf_counter()
    for row in rows:
        main(row)
    return time.perf_counter() - started


def _init_pool(source: str) -> None:
    global _main
    _main = load_main(source)


def _pool_chunk(rows: list[dict]) -> int:
    for row in rows:
        _main(row)
    return len(rows)


def b1_pool(source: str, rows: list[dict]) -> float:
    cores = os.cpu_count() or 1
    size = max(1, len(rows) // (cores * 8))
    chunks = [rows[i:i + size] for i in range(0, len(rows), size)]
    with multiprocessing.Pool(cores, initializer=_init_pool, initargs=(source,)) as pool:
        started = time.perf_counter()
        done = sum(pool.imap_unordered(_pool_chunk, chunks))
        elapsed = time.perf_counter() - started
    assert done == len(rows)
    return elapsed


def _ray_functions():
    import ray

    cache: dict[str, Callable] = {}

    def compiled(source: str) -> Callable:
        if source not in cache:
            cache[source] = load_main(source)
        return cache[source]

    @ray.remote
    def one_row(source, row):
        return compiled(source)(row)

    @ray.remote
    def batch(source, rows):
        main = compiled(source)
        return [main(row) for row in rows]

    return one_row, batch


def b2_task_per_row(source: str, rows: list[dict]) -> float:
    import ray

    one_row, _ = _ray_functions()
    source_ref = ray.put(source)
    ray.get([one_row.remote(source_ref, rows[0])])  # warm a worker
    started = time.perf_counter()
    ray.get([one_row.remote(source_ref, row) for row in rows])
    return time.perf_counter() - started


def b3_fixed_batches(source: str, rows: list[dict], size: int = 1000) -> float:
    import ray

    _, batch = _ray_functions()
    source_ref = ray.put(source)
    ray.get([batch.remote(source_ref, rows[:1])])
    started = time.perf_counter()
    ray.get([batch.remote(source_ref, rows[i:i + size]) for i in range(0, len(rows), size)])
    return time.perf_counter() - started

