"""Adaptive batching and tail duplication on a real Ray head."""

import logging

import pytest
from sqlalchemy import func, select

from conftest import fixture_bytes
from engine import accounts, projects
from engine.models import Project, Task
from engine.scheduler import Dispatcher
from engine.status import ProjectStatus

pytestmark = pytest.mark.slow


def submit(store, settings, script, n, **kw):
    data = b"x\n" + b"".join(b"%d\n" % i for i in range(n))
    return projects.submit_project(
        store, settings, accounts.local_admin(store), title=script, script_name=script,
        script_bytes=fixture_bytes(script), dataset_name="d.csv", dataset_bytes=data, **kw)


def run_to_end(store, settings, pid):
    def ended():
        with store.session() as s:
            return ProjectStatus(s.get(Project, pid).status).is_terminal()
    Dispatcher(store, settings).run(until=ended)
    return projects.project_status(store, accounts.local_admin(store), pid)


def stored_batches(store, pid):
    # Every batch is stored in one transaction with one timestamp.
    with store.session() as s:
        return s.scalar(select(func.count(func.distinct(Task.finished_at))).where(Task.project_id == pid))


def test_adaptive_batches_grow_for_trivial_rows(store, cluster_settings):
    pid = submit(store, cluster_settings, "square.py", 60_000)
    assert run_to_end(store, cluster_settings, pid).rows_succeeded == 60_000
    fixed = submit(store, cluster_settings, "square.py", 60_000, batch_size=1000)
    run_to_end(store, cluster_settings, fixed)
    assert stored_batches(store, fixed) == 60
    assert stored_batches(store, pid) < 30  # fixed 1,000-row batches need 60


def test_straggler_is_duplicated_and_counted_once(store, cluster_settings, caplog):
    caplog.set_level(logging.INFO, logger="engine.scheduler")
    pid = submit(store, cluster_settings, "one_straggler.py", 40, batch_size=4)
    view = run_to_end(store, cluster_settings, pid)
    assert (view.status, view.rows_succeeded, view.rows_failed) == ("complete", 40, 0)
    assert any("duplicating straggler batch 36-40" in r.getMessage() for r in caplog.records)
    with store.session() as s:
        assert s.scalar(select(func.count()).select_from(Task).where(Task.project_id == pid)) == 40
