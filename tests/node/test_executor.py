"""The executor runs research code in a sandboxed child; these run it for real under bubblewrap."""

import dataclasses
import json
import os
import time

import pytest

from support import ROOT, fixture_bytes
from engine.node import executor, meter, probe, sandbox
from engine.node.executor import Limits, run_rows
from engine.settings import Settings

LIMITS = Limits(row_timeout=2.0, sandbox="bwrap")


def run(script, xs, limits=LIMITS):
    source = fixture_bytes(script).decode()
    return run_rows(source, script, ["x"], [(i, [x]) for i, x in enumerate(xs)], limits)


def test_bubblewrap_is_available_here():
    assert executor.sandbox_available()


def test_outputs_and_per_row_errors_keep_row_order():
    outcome = run("raises.py", list(range(7)))
    assert [r.row_index for r in outcome.results] == list(range(7))
    assert [r.succeeded for r in outcome.results] == [False, True, True, False, True, True, False]
    failed = outcome.results[3]
    assert failed.error == "ValueError: row 3 is divisible by three"
    # The traceback shows the script's own line, although the script has no file on the node.
    assert 'File "raises.py", line 3, in main' in failed.traceback
    assert "raise ValueError" in failed.traceback
    assert json.loads(outcome.results[4].output) == 4


def test_numpy_values_become_plain_json():
    outcome = run("numpy_output.py", [2])
    assert json.loads(outcome.results[0].output) == {"scalar": 2, "array": [0, 2, 4], "mean": 0.5}


def test_unserialisable_output_fails_only_its_row():
    outcome = run("unserialisable.py", [0, 1, 2])
    assert [r.succeeded for r in outcome.results] == [True, False, True]
    assert outcome.results[1].error.startswith("TypeError: main returned a value that is not JSON-serialisable")


def test_script_import_error_is_reported_once_not_per_row():
    outcome = run("import_error.py", [1, 2, 3])
    assert outcome.results == []
    assert outcome.script_error == "ModuleNotFoundError: No module named 'a_module_that_does_not_exist'"
    assert "import_error.py" in outcome.script_traceback


def test_runaway_row_fails_alone_and_the_batch_goes_on():
    outcome = run("runaway.py", [0, 1, 2, 3, 4], Limits(row_timeout=1.0))
    assert [r.succeeded for r in outcome.results] == [True, True, False, True, True]
    assert outcome.results[2].error == "RowTimeout: row exceeded the 1 s time limit"


def test_process_exit_mid_batch_keeps_done_rows_and_names_the_culprit():
    outcome = run("exits.py", list(range(10)))
    assert [r.row_index for r in outcome.results] == list(range(10))
    assert [r.succeeded for r in outcome.results] == [i != 5 for i in range(10)]
    assert outcome.results[5].error == \
        "WorkerCrashed: the process running this row exited unexpectedly (exit code 0)"


def warm_pid(source, filename, limits=LIMITS):
    """The pid of the warm child that would run ``source`` under ``limits``, or None."""
    child = executor.shared_pool().warm().get((limits.project, source, filename, limits))
    return child.process.pid if child is not None else None


def test_child_stays_warm_across_batches():
    source = fixture_bytes("square.py").decode()
    run_rows(source, "square.py", ["x"], [(0, [1])], LIMITS)
    first = warm_pid(source, "square.py")
    run_rows(source, "square.py", ["x"], [(1, [2])], LIMITS)
    assert warm_pid(source, "square.py") == first


def test_a_warm_child_serves_one_project_only():
    # Two researchers submit the same file; it memoises rows in a module-level dict.
    source = fixture_bytes("memoises.py").decode()
    mine, theirs = (dataclasses.replace(LIMITS, project=p) for p in (1, 2))
    first = run_rows(source, "memoises.py", ["x", "secret"],
                     [(i, [i, f"one-{i}"]) for i in range(3)], mine)
    second = run_rows(source, "memoises.py", ["x", "secret"],
                      [(i, [i, f"two-{i}"]) for i in range(3)], theirs)
    assert [json.loads(r.output) for r in first.results] == ["one-0", "one-1", "one-2"]
    assert [json.loads(r.output) for r in second.results] == ["two-0", "two-1", "two-2"]
    assert warm_pid(source, "memoises.py", mine) != warm_pid(source, "memoises.py", theirs)
    # The same project's next batch does get its warm child back (and its memo).
    again = run_rows(source, "memoises.py", ["x", "secret"], [(0, [0, "one-again"])], mine)
    assert json.loads(again.results[0].output) == "one-0"


