"""Load: 20 portal sessions refresh the Projects and Results pages while 3 projects run.

How the sessions are driven, and why. The test starts the whole stack
(`python -m engine serve`: Ray head, dispatcher, Streamlit portal) on free ports and
opens 20 real Streamlit sessions on it, each over its own websocket, speaking the
browser's protocol (`portal_session.Session`). Each signs in through the real form,
opens its page, then refreshes it as the browser would. The server does for them what
it does for 20 browser tabs: a script run per refresh, session state, the Projects
page's `run_every` fragment, the database reads. What the client leaves out is the
browser's own work, drawing the page: 20 Chromium tabs redrawing React and Vega every
2 s would take most of this 2-core machine, so the figure would measure Chromium, not
the portal (viewers' browsers run on their own machines). AppTest threads would leave
out the server itself: its websocket, its sessions and the fragment timer.

- Projects viewers (10): their account's projects, refreshed by the live fragment at
  the interval the server asks for (2 s), as the browser's timer does.
- Results viewers (10): the Results page of their account's newest project, a full
  rerun every 2 s that turns to the next page of 100 rows.

Throughput is the rows/s of 3 concurrent projects of a CPU-bound script (2 ms a row),
from the store (first start to last finish). Phases without and with viewers alternate
(without, with, without), and each phase with viewers is compared with
the mean of its neighbours, so that drift in the shared machine's other load cancels
out; between phases with viewers the sessions stay signed in but idle. The issue's
bound (less than 30% slower) is printed, not asserted, because this machine is shared.
The test asserts correctness: no exception, error or warning in any session, no
"database is locked" anywhere, every project complete with every row, and every session
seeing live and right data.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest

from support import ROOT, fixture_bytes, project_ended, short_tempdir
from support.served_portal import served_portal
from portal_session import RUN_TIMEOUT, Session, sign_in, value, widget

pytestmark = pytest.mark.slow

OWNERS = ("rhea", "remy", "rosa")  # one project each per phase
PASSWORD = "a long password"
VIEWERS = 20
SCRIPT = "busy_2ms.py"             # 2 ms of CPU a row; returns 2 * x
ROWS = 2000                        # per project: about 8 s for the three on 2 idle CPUs
PAGE_ROWS = 100                    # the Results page's default page size
REFRESH_SECONDS = 2.0              # how often a Results viewer reruns its page
PHASE_TIMEOUT = 150.0
PHASES = (False, True, False)      # viewers on? (without, with, without)
ARTIFACTS = ROOT / "test-artifacts"


@pytest.fixture(scope="module")
def stack():
    """`python -m engine serve` on free ports, stopped by its process group."""
    data_dir = short_tempdir("cr-load-")
    try:
        with served_portal(data_dir) as served:
            yield {"port": served.port, "data_dir": data_dir, "log": served.log, "pid": served.pid}
    finally:
        ARTIFACTS.mkdir(exist_ok=True)
        if (data_dir / "serve.log").exists():
            shutil.copy(data_dir / "serve.log", ARTIFACTS / "load-serve.log")
        shutil.rmtree(data_dir, ignore_errors=True)


# -- the viewers ---------------------------------------------------------------------------


class Viewers:
    """Switches the viewers on (refreshing) and off (idle) between phases."""

    def __init__(self):
        self.on = asyncio.Event()
        self.over = False

    async def turn(self, session: Session, started: float, interval: float) -> bool:
        """Wait out the refresh interval, then for the viewers to be on; False once over."""
        session.busy = False
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))
        while not self.on.is_set():
            await self.on.wait()
        session.busy = not self.over
        return not self.over


PROGRESS = re.compile(r"^([\d,]+) / ([\d,]+)$")  # the projects table's "rows" column


async def watch_projects(session: Session, seen: dict[int, set[int]], viewers: Viewers) -> None:
    """Refresh the live fragment of the Projects page at the server's interval.

    ``seen`` collects, per project, the row counts the progress bars showed.
    """
    (fragment, interval), = session.fragments.items()
    started = time.monotonic()
    while await viewers.turn(session, started, interval):
        started = time.monotonic()
        for element in await session.rerun(fragment=fragment):
            if element.WhichOneof("type") != "dataframe":
                continue
            table = _arrow(element.dataframe)
            for project, rows in zip(table.get("#", []), table.get("rows", [])):
                done, _total = PROGRESS.match(rows).groups()
                seen.setdefault(int(project), set()).add(int(done.replace(",", "")))
        session.refreshes.append(time.monotonic() - started)


async def watch_results(session: Session, project_of, checked: list[tuple[int, int]],
                        viewers: Viewers) -> None:
    """Rerun the Results page of ``project_of()`` every few seconds, a page further each time.

    Every table is checked against what the project must hold; ``checked`` collects the
    (project, page) pairs seen.
    """
    elements, page = [], 1
    started = time.monotonic()
    while await viewers.turn(session, started, REFRESH_SECONDS):
        started = time.monotonic()
        project = project_of()
        if session.query != f"id={project}":
            # What a "Results" link does: that page, with the project in the query string.
            session.page, session.query = session.pages["Results"], f"id={project}"
            page = 1
            elements = await session.rerun()
        else:
            box = widget(elements, "number_input", "Page (of")
            pages = int(re.search(r"of ([\d,]+)", box.label).group(1).replace(",", ""))
            page = page % pages + 1
            elements = await session.rerun(value(box, int_value=page))
        session.refreshes.append(time.monotonic() - started)
        _check_table(session, elements, project, page)
        checked.append((project, page))


def _arrow(dataframe) -> dict:
    import pyarrow as pa

    data = dataframe.arrow_data.data or dataframe.lazy_data.initial_chunk.data
    return pa.ipc.open_stream(io.BytesIO(data)).read_all().to_pydict()


def _check_table(session: Session, elements, project: int, page: int) -> None:
    tables = [e.dataframe for e in elements if e.WhichOneof("type") == "dataframe"]
    if len(tables) != 1:
        session.problems.append(f"project {project} page {page}: {len(tables)} tables")
        return
    table = _arrow(tables[0])
    first = (page - 1) * PAGE_ROWS
    wanted = list(range(first, min(first + PAGE_ROWS, ROWS)))
    if table["row"] != wanted or table["in: x"] != wanted:
        session.problems.append(f"project {project} page {page}: rows {table['row'][:3]}...")
        return
    for x, status, output in zip(table["in: x"], table["status"], table["output"]):
        if (status, output) not in (("pending", None), ("succeeded", json.dumps(2 * x))):
            session.problems.append(f"project {project} row {x}: {status} {output!r}")
            return


# -- the projects -------------------------------------------------------------------------


def submit_three(store, title: str, rows: int = ROWS) -> dict[str, int]:
    from engine import accounts, projects

    data = b"x\n" + b"".join(b"%d\n" % i for i in range(rows))
    return {owner: projects.submit_project(
        store, store.settings, accounts.get_user(store, owner), title=f"{title} {owner}",
        script_name=SCRIPT, script_bytes=fixture_bytes(SCRIPT), dataset_name="numbers.csv",
        dataset_bytes=data, replication=1) for owner in OWNERS}


def ended(store, pids) -> bool:
    return all(project_ended(store, pid) for pid in pids)


def throughput(store, pids) -> tuple[float, float]:
    """Rows per second of the projects together (first start to last finish), and seconds."""
    from engine.models import Project

    with store.session() as s:
        runs = [s.get(Project, p) for p in pids]
    seconds = max(p.finished_at for p in runs) - min(p.started_at for p in runs)
    return sum(p.rows_total for p in runs) / seconds, seconds


def assert_complete(store, pids) -> None:
    from sqlalchemy import select

    from engine.models import Project, Task

    with store.session() as s:
        for pid in pids:
            project = s.get(Project, pid)
            assert (project.status, project.rows_succeeded, project.rows_failed) == \
                ("complete", ROWS, 0), (pid, project.status, project.error)
            rows = s.execute(select(Task.row_index, Task.output).where(Task.project_id == pid)
                             .order_by(Task.row_index)).all()
            assert rows == [(i, json.dumps(2 * i)) for i in range(ROWS)], pid


def wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.5)


def portal_pid(supervisor: int) -> int:
    """The Streamlit process among the supervisor's children."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            command = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == supervisor and b"streamlit" in command:
            return int(entry.name)
    raise AssertionError("no portal process under the supervisor")


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the test ----------------------------------------------------------------------------------


