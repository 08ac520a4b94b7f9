"""Projects: submitting, following and cancelling them, for an acting user.

Submission checks the script and the dataset completely before it writes anything, then
writes the project and all its rows in one transaction: an invalid upload stores
nothing, and a valid one is never half-stored.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import exists, func, insert, select

from engine.accounts import Role, is_admin, require_role, visible_project
from engine.dataset import Dataset, parse_dataset
from engine.errors import InvalidRequest
from engine.models import DatasetChunk, Node, Project, Replica, Task, User
from engine.nodes import attribution_of
from engine.script import Script, check_script
from engine.settings import Settings
from engine.status import (ClusterStatus, NodeHealth, NodeRole, NodeStatus, ProjectStatus,
                           rerun_failed, transition_project)
from engine.verification import MAX_REPLICATION, SPARE_REPLICAS, Comparison
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
                   comparison: str = Comparison.EXACT.value, tolerance: float = 1e-9,
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
    if not 1 <= replication <= MAX_REPLICATION:
        raise InvalidRequest(f"replication must be between 1 and {MAX_REPLICATION}")
    max_replicas = replication + SPARE_REPLICAS if max_replicas is None else int(max_replicas)
    if max_replicas < replication:
        raise InvalidRequest("max_replicas cannot be below replication")
    if comparison not in {c.value for c in Comparison}:
        raise InvalidRequest(f"comparison must be {' or '.join(repr(c.value) for c in Comparison)}")
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


def rows_per_node(store: Store, actor: User, project_id: int) -> dict[str, int]:
    """How many of the project's rows each node ran, by the node's readable name
    (``node_label``). A replicated project counts every replica on the node that ran it, so
    a row verified by two volunteers counts once on each of their nodes."""
    with store.session() as session:
        project = visible_project(session, actor, project_id)
        counts: dict[str | None, int] = {}
        if project.replication > 1:
            for node_id, n in session.execute(
                    select(Replica.node_id, func.count()).where(Replica.project_id == project_id)
                    .group_by(Replica.node_id)):
                counts[node_id] = counts.get(node_id, 0) + n
            # Rows decided without replicas (e.g. failed on every node tried) count as stored.
            unreplicated = select(Task.node_id, func.count()).where(
                Task.project_id == project_id, ~exists().where(
                    Replica.project_id == Task.project_id, Replica.row_index == Task.row_index))
        else:
            unreplicated = select(Task.node_id, func.count()).where(Task.project_id == project_id)
        for node_id, n in session.execute(unreplicated.group_by(Task.node_id)):
            counts[node_id] = counts.get(node_id, 0) + n
        known = {n.node_id: n for n in session.execute(select(Node).where(
            Node.node_id.in_([i for i in counts if i is not None]))).scalars()}
    labels = _unique_labels({node_id: label_of(node_id, known.get(node_id)) for node_id in counts})
    return {labels[node_id]: n for node_id, n in sorted(counts.items(), key=lambda kv: -kv[1])}


def machine_name(hostname: str | None, host: str | None = None) -> str:
    """A machine's short name: its host name up to the first dot, else its address."""
    short = (hostname or "").split(".", 1)[0].strip()
    return short[:24] or (host or "").strip()


# How many hex digits of a node id people read where a node has no name: in a label
# ("node 1a2b3c4d"), and to tell apart two machines of one volunteer that share a name.
# Logs and messages use ``nodes.short_id`` (12).
LABEL_ID_DIGITS = 8
TIEBREAK_ID_DIGITS = 6


def machine_label(hostname: str | None, host: str | None, node_id: str) -> str:
    """A node's machine as people read it: its short name, else "node" and its short id."""
    return machine_name(hostname, host) or f"node {node_id[:LABEL_ID_DIGITS]}"


def node_label(owner: str, hostname: str | None, host: str | None, node_id: str) -> str:
    """How a person reads a node: whose it is and which machine, e.g. "vic · laptop"."""
    return f"{owner} · {machine_label(hostname, host, node_id)}"


def label_of(node_id: str | None, node: Node | None) -> str:
    """How people read the node that ran something (``node``: its registry row, if any)."""
    if node_id is None:
        return "no node (the row failed on every node tried)"
    if node is None:
        return f"unknown node {node_id[:LABEL_ID_DIGITS]}"
    return node_label(attribution_of(node), node.hostname, node.host, node_id)


def _unique_labels(labels: dict) -> dict:
    """Labels made unique (a volunteer's two machines may share a host name)."""
    seen: dict[str, int] = {}
    for label in labels.values():
        seen[label] = seen.get(label, 0) + 1
    return {node_id: label if seen[label] == 1 or node_id is None else f"{label} ({node_id[:TIEBREAK_ID_DIGITS]})"
            for node_id, label in labels.items()}


# -- before submitting: what the project will wait for, and how long it may take --------


