"""The multi-node path's throughput: projects over a head and three worker nodes on this
machine, through the real dispatcher and sandbox.

The engine starts the head (``LocalHead``, as ``make run`` does); each worker is a real
``ray start`` node joined with the cluster token, run as a volunteer's machine is: the
clean volunteer venv (the pinned Ray only), a minimal environment and a home of its own
(``tests/support/volunteer_env.py``). Not ``ray.cluster_utils.Cluster``: its nodes run from the
project's environment, and it writes /tmp/ray/ray_current_cluster whatever its temp dir,
which fails on a machine that never ran Ray.

The nodes share this machine's two cores, so the figures measure the path (dispatch to
several raylets, results from each, the store), not a speed-up. They are written to
test-artifacts/scaling/cluster_throughput.json and printed; nothing is asserted about
speed. Results must land from several nodes, every row exactly once.
"""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from sqlalchemy import func, select

from support import ROOT, SESSION_TOKEN, free_port, short_tempdir, write_token
from engine import accounts, projects
from engine.models import Project, Task
from engine.settings import Settings
from engine.status import ProjectStatus
from engine.store import Store
from volunteer_cluster import assert_clean_node, plain_join_command, start_node

pytestmark = pytest.mark.slow

WORKERS = 3
JOIN_SECONDS = 120
ARTIFACT = ROOT / "test-artifacts" / "scaling" / "cluster_throughput.json"
W1 = (ROOT / "bench" / "workloads" / "w1_square.py").read_bytes()
W2 = (ROOT / "bench" / "workloads" / "w2_cpu.py").read_bytes()
W2_ITERATIONS = 100_000  # about 5 ms per row, as in the benchmark

measured: dict[str, dict] = {}


@pytest.fixture(scope="module")
def ray_cluster():
    """The head's address: a 1-CPU head and WORKERS 1-CPU worker nodes, all joined."""
    import ray

    from engine import cluster

    ray.shutdown()  # this process may be connected to the session's shared head
    head_dir = short_tempdir("cct-")
    write_token(head_dir)  # Ray in this process read the session's token at import
    head_settings = Settings(data_dir=str(head_dir), ray_port=free_port(), ray_num_cpus=1,
                             head_ports="")
    head = cluster.LocalHead(head_settings)
    address = cluster.head_address(head_settings)
    workers = []
    # Ray puts the driver's working directory on every worker's sys.path: from the
    # repository, the nodes on this disk would import the engine from there.
    previous_cwd = os.getcwd()
    os.chdir(head_dir)
    try:
        command = plain_join_command(address, SESSION_TOKEN)
        workers = [start_node(f"worker{i}", command, cpus=1) for i in range(WORKERS)]
        cluster.connect(head_settings.replace(ray_address=address))
        deadline = time.monotonic() + JOIN_SECONDS
        while len([n for n in ray.nodes() if n["Alive"]]) < WORKERS + 1:
            for worker in workers:
                assert worker.process.poll() is None, \
                    f"{worker.name} exited:\n{worker.output()[-3000:]}"
            assert time.monotonic() < deadline, f"the worker nodes did not join in {JOIN_SECONDS} s"
            time.sleep(0.5)
        for worker in workers:
            assert_clean_node(worker)
        yield address
    finally:
        for worker in workers:
            worker.stop()
        ray.shutdown()
        os.chdir(previous_cwd)
        head.stop(grace=2)
        for worker in workers:
            worker.remove()
        shutil.rmtree(head_dir, ignore_errors=True)
        if measured:
            ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
            ARTIFACT.write_text(json.dumps(measured, indent=2))


@pytest.fixture
def on_cluster(ray_cluster, data_dir, request):
    backend = getattr(request, "param", "sqlite")
    write_token(data_dir)
    db_url = ""
    if backend == "postgresql":
        db_url = request.getfixturevalue("postgres_server").create_database()
    # Plain nodes carry no volunteer's signature: let unclaimed nodes work.
    settings = Settings(data_dir=str(data_dir), ray_address=ray_cluster, db_url=db_url,
                        allow_unclaimed_nodes=True, replication=1, row_timeout=30.0,
                        ray_port=free_port())
    store = Store(settings)
    yield settings, store
    store.engine.dispose()


def run(settings: Settings, store: Store, script: bytes, body: bytes, rows: int, **options):
    from engine.scheduler import Dispatcher

    pid = projects.submit_project(
        store, settings, accounts.local_admin(store), title="throughput", script_name="s.py",
        script_bytes=script, dataset_name="d.csv", dataset_bytes=body, **options)
    deadline = time.monotonic() + 300

    def ended() -> bool:
        assert time.monotonic() < deadline, "the project did not end in time"
        with store.session() as session:
            return ProjectStatus(session.get(Project, pid).status).is_terminal()

    started = time.perf_counter()
    Dispatcher(store, settings).run(until=ended)
    seconds = time.perf_counter() - started
    with store.session() as session:
        project = session.get(Project, pid)
        per_node = dict(session.execute(
            select(Task.node_id, func.count()).where(Task.project_id == pid)
            .group_by(Task.node_id)).all())
    assert (project.status, project.rows_succeeded, project.rows_failed) == ("complete", rows, 0)
    assert sum(per_node.values()) == rows
    return seconds, per_node


def report(name: str, rows: int, seconds: float, per_node: dict, **extra) -> None:
    measured[name] = {"rows": rows, "seconds": round(seconds, 2),
                      "rows_per_second": round(rows / seconds),
                      "rows_per_node": sorted(per_node.values(), reverse=True), **extra}
    print(f"\n{name}: {rows} rows in {seconds:.1f} s = {rows / seconds:,.0f} rows/s; "
          f"rows per node {measured[name]['rows_per_node']}; {extra}")


def one_core_rate(rows: int = 100) -> float:
    """W2 rows per second in a plain loop in this process, now (the machine is shared)."""
    namespace: dict = {}
    exec(compile(W2, "w2_cpu.py", "exec"), namespace)
    started = time.process_time()
    for _ in range(rows):
        namespace["main"]({"n": W2_ITERATIONS})
    return rows / (time.process_time() - started)


def test_cpu_bound_rows_spread_over_every_node(on_cluster, ray_cluster):
    settings, store = on_cluster
    warm = 80  # every node's worker and sandbox start here, not in the measured run
    run(settings, store, W2, b"n\n" + f"{W2_ITERATIONS}\n".encode() * warm, warm, batch_size=20)
    rows = 1200
    body = b"n\n" + f"{W2_ITERATIONS}\n".encode() * rows
    seconds, per_node = run(settings, store, W2, body, rows, batch_size=20)
    report("W2-like (5 ms rows), 20-row batches, 4 nodes", rows, seconds, per_node,
           one_core_loop_rows_per_second=round(one_core_rate()),
           load_average=round(os.getloadavg()[0], 1))
    # 60 batches over 4 one-CPU nodes: every node takes part.
    assert len(per_node) == WORKERS + 1, per_node
    assert None not in per_node


@pytest.mark.parametrize("on_cluster", ["sqlite", "postgresql"], indirect=True)
def test_trivial_rows_through_several_nodes(on_cluster, ray_cluster, request):
    settings, store = on_cluster
    rows = 100_000
    body = b"x\n" + b"".join(b"%d\n" % i for i in range(rows))
    seconds, per_node = run(settings, store, W1, body, rows, batch_size=10_000)
    backend = "postgresql" if settings.db_url else "sqlite"
    report(f"W1 trivial rows, 10,000-row batches, 4 nodes, {backend}", rows, seconds, per_node)
    assert len(per_node) >= 2, per_node
