"""Node health without Ray: quarantine, back-off, what survives a restart, and Ray's errors."""

import time

import pytest

from engine import nodes
from engine.health import NodeHealthBook, ray_failure
from engine.models import Node
from engine.node.result import BatchFailure, BatchReport, FailureKind
from engine.status import NodeHealth

UNLOADABLE = BatchFailure(FailureKind.CODE_UNLOADABLE,
                          "this machine cannot load Constellation's code: "
                          "ModuleNotFoundError: No module named 'bcrypt'")
CRASH = BatchFailure(FailureKind.WORKER_CRASHED, "the Ray worker running the batch died unexpectedly")


@pytest.fixture
def book(store, settings):
    now = time.time()
    with store.session() as session:
        for node_id in ("a" * 56, "b" * 56):
            session.add(Node(node_id=node_id, first_seen=now, last_seen=now))
    return NodeHealthBook(store, settings.replace(quarantine_seconds=10, quarantine_max_seconds=25))


def stored(store, node_id):
    with store.session() as session:
        node = session.get(Node, node_id)
        return node.health, node.health_reason, node.failures, node.quarantined_until


def test_code_that_cannot_load_quarantines_at_once_with_its_reason(book, store):
    node = "a" * 56
    book.batch_failed(node, UNLOADABLE)
    assert book.blocked({node}) == {node}
    health, reason, failures, until = stored(store, node)
    assert (health, failures) == (NodeHealth.QUARANTINED.value, 1)
    assert reason == UNLOADABLE.message and until == pytest.approx(time.time() + 10, abs=2)
    view = next(v for v in nodes.list_nodes(store) if v.node_id == node)
    assert (view.health, view.health_reason) == ("quarantined", UNLOADABLE.message)


def test_one_crash_is_bad_luck_the_second_in_a_row_quarantines(book, store):
    node = "a" * 56
    book.checked(node, BatchReport(node))  # passed its check: ready
    book.batch_failed(node, CRASH)
    assert book.ready(node) and stored(store, node)[2] == 1
    book.batch_failed(node, CRASH)
    assert not book.ready(node) and stored(store, node)[0] == "quarantined"


def test_a_success_in_between_resets_the_count(book):
    node = "a" * 56
    book.checked(node, BatchReport(node))
    book.batch_failed(node, CRASH)
    book.batch_succeeded(node)
    book.batch_failed(node, CRASH)
    assert book.ready(node)


def test_the_back_off_doubles_while_it_keeps_failing_up_to_the_maximum(book, store):
    node = "a" * 56
    for period in (10, 20, 25, 25):
        before = time.time()
        book.batch_failed(node, UNLOADABLE)
        after = time.time()
        # The quarantine runs from the moment of the failure, somewhere in [before, after]
        # (a loaded machine may take a while), so it ends within that window after it.
        expires = stored(store, node)[3]
        assert before + period <= expires <= after + period, (period, expires - before)
        book.checked(node, BatchReport(node))  # its check passed after the back-off


def test_a_check_that_fails_quarantines_and_one_that_passes_releases(book, store):
    node = "b" * 56
    assert book.blocked({node}) == {node}  # never checked: no work yet
    book.checked(node, BatchReport(node, failure=BatchFailure(
        FailureKind.SANDBOX_UNAVAILABLE, "bubblewrap is not installed on this machine")))
    assert stored(store, node)[:2] == ("quarantined", "bubblewrap is not installed on this machine")
    book.checked(node, BatchReport(node, facts={"sandbox": "available"}))
    assert book.ready(node) and stored(store, node)[:2] == ("ready", None)


def test_a_quarantine_outlives_a_dispatcher_restart(book, store, settings):
    node = "a" * 56
    book.batch_failed(node, UNLOADABLE)
    again = NodeHealthBook(store, settings)
    again._records[node] = again._load(node)
    assert again.blocked({node}) == {node}
    assert again.reasons({node}) == [f"node {node[:12]} is quarantined: {UNLOADABLE.message}"]


def test_ray_errors_name_their_root_cause_in_plain_text():
    from ray import exceptions as rx

    node_id, failure = ray_failure(rx.WorkerCrashedError())
    assert (node_id, failure.kind) == (None, FailureKind.WORKER_CRASHED)
    inner = rx.RaySystemError("System error: No module named 'bcrypt'\ntraceback: ...")
    wrapped = rx.RayTaskError("run_batch", "\x1b[36mTraceback\x1b[0m ...", inner)
    _, failure = ray_failure(wrapped)
    assert failure.kind is FailureKind.NODE_ERROR
    assert "\x1b" not in failure.message and "RayTaskError" not in failure.message
    assert "No module named 'bcrypt'" in failure.message


def test_a_ray_error_that_names_its_node_is_pinned_on_that_node():
    from ray import exceptions as rx

    class Named(rx.WorkerCrashedError):
        def __str__(self):
            return f"The worker died unexpectedly. Node ID: {'c' * 56}, worker IP: 10.0.0.2"

    assert ray_failure(Named())[0] == "c" * 56


def test_the_dispatchers_waiting_notice_names_nodes_as_people_read_them(store, settings):
    """A researcher whose project waits reads "vic · laptop is quarantined: ...", not a hex id."""
    from engine.scheduler import Dispatcher

    node, stranger = "c" * 56, "d" * 56
    now = time.time()
    with store.session() as session:
        session.add(Node(node_id=node, role="volunteer", volunteer="vic", claimed=True,
                         hostname="laptop.lan", first_seen=now, last_seen=now))
    dispatcher = Dispatcher(store, settings)
    dispatcher.health.batch_failed(node, UNLOADABLE)
    assert dispatcher.health.reasons({node, stranger}, dispatcher.placement.label) == [
        f"vic · laptop is quarantined: {UNLOADABLE.message}",
        f"unknown node {stranger[:8]} is being checked"]