@dataclass(frozen=True)
class Outlook:
    """What a new project would meet on the cluster now."""

    nodes: int                 # online nodes that may take work now
    cpus: float                # their CPUs (else the dispatcher's last report)
    runs_per_row: int          # how many times each row runs (replication, unless trusted nodes settle rows alone)
    waits_for: str | None      # what it would wait for, in words; None when it can start at once


def outlook(store: Store, settings: Settings, replication: int) -> Outlook:
    """What a project with ``replication`` would wait for if submitted now, from the
    dispatcher's report and the node registry, as the dispatcher decides it (see
    ``Placement.update_notice``)."""
    from engine import nodes as registry

    health = store.cluster_health()
    online = [n for n in registry.list_nodes(store) if n.status == NodeStatus.ONLINE]
    usable = [n for n in online if n.health == NodeHealth.READY
              and (n.attribution != NodeRole.UNCLAIMED or settings.allow_unclaimed_nodes)]
    cpus = sum(n.cpus for n in usable) or float(health["cpus"] or 0.0)
    trusted = any(n.trusted for n in usable)
    volunteers = {n.attribution for n in usable if not n.trusted and n.attribution != NodeRole.UNCLAIMED}
    runs = 1 if replication <= 1 or (trusted and not volunteers) else replication
    waits = None
    if health["status"] == ClusterStatus.NO_DISPATCHER:
        waits = "a dispatcher: none is running (`make run` starts one with the portal)"
    elif health["status"] != ClusterStatus.ONLINE:
        waits = f"the cluster, which is {health['status']}: {health['message']}"
    elif not online:
        waits = "a node: none has joined the cluster"
    elif not usable:
        reasons = [f"{node_label(n.attribution, n.hostname, n.host, n.node_id)} "
                   + ("is being checked" if n.health == NodeHealth.CHECKING else
                      f"is quarantined ({n.health_reason or 'it failed its check'})"
                      if n.health == NodeHealth.QUARANTINED else "is not claimed by a volunteer")
                   for n in online]
        waits = "a node that can run it: " + "; ".join(reasons)
    elif replication > 1 and not trusted and len(volunteers) < replication:
        missing = replication - len(volunteers)
        waits = (f"{missing} more volunteer{'s' if missing > 1 else ''}: replication "
                 f"{replication} needs {replication} different volunteers' machines, and "
                 f"{len(volunteers)} {'is' if len(volunteers) == 1 else 'are'} online")
    return Outlook(nodes=len(usable), cpus=cpus, runs_per_row=runs, waits_for=waits)


@dataclass(frozen=True)
class Estimate:
    """A run time estimated from a trial run, with what it assumes."""

    seconds: float          # computing time on the cluster, start-up not included
    seconds_per_row: float  # the median time of the trial's rows after the first
    rows: int
    runs_per_row: int
    cpus: float
    # Measured on this cluster: the median time recent projects took from their start to the
    # first results of their first rows (Ray's workers, sandboxes, code shipped); None when
    # no project has run yet.
    startup_seconds: float | None = None
    startup_projects: int = 0


# How many recent projects the start-up time is measured over, and which of their rows.
_STARTUP_PROJECTS = 20
_STARTUP_ROWS = 100


def estimate(trial_seconds: list[float], rows: int, where: Outlook,
             startup: tuple[float, int] | None = None) -> Estimate | None:
    """The run time of ``rows`` rows from the trial's row times. The first row also started
    the sandbox, so it is left out when there are others. ``startup`` is
    ``startup_seconds()``'s measurement, if any."""
    measured = trial_seconds[1:] or trial_seconds
    if not measured:
        return None
    per_row = statistics.median(measured)
    cpus = max(1.0, where.cpus)
    seconds, projects = startup if startup is not None else (None, 0)
    return Estimate(seconds=per_row * rows * where.runs_per_row / cpus, seconds_per_row=per_row,
                    rows=rows, runs_per_row=where.runs_per_row, cpus=cpus,
                    startup_seconds=seconds, startup_projects=projects)


def startup_seconds(store: Store) -> tuple[float, int] | None:
    """(median seconds, projects): how long recent projects took from their start to the
    first stored result among their first rows, or None when none has one. Reads only the
    first rows of each (by primary key), so a million-row project costs what a small one does."""
    with store.session() as session:
        started = session.execute(
            select(Project.id, Project.started_at).where(Project.started_at.is_not(None))
            .order_by(Project.id.desc()).limit(_STARTUP_PROJECTS)).all()
        waits = []
        for project_id, started_at in started:
            first = session.execute(select(func.min(Task.finished_at)).where(
                Task.project_id == project_id, Task.row_index < _STARTUP_ROWS)).scalar()
            if first is not None and first >= started_at:
                waits.append(first - started_at)
    return (statistics.median(waits), len(waits)) if waits else None