def test_twenty_viewers_while_three_projects_run(stack):
    from engine import Settings, Store, accounts
    from engine.accounts import Role

    store = Store(Settings(data_dir=str(stack["data_dir"]), replication=1))
    for owner in OWNERS:
        accounts.add_user(store, owner, {Role.RESEARCHER}, password=PASSWORD,
                          email=f"{owner}@example.org")
    portal = portal_pid(stack["pid"])
    url = f"ws://127.0.0.1:{stack['port']}/_stcore/stream"
    owner_of = {i: OWNERS[i % len(OWNERS)] for i in range(VIEWERS)}
    sessions = [Session(f"viewer {i} ({owner_of[i]})", url) for i in range(VIEWERS)]
    seen = {i: {} for i in range(0, VIEWERS, 2)}      # Projects viewers
    checked = {i: [] for i in range(1, VIEWERS, 2)}   # Results viewers
    newest: dict[str, int] = {}                       # owner -> the latest project
    phases: list[tuple[bool, dict[str, int], float, float]] = []  # viewers?, projects, rows/s, CPU

    async def run_phase(with_viewers: bool) -> None:
        if with_viewers:
            # The load is on before the projects start: every session refreshes twice.
            counts = [len(s.refreshes) for s in sessions]
            viewers.on.set()
            async with asyncio.timeout(RUN_TIMEOUT):
                while any(len(s.refreshes) < n + 2 for s, n in zip(sessions, counts)):
                    await asyncio.sleep(0.2)
        cpu = cpu_seconds(portal)
        pids = await asyncio.to_thread(submit_three, store, "with viewers" if with_viewers else "quiet")
        newest.update(pids)
        async with asyncio.timeout(PHASE_TIMEOUT):
            while not await asyncio.to_thread(ended, store, pids.values()):
                await asyncio.sleep(0.5)
        rate, seconds = throughput(store, pids.values())
        phases.append((with_viewers, pids, rate, (cpu_seconds(portal) - cpu) / seconds))
        print(f"load: {'with' if with_viewers else 'without'} viewers: {rate:,.0f} rows/s "
              f"({seconds:.1f} s)", flush=True)
        if with_viewers:
            await asyncio.sleep(2 * REFRESH_SECONDS + 1)  # every session sees the end
            viewers.on.clear()
            while any(s.busy for s in sessions):
                await asyncio.sleep(0.1)

    async def scenario() -> None:
        started = time.monotonic()
        await asyncio.gather(*(sign_in(s, owner_of[i], PASSWORD) for i, s in enumerate(sessions)))
        print(f"load: {VIEWERS} sessions signed in in {time.monotonic() - started:.1f} s", flush=True)
        # Warm the Ray workers and their sandboxed children, so that no phase pays for it.
        warm = await asyncio.to_thread(submit_three, store, "warm-up", 500)
        await asyncio.to_thread(wait_until, lambda: ended(store, warm.values()), PHASE_TIMEOUT)
        async with asyncio.TaskGroup() as tasks:
            for i, session in enumerate(sessions):
                if i in seen:
                    tasks.create_task(watch_projects(session, seen[i], viewers))
                else:
                    tasks.create_task(watch_results(
                        session, lambda owner=owner_of[i]: newest[owner], checked[i], viewers))
            # Alternate, so that drift in the shared machine's other load cancels out. One
            # loaded phase between two quiet ones: the ratio is printed, not asserted, and two
            # more phases cost the suite about 50 s.
            for with_viewers in PHASES:
                await run_phase(with_viewers)
            viewers.over = True
            viewers.on.set()
        await asyncio.gather(*(s.close() for s in sessions))

    viewers = Viewers()
    asyncio.run(scenario())

    quiet = [rate for on, _, rate, _ in phases if not on]
    loaded = [rate for on, _, rate, _ in phases if on]
    # Each phase with viewers against the mean of the phases just before and after it.
    ratios = [loaded[i] / ((quiet[i] + quiet[i + 1]) / 2) for i in range(len(loaded))]
    refreshes = sorted(t for s in sessions for t in s.refreshes)
    print(f"load: 3 x {ROWS:,} rows of {SCRIPT} on 2 CPUs, {VIEWERS} viewers")
    print(f"load: rows/s without viewers {', '.join(f'{r:,.0f}' for r in quiet)}; "
          f"with viewers {', '.join(f'{r:,.0f}' for r in loaded)}")
    print(f"load: ratio {sum(ratios) / len(ratios):.2f} ({', '.join(f'{r:.2f}' for r in ratios)}); "
          f"the issue asks for at least 0.70")
    print(f"load: portal CPU {max(c for on, _, _, c in phases if not on):.0%} of a core without "
          f"viewers, {min(c for on, _, _, c in phases if on):.0%}-"
          f"{max(c for on, _, _, c in phases if on):.0%} with; RSS {rss_mb(portal):.0f} MB")
    print(f"load: {len(refreshes)} refreshes, median {refreshes[len(refreshes) // 2]:.2f} s, "
          f"95th percentile {refreshes[int(len(refreshes) * 0.95)]:.2f} s, "
          f"slowest {refreshes[-1]:.2f} s")

    problems = [f"{s.name}: {p}" for s in sessions for p in s.problems]
    assert not problems, problems[:20]
    from streamlit.proto.NewSession_pb2 import Config

    # .streamlit/config.toml: no Deploy, Rerun or Clear cache for visitors.
    assert {s.toolbar for s in sessions} == {Config.VIEWER}
    log = stack["log"].read_text(errors="replace")
    assert "database is locked" not in log
    assert "Traceback" not in log, log[log.index("Traceback") - 500:][:3000]
    assert_complete(store, [pid for _, pids, _, _ in phases for pid in pids.values()])
    watched = [pids for on, pids, _, _ in phases if on]
    for i, projects_seen in seen.items():
        for pids in watched:
            mine = projects_seen[pids[owner_of[i]]]
            # Live: the fragment showed the project part-way, then complete, with no reload.
            assert ROWS in mine, (sessions[i].name, sorted(mine))
            assert any(0 < done < ROWS for done in mine), (sessions[i].name, sorted(mine))
    for i, pages in checked.items():
        for pids in watched:
            turned = {page for project, page in pages if project == pids[owner_of[i]]}
            assert len(turned) >= 3, (sessions[i].name, turned)
