"""Adaptive batching and tail duplication on a real Ray head."""

import logging

import pytest
from sqlalchemy import func, select

from conftest import run_to_end, submit_numbers as submit
from engine.models import Task

pytestmark = pytest.mark.slow


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
