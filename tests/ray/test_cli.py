"""The CLI contract, run as a user runs it: a subprocess on a real database and Ray."""

import csv
import json
import subprocess
import time

import pytest

from support import FIXTURES, SHARED_DATA, cli, engine_env, free_port, python


def stored_projects(settings):
    return json.loads(cli(settings, "list", "--json", check=True).stdout)


@pytest.mark.parametrize("script, data, message", [
    ("bad.py", b"x\n1\n", "bad.py, line 1, column"),
    ("square.py", b"x,x\n1,2\n", "d.csv: duplicate column name 'x'"),
    ("square.py", b"", "d.csv: the file is empty"),
])
def test_invalid_submission_exits_2_with_one_line_and_stores_nothing(settings, tmp_path, script, data, message):
    script_path = tmp_path / script
    script_path.write_bytes(b"def main(:\n" if script == "bad.py" else (FIXTURES / script).read_bytes())
    (tmp_path / "d.csv").write_bytes(data)
    done = cli(settings, "submit", script_path, tmp_path / "d.csv", "--wait")
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert stored_projects(settings) == []


def test_unknown_project_exits_3(settings):
    for args in (("status", 42), ("status", 42, "--json"), ("results", 42), ("cancel", 42)):
        done = cli(settings, *args)
        assert done.returncode == 3, args
        assert "project 42 not found" in done.stderr


def test_submit_without_wait_prints_the_id_and_cancel_works(settings):
    done = cli(settings, "submit", FIXTURES / "square.py", SHARED_DATA / "shakespeare_passages.csv")
    # square.py fails per row on this data, but submission itself only checks shape.
    assert done.returncode == 0 and done.stdout.strip().isdigit()
    pid = int(done.stdout)
    status = json.loads(cli(settings, "status", pid, "--json", check=True).stdout)
    assert {"id", "title", "status", "rows_total", "rows_succeeded", "rows_failed", "rows_pending",
            "created_at", "finished_at"} <= status.keys()
    assert (status["status"], status["rows_total"], status["rows_pending"]) == ("submitted", 2231, 2231)
    assert cli(settings, "cancel", pid).returncode == 0
    assert json.loads(cli(settings, "status", pid, "--json").stdout)["status"] == "cancelled"
    assert cli(settings, "cancel", pid).returncode == 2  # already ended


@pytest.mark.slow
def test_submit_wait_runs_100k_rows_with_its_own_head(settings, tmp_path):
    """No head is running on this port: the CLI starts one, runs the project, stops the head."""
    settings = settings.replace(ray_port=free_port(), ray_num_cpus=2)
    dataset = tmp_path / "d.csv"
    dataset.write_text("x\n" + "".join(f"{i}\n" for i in range(100_000)))
    done = cli(settings, "submit", FIXTURES / "square.py", dataset, "--wait", "--title", "squares")
    assert done.returncode == 0, done.stderr
    pid = int(done.stdout.strip())
    status = json.loads(cli(settings, "status", pid, "--json", check=True).stdout)
    assert (status["status"], status["rows_succeeded"], status["rows_pending"]) == ("complete", 100_000, 0)
    out = tmp_path / "r.json"
    cli(settings, "results", pid, "--format", "json", "--output", out, check=True)
    rows = json.loads(out.read_text())
    assert len(rows) == 100_000
    assert rows[99_999] == {"row": 99_999, "status": "succeeded", "output": 99_999 ** 2, "error": None,
                            "verification": "unverified"}
    assert all(r["row"] == i and r["output"] == i * i for i, r in enumerate(rows))
    csv_out = tmp_path / "r.csv"
    cli(settings, "results", pid, "--format", "csv", "--output", csv_out, check=True)
    with open(csv_out, newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["x", "output", "error", "verification"]
    assert table[-1] == ["99999", str(99_999 ** 2), "", "unverified"]
    # The head the CLI started is gone: nothing of it is left running (Ray's processes may
    # take a moment to finish exiting after their group is killed).
    deadline = time.monotonic() + 15
    while True:
        leftovers = subprocess.run(["pgrep", "-f", settings.data_dir], capture_output=True, text=True)
        if not leftovers.stdout.strip() or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert leftovers.stdout.strip() == "", leftovers.stdout


@pytest.mark.slow
def test_a_first_project_with_the_defaults_completes_on_one_machine(cluster_settings, tmp_path):
    """A newcomer's first run: no volunteers, no options (replication 2 by default). The
    head is a trusted party, so every row is accepted as trusted, without waiting."""
    env = engine_env(cluster_settings)
    del env["CONSTELLATION_REPLICATION"]  # the default, as a newcomer has it
    done = subprocess.run([python(), "-m", "engine", "submit", FIXTURES / "square.py",
                           FIXTURES / "numbers.csv", "--wait"], env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "r.json"
    subprocess.run([python(), "-m", "engine", "results", done.stdout.strip(), "--format", "json",
                    "--output", out], env=env, check=True, timeout=120)
    rows = json.loads(out.read_text())
    assert [(r["output"], r["verification"]) for r in rows] == [(1, "trusted"), (4, "trusted"),
                                                               (9, "trusted")]
    status = json.loads(subprocess.run(
        [python(), "-m", "engine", "status", done.stdout.strip(), "--json"], env=env,
        capture_output=True, text=True, check=True).stdout)
    assert (status["replication"], status["rows_verified"], status["rows_trusted"]) == (2, 3, 3)


@pytest.mark.slow
def test_submit_wait_exits_1_when_the_project_fails(cluster_settings):
    done = cli(cluster_settings, "submit", FIXTURES / "import_error.py", FIXTURES / "numbers.csv", "--wait")
    assert done.returncode == 1, done.stderr
    status = json.loads(cli(cluster_settings, "status", int(done.stdout), "--json").stdout)
    assert status["status"] == "failed" and "ModuleNotFoundError" in status["error"]