def test_a_project_s_limits_name_their_project():
    settings = Settings(row_timeout=30)
    assert Limits.from_settings(settings, project=7).project == 7
    assert Limits.from_settings(settings).project is None


# -- limits: settings, project overrides, admin maxima --------------------------------

def test_project_overrides_are_capped_at_the_admin_maximum():
    defaults = Limits(row_timeout=60.0, memory_bytes=2 << 30, processes=64)
    maximum = Limits(row_timeout=600.0, memory_bytes=8 << 30, processes=64)
    assert defaults.clamped(maximum) == defaults
    raised = defaults.clamped(maximum, row_timeout=120, memory_bytes=4 << 30)
    assert (raised.row_timeout, raised.memory_bytes) == (120.0, 4 << 30)
    assert isinstance(raised.row_timeout, float)
    capped = defaults.clamped(maximum, row_timeout=86400.0, memory_bytes=64 << 30, processes=10_000)
    assert (capped.row_timeout, capped.memory_bytes, capped.processes) == (600.0, 8 << 30, 64)
    # A default above the maximum (a misconfiguration) is capped too.
    assert Limits(row_timeout=900.0).clamped(maximum).row_timeout == 600.0
    # Lower than the default is always allowed.
    assert defaults.clamped(maximum, processes=8).processes == 8


@pytest.mark.parametrize("overrides, message", [
    ({"row_timeout": 0}, "row timeout limit must be a positive number"),
    ({"memory_bytes": -1}, "memory bytes limit must be a positive number"),
    ({"processes": True}, "processes limit must be a positive number"),
    ({"row_timeout": "60"}, "row timeout limit must be a positive number"),
])
def test_invalid_overrides_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        Limits().clamped(Limits(), **overrides)


def test_unknown_override_is_refused():
    with pytest.raises(TypeError, match="no such limit: cpu"):
        Limits().clamped(Limits(), cpu=3)


def test_limits_from_settings_use_the_admin_maxima():
    settings = Settings(row_timeout=30, memory_limit_mb=1024, output_limit_mb=5, file_limit_mb=16,
                        open_files_limit=100, process_limit=20, max_row_timeout=120,
                        max_memory_limit_mb=4096, max_output_limit_mb=50, allow_unsandboxed=True)
    limits = Limits.from_settings(settings, hidden_paths=["/srv/data"])
    assert limits == Limits(row_timeout=30.0, memory_bytes=1 << 30, output_bytes=5 << 20,
                            file_bytes=16 << 20, open_files=100, processes=20, sandbox="bwrap",
                            hidden_paths=("/srv/data",), allow_unsandboxed=True)
    project = Limits.from_settings(settings, row_timeout=1000, memory_bytes=2 << 30,
                                   output_bytes=1 << 30, processes=500, file_bytes=1 << 30)
    # Time, memory and output may be raised up to the maxima; the node-protecting limits not at all.
    assert (project.row_timeout, project.memory_bytes, project.output_bytes) == (120.0, 2 << 30, 50 << 20)
    assert (project.processes, project.file_bytes) == (20, 16 << 20)


# -- the sandbox's self-test ----------------------------------------------------------

def test_sandbox_status_is_a_real_self_test(monkeypatch):
    assert executor.sandbox_status(refresh=True) == "available"
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        assert executor.sandbox_status(refresh=True) == \
            "unavailable: bubblewrap (bwrap) is not installed"
        assert not executor.sandbox_available()
    finally:
        monkeypatch.undo()
        executor.sandbox_status(refresh=True)


