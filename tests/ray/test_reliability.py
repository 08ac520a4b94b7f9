"""Faults on real processes: killed dispatchers, a full disk, broken scripts, re-runs, backups."""

import os
import signal
import sqlite3
import subprocess
import threading
import time

import pytest
from sqlalchemy import select

from support import (engine_env, fill_disk, fixture_bytes, project_ended as ended, python,
                      run_to_end, small_disk, stop_serve, submit_numbers as submit)
from engine import accounts, projects
from engine.models import Project, Task, TaskHistory
from engine.scheduler import Dispatcher
from engine.store import Store

pytestmark = pytest.mark.slow


def status(store, pid):
    return projects.project_status(store, accounts.local_admin(store), pid)


def wait_for(predicate, timeout=180.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(interval)


def assert_every_row_once(store, pid, total):
    with store.session() as s:
        rows = s.execute(select(Task.row_index).where(Task.project_id == pid)).scalars().all()
        project = s.get(Project, pid)
    assert sorted(rows) == list(range(total))  # the primary key already forbids duplicates
    assert project.rows_succeeded + project.rows_failed == total


def test_systematic_failure_stops_the_project(store, cluster_settings):
    pid = submit(store, cluster_settings, "always_raises.py", 5000, batch_size=10)
    view = run_to_end(store, cluster_settings, pid)
    assert view.status == "failed"
    assert view.error == "stopped: the first 20 rows all raised ValueError"
    assert "raise ValueError" in view.error_traceback
    assert view.rows_failed < 5000  # it did not grind through the whole dataset


def test_mixed_failures_do_not_stop_the_project(store, cluster_settings):
    pid = submit(store, cluster_settings, "raises.py", 90, batch_size=5,)
    assert run_to_end(store, cluster_settings, pid).status == "complete"


def test_rerun_failed_rows_runs_only_them_and_keeps_history(store, cluster_settings):
    pid = submit(store, cluster_settings, "raises.py", 30, batch_size=4)
    first = run_to_end(store, cluster_settings, pid)
    assert (first.status, first.rows_failed) == ("complete", 10)
    with store.session() as s:
        before = {t.row_index: t.finished_at for t in s.execute(
            select(Task).where(Task.project_id == pid, Task.status == "succeeded")).scalars()}
    assert projects.rerun_failed_rows(store, accounts.local_admin(store), pid) == 10
    assert status(store, pid).status == "submitted"
    second = run_to_end(store, cluster_settings, pid)
    assert (second.status, second.rows_succeeded, second.rows_failed) == ("complete", 20, 10)
    with store.session() as s:
        after = {t.row_index: t.finished_at for t in s.execute(
            select(Task).where(Task.project_id == pid, Task.status == "succeeded")).scalars()}
        history = s.execute(select(TaskHistory).where(TaskHistory.project_id == pid)).scalars().all()
        assert s.get(Project, pid).attempt == 2
    assert after == before  # succeeded rows did not run again
    assert sorted(h.row_index for h in history) == list(range(0, 30, 3))
    assert {h.attempt for h in history} == {1}
    assert_every_row_once(store, pid, 30)


def test_rerun_is_refused_while_running(store, cluster_settings):
    pid = submit(store, cluster_settings, "square.py", 3)
    with pytest.raises(Exception, match="only a complete or failed project"):
        projects.rerun_failed_rows(store, accounts.local_admin(store), pid)


def test_killed_dispatcher_is_recovered_by_the_next(store, cluster_settings):
    """SIGKILL the process driving Ray mid-project; a new one resumes without loss or double counts."""
    settings = cluster_settings.replace(lease_seconds=3.0)
    pid = submit(store, settings, "ms.py", 3000, batch_size=50)
    env = engine_env(settings)
    env["CONSTELLATION_LEASE_SECONDS"] = "3"
    first = subprocess.Popen([python(), "-m", "engine", "dispatcher"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: status(store, pid).rows_succeeded >= 300)
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        done_at_kill = status(store, pid).rows_succeeded
        assert status(store, pid).status == "running" and done_at_kill < 3000
        view = run_to_end(store, settings, pid)  # waits for the dead holder's lease to expire
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
    assert (view.status, view.rows_succeeded) == ("complete", 3000)
    assert_every_row_once(store, pid, 3000)


def test_full_disk_surfaces_the_error_and_loses_nothing(cluster_settings, caplog):
    """The database lives on a 8 MB tmpfs that fills up mid-project."""
    with small_disk("cr-full-") as mount_point:
        settings = cluster_settings.replace(data_dir=str(mount_point))
        store = Store(settings)
        pid = submit(store, settings, "ms.py", 4000, batch_size=50)
        dispatcher = Dispatcher(store, settings)
        thread = threading.Thread(target=dispatcher.run, kwargs={"until": lambda: ended(store, pid)})
        thread.start()
        wait_for(lambda: status(store, pid).rows_succeeded >= 200)
        filler = fill_disk(mount_point)
        # Nothing can be written to a full disk, the lease row included: the error is
        # surfaced in the log and on the dispatcher, and the results wait in memory.
        wait_for(lambda: "database or disk is full" in dispatcher.store_error, timeout=120)
        assert any("database or disk is full" in r.getMessage() for r in caplog.records)
        time.sleep(2)
        assert status(store, pid).status == "running"  # never complete with rows missing
        filler.unlink()
        thread.join(timeout=120)
        assert not thread.is_alive()
        assert dispatcher.store_error == ""
        assert status(store, pid).status == "complete"
        assert_every_row_once(store, pid, 4000)
        store.engine.dispose()


def test_backup_restores(store, settings, tmp_path):
    pid = submit(store, settings, "square.py", 10)
    target = store.backup(tmp_path / "copy.db")
    restored = Store(settings.replace(db_url=f"sqlite:///{target}"))
    assert restored.schema_version() >= 1
    assert status(restored, pid).rows_total == 10
    with pytest.raises(Exception, match="already exists"):
        store.backup(target)
    assert sqlite3.connect(target).execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_fair_share_small_project_is_not_starved(cluster_settings, data_dir):
    """A big project from one owner must not hold back a small one from another owner."""
    store = Store(cluster_settings)
    big_owner = accounts.create_user(store, "big", {accounts.Role.RESEARCHER})
    small_owner = accounts.create_user(store, "small", {accounts.Role.RESEARCHER})
    data = lambda n: b"x\n" + b"".join(b"%d\n" % i for i in range(n))  # noqa: E731
    big = projects.submit_project(store, cluster_settings, big_owner, title="big", script_name="ms.py",
                                  script_bytes=fixture_bytes("ms.py"), dataset_name="d.csv",
                                  dataset_bytes=data(20000), batch_size=50)
    finished = {}

    def submit_small_later():
        try:
            wait_for(lambda: status(store, big).rows_succeeded >= 200)
            small = projects.submit_project(store, cluster_settings, small_owner, title="small",
                                            script_name="ms.py", script_bytes=fixture_bytes("ms.py"),
                                            dataset_name="d.csv", dataset_bytes=data(100), batch_size=50)
            wait_for(lambda: ended(store, small), timeout=240, interval=0.05)
            finished["big_done_when_small_ended"] = status(store, big).rows_succeeded
        finally:
            # Whatever happened here, the dispatcher below must stop (it runs until big ends).
            projects.cancel_project(store, big_owner, big)

    thread = threading.Thread(target=submit_small_later)
    thread.start()
    Dispatcher(store, cluster_settings).run(until=lambda: ended(store, big))
    thread.join()
    # The small project finished while the big one still had most of its rows to do.
    assert finished["big_done_when_small_ended"] < 10000


def test_head_death_is_survived_by_serve(settings, tmp_path):
    """Kill the Ray head's GCS under `engine serve`: the portal keeps serving, the cluster
    is reported unavailable, the head comes back and the project completes."""
    import urllib.request

    from support import free_ports

    ray_port, portal_port = free_ports(2)
    settings = settings.replace(ray_port=ray_port, portal_port=portal_port, ray_num_cpus=2)
    store = Store(settings)
    env = engine_env(settings)
    env["CONSTELLATION_PORTAL_PORT"] = str(settings.portal_port)
    serve = subprocess.Popen([python(), "-m", "engine", "serve"], env=env, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=open(tmp_path / "serve.log", "wb"))
    health_url = f"http://127.0.0.1:{settings.portal_port}/_stcore/health"
    try:
        pid = submit(store, settings, "ms.py", 6000, batch_size=50)
        wait_for(lambda: status(store, pid).rows_succeeded >= 300, timeout=240)
        gcs = subprocess.run(["pgrep", "-f", f"gcs_server.*{settings.data_dir}"],
                             capture_output=True, text=True).stdout.split()
        assert len(gcs) == 1
        os.kill(int(gcs[0]), signal.SIGKILL)
        seen = set()
        portal_ok = []

        outage = {"unavailable", "no dispatcher"}

        def watch():
            health = store.cluster_health()["status"]
            seen.add(health)
            try:
                portal_ok.append(urllib.request.urlopen(health_url, timeout=2).status == 200)
            except OSError:
                portal_ok.append(False)
            # Until the outage was reported and is over, and the project is done. (On a quiet
            # machine the last rows can finish, through the surviving raylet, before the
            # dispatcher's next look at the head: then the report comes after them.)
            return bool(seen & outage) and health == "online" and \
                status(store, pid).status == "complete"

        wait_for(watch, timeout=180, interval=0.2)
        assert seen & outage, seen
        assert portal_ok and all(portal_ok), "the portal stopped serving during the outage"
        assert store.cluster_health()["status"] == "online"
        assert_every_row_once(store, pid, 6000)
    finally:
        stop_serve(serve)
    leftovers = subprocess.run(["pgrep", "-f", settings.data_dir], capture_output=True, text=True)
    assert leftovers.stdout.strip() == "", (tmp_path / "serve.log").read_text()[-3000:]
