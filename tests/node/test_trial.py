"""Trial runs, as the portal makes them: several at once in one process, each in a sandboxed
child of its own, ended when its browser session goes away. Real bubblewrap, no Ray."""

import os
import threading
import time

import pytest

from support import fixture_bytes, live_uids
from engine import accounts, trial
from engine.accounts import Role
from engine.dataset import parse_dataset
from engine.node import executor, sandbox
from engine.script import check_script

# Far longer than any test waits: a trial that is not closed would outlive the test.
FOREVER = 600.0


@pytest.fixture
def ada(store):
    return accounts.register_user(store, "ada", "ada@x.org", "long enough", {Role.RESEARCHER})


def upload(script, xs):
    data = b"x\n" + b"".join(b"%d\n" % x for x in xs)
    return (check_script(script, fixture_bytes(script), max_bytes=1 << 20),
            parse_dataset("d.csv", data, max_bytes=1 << 20))


def wait_until_running(session_key: str, thread: threading.Thread, box: dict) -> None:
    """Until the trial of ``session_key`` (running on ``thread``) has its child started."""
    while not (trial.running_pool(session_key) and trial.running_pool(session_key).warm()):
        assert thread.is_alive(), box
        time.sleep(0.05)


def trial_sandbox_pids():
    """Live processes of this test process's sandboxes, by their uids on a root node: its
    shared pool's (slot 0) and its private ones' (sandbox.sandbox_uid)."""
    uids = {1_000_000 + slot * (1 << 22) + os.getpid() for slot in range(256)}
    return [pid for pid, uid in live_uids().items() if uid in uids]


def in_thread(function, *args, **kwargs):
    box = {}

    def target():
        try:
            box["result"] = function(*args, **kwargs)
        except BaseException as exc:  # handed to the test's own thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_concurrent_trials_of_one_script_each_get_their_own_rows(store, settings, ada):
    uploads = [upload("own_uid.py", range(start, start + 5)) for start in (0, 100, 200)]
    runs = [in_thread(trial.trial_run, store, settings, ada, script, dataset)
            for script, dataset in uploads]
    for thread, _ in runs:
        thread.join()
    uids = set()
    for (thread, box), start in zip(runs, (0, 100, 200)):
        assert "error" not in box, box["error"]
        result = box["result"]
        assert [(r.succeeded, r.error) for r in result.rows] == [(True, None)] * 5
        assert [r.output["x"] for r in result.rows] == list(range(start, start + 5))
        trial_uids = {r.output["uid"] for r in result.rows}
        assert len(trial_uids) == 1  # one child per trial, kept for its five rows
        uids |= trial_uids
    if os.geteuid() == 0:
        # Each trial's child runs as a uid of its own: its own process limit.
        assert len(uids) == 3
        assert sandbox.sandbox_uid() not in uids
    assert executor.shared_pool().warm() == {}  # trials never use the process's shared pool


@pytest.mark.skipif(os.geteuid() != 0, reason="sandbox uids are told apart on root nodes")
def test_a_trial_ends_its_child_when_it_ends(store, settings, ada):
    script, dataset = upload("square.py", range(5))
    assert [r.output for r in trial.trial_run(store, settings, ada, script, dataset).rows] == \
        [0, 1, 4, 9, 16]
    assert trial_sandbox_pids() == []


def test_closing_a_session_ends_its_running_trial(store, settings, ada):
    # Row 2 loops for ever; with this row timeout, five rows would take most of an hour.
    script, dataset = upload("hostile_infinite_loop.py", range(5))
    thread, box = in_thread(trial.trial_run, store, settings, ada, script, dataset,
                            row_timeout=FOREVER, session_key="session-1")
    wait_until_running("session-1", thread, box)
    time.sleep(0.5)  # well into the looping row
    assert trial.close("session-1") is True
    thread.join(timeout=120)
    assert not thread.is_alive(), "the trial went on after its session was closed"
    assert "error" not in box, box["error"]
    assert [r.output for r in box["result"].rows] == [0, 1]  # the rows done before
    assert trial.close("session-1") is False  # nothing left to close


def test_a_trial_closes_itself_when_its_session_goes_away(store, settings, ada):
    alive = threading.Event()
    alive.set()
    script, dataset = upload("hostile_infinite_loop.py", range(5))
    thread, box = in_thread(trial.trial_run, store, settings, ada, script, dataset,
                            row_timeout=FOREVER, session_key="session-2",
                            session_alive=alive.is_set)
    wait_until_running("session-2", thread, box)
    alive.clear()  # the browser went away
    thread.join(timeout=120)
    assert not thread.is_alive(), "the trial went on after its session went away"
    assert [r.output for r in box["result"].rows] in ([], [0], [0, 1])
    assert trial.running_pool("session-2") is None


def test_a_new_trial_of_a_session_ends_the_one_before(store, settings, ada):
    looping, dataset = upload("hostile_infinite_loop.py", range(5))
    first, first_box = in_thread(trial.trial_run, store, settings, ada, looping, dataset,
                                 row_timeout=FOREVER, session_key="session-3")
    wait_until_running("session-3", first, first_box)
    square, numbers = upload("square.py", range(5))
    second = trial.trial_run(store, settings, ada, square, numbers, session_key="session-3")
    assert [r.output for r in second.rows] == [0, 1, 4, 9, 16]
    first.join(timeout=120)
    assert not first.is_alive()
