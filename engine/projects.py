"""Projects: submitting, following and cancelling them, for an acting user.

Submission checks the script and the dataset completely before it writes anything, then
writes the project and all its rows in one transaction: an invalid upload stores
nothing, and a valid one is never half-stored.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import func, insert, select

from engine.accounts import Role, is_admin, require_role, visible_project
from engine.dataset import Dataset, parse_dataset
from engine.errors import InvalidRequest
from engine.models import DatasetChunk, Project, Task, User
from engine.script import Script, check_script
from engine.settings import Settings
from engine.status import ProjectStatus, rerun_failed, transition_project
from engine.store import Store

logger = logging.getLogger(__name__)

CHUNK_ROWS = 1000


@dataclass(frozen=True)
class ProjectStatusView:
    """What ``status --json`` prints and the Status page shows."""

    id: int
    title: str
    owner: str
    status: str
    rows_total: int
    rows_succeeded: int
    rows_failed: int
    rows_pending: int
    created_at: str
    started_at: str | None
    finished_at: str | None
    elapsed_seconds: float | None
    rows_per_second: float | None
    eta_seconds: float | None
    error: str | None
    error_traceback: str | None
    replication: int
    rows_verified: int
    rows_inconclusive: int
    rows_trusted: int
    executions_per_task: float | None
    notice: str | None

    def to_dict(self) -> dict:
        return asdict(self)


def check_upload(settings: Settings, script_name: str, script_bytes: bytes,
                 dataset_name: str, dataset_bytes: bytes) -> tuple[Script, Dataset]:
    """Check a script and a dataset without storing anything (the portal calls this on upload)."""
    script = check_script(script_name, script_bytes, max_bytes=settings.max_script_bytes)
    dataset = parse_dataset(dataset_name, dataset_bytes, max_bytes=settings.max_upload_bytes)
    return script, dataset


def submit_project(store: Store, settings: Settings, actor: User, *, title: str,
                   script_name: str, script_bytes: bytes, dataset_name: str,
                   dataset_bytes: bytes, description: str = "", batch_size: int | None = None,
                   row_timeout: float | None = None, replication: int | None = None,
                   comparison: str = "exact", tolerance: float = 1e-9,
                   max_replicas: int | None = None, memory_limit_mb: int | None = None,
                   output_limit_mb: int | None = None) -> int:
    """Check and store a new project; returns its id. Raises before storing anything if invalid."""
    require_role(actor, Role.RESEARCHER)
    script, dataset = check_upload(settings, script_name, script_bytes, dataset_name, dataset_bytes)
    if batch_size is not None and int(batch_size) < 1:
        raise InvalidRequest("batch size must be at least 1 (or left empty for adaptive batching)")
    # Stored as 0 when adaptive: the dispatcher sizes batches from measured row time.
    batch_size = 0 if batch_size is None else int(batch_size)
    row_timeout = settings.row_timeout if row_timeout is None else float(row_timeout)
    if not 0 < row_timeout <= settings.max_row_timeout:
        raise InvalidRequest(
            f"row timeout must be more than 0 and at most {settings.max_row_timeout:g} seconds "
            f"(the administrator's maximum)")
    for name, value, maximum in (("memory limit", memory_limit_mb, settings.max_memory_limit_mb),
                                 ("output limit", output_limit_mb, settings.max_output_limit_mb)):
        if value is not None and not 1 <= int(value) <= maximum:
            raise InvalidRequest(f"the {name} must be between 1 and {maximum} MB "
                                 f"(the administrator's maximum)")
    replication = settings.replication if replication is None else int(replication)
    if not 1 <= replication <= 10:
        raise InvalidRequest("replication must be between 1 and 10")
    max_replicas = replication + 2 if max_replicas is None else int(max_replicas)
    if max_replicas < replication:
        raise InvalidRequest("max_replicas cannot be below replication")
    if comparison not in ("exact", "numeric"):
        raise InvalidRequest("comparison must be 'exact' or 'numeric'")
    if not 0 <= float(tolerance) < 1:
        raise InvalidRequest("tolerance must be a relative tolerance between 0 and 1")
    title = one_line(title or script_name)[:200] or one_line(script_name)[:200]
    with store.session() as session:
        project = Project(
            title=title, description=description, owner_id=actor.id,
            status=ProjectStatus.SUBMITTED.value, script_name=script.name,
            script_source=script.source, script_sha256=script.sha256,
            dataset_name=dataset.name, dataset_format=dataset.format,
            columns_json=json.dumps(dataset.columns), rows_total=len(dataset),
            batch_size=batch_size, row_timeout=row_timeout, replication=replication,
            max_replicas=max_replicas, comparison=comparison, tolerance=float(tolerance),
            memory_limit_mb=memory_limit_mb, output_limit_mb=output_limit_mb,
            created_at=time.time())
        session.add(project)
        session.flush()
        rows = dataset.rows
        session.execute(insert(DatasetChunk), [
            {"project_id": project.id, "chunk_index": n, "start_row": start,
             "row_count": min(CHUNK_ROWS, len(rows) - start),
             "payload": json.dumps(rows[start:start + CHUNK_ROWS], ensure_ascii=False)}
            for n, start in enumerate(range(0, len(rows), CHUNK_ROWS))
        ])
        project_id = project.id
    logger.info("project %s: submitted by %s (%d rows)", project_id, actor.name, len(dataset))
    return project_id


def one_line(text: str) -> str:
    """``text`` as one line of plain text: whitespace runs (newlines included) become one
    space, and control and format characters go. A title is shown inside other text, where
    a newline could start a heading or a list."""
    return " ".join("".join(c if c.isprintable() else " " for c in str(text)).split())


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def _view(project: Project, owner: str) -> ProjectStatusView:
    done = project.rows_succeeded + project.rows_failed
    pending = project.rows_total - done
    elapsed = rate = eta = None
    if project.started_at is not None:
        elapsed = (project.finished_at or time.time()) - project.started_at
        if elapsed > 0 and done:
            rate = done / elapsed
            if not ProjectStatus(project.status).is_terminal():
                eta = pending / rate
    return ProjectStatusView(
        id=project.id, title=project.title, owner=owner, status=project.status,
        rows_total=project.rows_total, rows_succeeded=project.rows_succeeded,
        rows_failed=project.rows_failed, rows_pending=pending,
        created_at=_iso(project.created_at), started_at=_iso(project.started_at),
        finished_at=_iso(project.finished_at), elapsed_seconds=elapsed, rows_per_second=rate,
        eta_seconds=eta, error=project.error, error_traceback=project.error_traceback,
        replication=project.replication, rows_verified=project.rows_verified,
        rows_inconclusive=project.rows_inconclusive, rows_trusted=project.rows_trusted,
        executions_per_task=(project.executions / done
                             if project.replication > 1 and done else None),
        notice=project.notice)


def project_status(store: Store, actor: User, project_id: int) -> ProjectStatusView:
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        owner = session.get(User, project.owner_id).name
        return _view(project, owner)


def list_projects(store: Store, actor: User) -> list[ProjectStatusView]:
    """The actor's projects, newest first (an admin sees everyone's)."""
    require_role(actor, Role.RESEARCHER)
    with store.session() as session:
        query = select(Project, User.name).join(User, User.id == Project.owner_id)
        if not is_admin(actor):
            query = query.where(Project.owner_id == actor.id)
        return [_view(p, owner) for p, owner in session.execute(query.order_by(Project.id.desc()))]


def cancel_project(store: Store, actor: User, project_id: int) -> None:
    """Cancel a project; stored results stay. Raises InvalidRequest if it already ended."""
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        if not transition_project(session, project_id, ProjectStatus.CANCELLED):
            raise InvalidRequest(f"project {project_id} is already {project.status}")
    logger.info("project %s: cancelled by %s", project_id, actor.name)


def rerun_failed_rows(store: Store, actor: User, project_id: int) -> int:
    """Run the failed rows of a finished project again, as a new attempt; returns how many."""
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        moved = rerun_failed(session, project_id)
        if moved < 0:
            raise InvalidRequest(
                f"project {project_id} is {project.status}; only a complete or failed project "
                f"can re-run its failed rows")
    return moved


def rows_per_node(store: Store, actor: User, project_id: int) -> dict[str | None, int]:
    """How many of the project's rows each node completed."""
    with store.session() as session:
        visible_project(session, actor, project_id)
        return dict(session.execute(
            select(Task.node_id, func.count()).where(Task.project_id == project_id)
            .group_by(Task.node_id)).all())
