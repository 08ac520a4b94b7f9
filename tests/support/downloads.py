"""Projects whose results are stored the way the dispatcher stores them, for the download
tests (the route over HTTP, and the Results page's links in Chromium)."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

from support import fixture_bytes
from engine import accounts, projects
from engine.accounts import Role
from engine.export import export_results
from engine.ledger import record_results
from engine.node.result import RowResult
from engine.quota import StorageQuota
from engine.status import ProjectStatus, transition_project
from engine.store import Store

PASSWORD = "long enough"
NODE = "a" * 56
MB = 1_000_000


def add_people(store: Store) -> None:
    for name, roles in (("ada", {Role.RESEARCHER}), ("bob", {Role.RESEARCHER}),
                        ("root", {Role.ADMIN}), ("vic", {Role.VOLUNTEER})):
        accounts.add_user(store, name, roles, password=PASSWORD, email=f"{name}@x.org")


class Failed(str):
    """A row's error, in a list of outputs."""


def project_of(store: Store, owner: str, outputs: list, *, quota: StorageQuota | None = None,
               rows: int | None = None) -> int:
    """A project of ``owner`` whose first rows have ``outputs`` (a ``Failed``: a failed row
    with that error; anything else: a succeeded row with that output, as JSON), stored the
    way the dispatcher stores results. Rows beyond ``outputs`` stay without a result."""
    rows = len(outputs) if rows is None else rows
    data = "x,label\n" + "".join(f"{i},=cell {i}\n" for i in range(rows))
    pid = projects.submit_project(
        store, store.settings, accounts.get_user(store, owner), title=f"{owner}'s",
        script_name="square.py", script_bytes=fixture_bytes("square.py"), dataset_name="d.csv",
        dataset_bytes=data.encode())
    with store.session() as session:
        transition_project(session, pid, ProjectStatus.RUNNING)
    for i, value in enumerate(outputs):  # one row per transaction: rows may be 9 MB each
        result = (RowResult(i, False, None, value, "Traceback (most recent call last):", 0.01)
                  if isinstance(value, Failed) else RowResult(i, True, json.dumps(value), None, None, 0.01))
        with store.session() as session:
            record_results(session, pid, [result], NODE, quota=quota)
    return pid


def exported(store: Store, pid: int, fmt: str) -> str:
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), pid, fmt, out)
    return out.getvalue()


ROW_CHARS = 9 * MB  # the finding's rows


def big_output(i: int) -> str:
    """A string output of ROW_CHARS, about as long stored (as JSON) as it is: commas for CSV
    to quote, and a quote and a line end; each row's ends with its row number."""
    return f"row {i}: \"quoted\"\n" + "abc, def; " * (ROW_CHARS // 10) + f"end of row {i}"


def fetch(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as refused:
        return refused.code, dict(refused.headers), refused.read()