def test_without_a_working_sandbox_research_code_does_not_run(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    source = f"def main(row):\n    open({str(marker)!r}, 'w').write('ran')\n    return 1\n"
    monkeypatch.setenv("PATH", "/nonexistent")
    try:
        executor.sandbox_status(refresh=True)
        with pytest.raises(executor.SandboxUnavailable, match="bubblewrap .bwrap. is not installed"):
            run_rows(source, "s.py", ["x"], [(0, [1])], LIMITS)
        assert not marker.exists()
        # Only the admin setting lets it run anyway, unsandboxed (it can then write here).
        monkeypatch.setenv("PATH", "/usr/bin:/bin")
        allowed = Limits(row_timeout=2.0, allow_unsandboxed=True)
        monkeypatch.setattr(probe, "_status", "unavailable: bubblewrap (bwrap) is not installed")
        assert run_rows(source, "s.py", ["x"], [(0, [1])], allowed).results[0].succeeded
        assert marker.read_text() == "ran"
    finally:
        monkeypatch.undo()
        executor.shutdown()
        executor.sandbox_status(refresh=True)


def test_sandbox_sees_only_the_system_and_python():
    probe = ("import os, sys\n"
             "def main(row):\n"
             "    return {'root': sorted(os.listdir('/')), 'uid': os.getuid(),\n"
             "            'home': sorted(os.listdir(os.path.expanduser('~'))),\n"
             "            'repo': sorted(os.listdir(row['x'])) if os.path.isdir(row['x']) else None,\n"
             "            'numpy': __import__('numpy').__name__}\n")
    outcome = run_rows(probe, "probe.py", ["x"], [(0, [str(ROOT)])], LIMITS)
    seen = json.loads(outcome.results[0].output)
    assert seen["numpy"] == "numpy"  # what is installed on the node can be imported
    # The repository (and its data directory) is absent; only its virtual environment, if
    # it holds one, is bound back.
    assert seen["repo"] in (None, [".venv"])
    home = os.path.expanduser("~")
    python_tops = {p.split("/")[1] for p in sandbox.python_paths()}
    assert set(seen["root"]) <= {"bin", "sbin", "lib", "lib32", "lib64", "libx32", "usr", "etc",
                                 "dev", "proc", "tmp", home.split("/")[1], *python_tops}
    assert set(seen["home"]) <= sandbox.home_entries_allowed() and ".ray" not in seen["home"]
    if os.geteuid() == 0:
        assert seen["uid"] == sandbox.sandbox_uid()


# -- what must not outlive a batch ------------------------------------------------------

THREAD_LEFT = ("import threading, time\n"
               "def main(row):\n"
               "    if row['x'] == 1:\n"
               "        threading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
               "    return row['x']\n")


def test_a_thread_left_running_replaces_the_child_after_the_batch():
    run_rows(THREAD_LEFT, "t.py", ["x"], [(0, [0])], LIMITS)
    first = warm_pid(THREAD_LEFT, "t.py")
    outcome = run_rows(THREAD_LEFT, "t.py", ["x"], [(1, [1]), (2, [2])], LIMITS)
    assert [r.succeeded for r in outcome.results] == [True, True]
    assert warm_pid(THREAD_LEFT, "t.py") is None
    run_rows(THREAD_LEFT, "t.py", ["x"], [(3, [3])], LIMITS)
    assert warm_pid(THREAD_LEFT, "t.py") not in (None, first)


def test_a_forged_done_message_cannot_lose_rows():
    forger = ("import os, sys\n"
              "def main(row):\n"
              "    if row['x'] == 1:\n"
              "        os.write(int(sys.argv[-1]), b'{\"t\": \"done\"}\\n')\n"
              "    return row['x']\n")
    outcome = run_rows(forger, "f.py", ["x"], [(i, [i]) for i in range(4)], LIMITS)
    assert [r.row_index for r in outcome.results] == [0, 1, 2, 3]
    assert [r.succeeded for r in outcome.results] == [True, False, True, True]
    assert outcome.results[1].error.startswith("SandboxError: the process running this row broke "
                                               "the result protocol")


def test_cpu_backstop_is_set_per_batch_under_a_lifetime_hard_limit():
    probe = ("import resource\n"
             "def main(row):\n"
             "    return resource.getrlimit(resource.RLIMIT_CPU)\n")
    outcome = run_rows(probe, "cpu.py", ["x"], [(i, [i]) for i in range(10)], LIMITS)
    soft, hard = json.loads(outcome.results[0].output)
    assert hard == sandbox._CPU_LIFETIME_SECONDS
    assert 10 * 2 <= soft <= 10 * 2 + 5  # ten rows of 2 s, plus slack


# -- the script's import and the sandbox's start are timed apart -------------------------

def test_a_script_that_hangs_while_imported_fails_at_the_import_time_limit():
    hangs = "import time\ntime.sleep(600)\n\ndef main(row):\n    return 1\n"
    limits = Limits(row_timeout=2.0, import_timeout=1.0)
    outcome = run_rows(hangs, "hangs.py", ["x"], [(0, [0]), (1, [1])], limits)
    assert outcome.results == []
    assert outcome.script_error == ("ImportTimeout: the script's top-level code was still "
                                    "running after 1 s (the import time limit)")
    assert executor.shared_pool().warm() == {}  # its child was ended, not kept


def test_a_script_that_ends_its_process_while_imported_is_the_scripts_failure():
    # Not "the sandbox did not start": the sandbox did, the script ended it.
    outcome = run("exits_on_import.py", [0])
    assert outcome.results == []
    assert outcome.script_error == ("SystemExit: the script ended its process while being "
                                    "imported (exit code 3)")


def test_a_sandbox_that_does_not_start_is_the_nodes_problem(monkeypatch):
    executor.sandbox_status()  # the self-test passed here; then bubblewrap starts failing
    monkeypatch.setattr(sandbox, "bwrap_argv", lambda *args, **kwargs: ["bwrap", "--no-such-option"])
    with pytest.raises(executor.SandboxUnavailable, match="the sandbox did not start"):
        run("square.py", [1])


# -- CPU time is measured by the parent, never taken from the child ----------------------

def test_a_forged_result_line_claims_no_cpu_time():
    source = fixture_bytes("hostile_forges_cpu.py").decode()
    # One row per batch, as a project with batch size 1 sends them, so that the forged
    # line and its "done" answer the whole batch.
    outcomes = []
    for index, target in enumerate(["", "forge", "", "forge"]):
        started = time.monotonic()
        outcome = run_rows(source, "forges.py", ["x", "target"], [(index, [index, target])], LIMITS)
        outcomes.append((outcome.results[0], time.monotonic() - started))
    for result, wall in outcomes:
        assert result.cpu_seconds <= wall, result
    plain, forged = [outcomes[0][0], outcomes[2][0]], [outcomes[1][0], outcomes[3][0]]
    assert all(r.succeeded for r in plain)
    # The old protocol's CPU field is no part of the protocol now: the line is refused.
    assert all(r.error.startswith("SandboxError: the process running this row broke the result "
                                  "protocol") for r in forged), forged


def test_cpu_time_is_capped_at_the_rows_wall_time():
    started = time.monotonic()
    outcome = run("busy_threads.py", [0], Limits(row_timeout=60.0))
    wall = time.monotonic() - started
    result = outcome.results[0]
    assert result.succeeded
    # Four threads burned about 2 s of CPU; a row is credited at most its wall time.
    assert 0 < result.cpu_seconds <= wall


def row(index):
    return (index, True, str(index), None, None)


def test_a_batchs_cpu_is_shared_by_wall_time_and_capped_at_it():
    # Pure arithmetic of meter.price. Marks: (time, CPU clock) at sending and at each
    # read of the pipe; readings: (own CPU, waited-for children's CPU) before and after.
    marks = [(10.0, 5.0), (10.2, None), (11.0, None)]
    groups = [(1, [row(0)]), (2, [row(1), row(2)])]
    priced = meter.price(groups, marks, (5.0, 0.0), (5.4, 0.1))
    # 0.5 s of CPU over 1 s of wall: row 0 had 0.2 s of it, rows 1 and 2 0.4 s each.
    assert [r[:5] for r in priced] == [row(0), row(1), row(2)]
    assert [r[5] for r in priced] == pytest.approx([0.1, 0.2, 0.2])
    # Three cores' worth in one second: each row gets at most its own wall time.
    capped = meter.price(groups, marks, (5.0, 0.0), (7.0, 1.0))
    assert [r[5] for r in capped] == pytest.approx([0.2, 0.4, 0.4])
    # Two messages in one read are one group; a process that died is read at its last mark.
    marks = [(0.0, 1.0), (0.3, 1.2), (0.6, 1.5)]
    merged = meter.price([(1, [row(0)]), (1, [row(1)]), (2, [row(2)])], marks, (1.0, 0.0), None)
    assert [r[5] for r in merged] == pytest.approx([0.125, 0.125, 0.25])
    # Without a measurement (the research process was not found) nothing is credited.
    assert [r[5] for r in meter.price(groups, marks, None, None)] == [0.0, 0.0, 0.0]


def test_light_rows_are_measured_finely_enough_not_to_round_to_zero():
    outcome = run("square.py", list(range(2000)))
    cpu = [r.cpu_seconds for r in outcome.results]
    assert all(r.succeeded for r in outcome.results)
    # The child's own clock, under its RLIMIT_CPU backstop, moved only at the kernel's
    # ticks: most light rows read 0 s. The batch's total, shared out, gives each its part.
    assert min(cpu) > 0, f"{cpu.count(0.0)} of 2000 rows measured 0 s"
    assert sum(cpu) < 2.0


def test_busy_rows_are_measured_at_the_cpu_they_burned():
    started = time.monotonic()
    outcome = run("busy_square.py", [0, 1, 2, 3])
    wall = time.monotonic() - started
    cpu = [r.cpu_seconds for r in outcome.results]
    # Each row burns 0.15 s of the process's CPU; the kernel's count, read by the parent,
    # has all of it (and the child's own overhead), and one thread cannot exceed the wall.
    assert 4 * 0.15 <= sum(cpu) <= wall
    assert all(c > 0 for c in cpu)
