"""SQLAlchemy 2.0 typed models: the store's schema, every table of it.

Times are UNIX seconds (REAL): cheap to write a million of, and time-zone free.
Schema changes bump ``SCHEMA_VERSION`` (kept in the ``meta`` table), and
``engine.store`` migrates an existing database step by step.
"""

from __future__ import annotations

from sqlalchemy import BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_VERSION = 6


class Base(DeclarativeBase):
    pass


class Meta(Base):
    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class User(Base):
    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str] = mapped_column(String(254), default="")
    password_hash: Mapped[str] = mapped_column(String(128), default="")
    # Comma-separated subset of: researcher, volunteer, admin.
    roles: Mapped[str] = mapped_column(String(64), default="researcher")
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[float] = mapped_column(Float)
    # Sessions and sign-in cookies issued before this time no longer sign in: signing out
    # (or being disabled) ends every earlier session on the server, not only in one browser.
    sessions_valid_after: Mapped[float] = mapped_column(Float, default=0.0)
    # The client address of a self-service registration (its rate limit counts by it).
    registered_from: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Whether an admin approved this account as a volunteer: with the volunteer_approval
    # setting on, only approved volunteers see the join command (engine.accounts). Accounts
    # that were volunteers before schema version 5 count as approved.
    volunteer_approved: Mapped[bool] = mapped_column(Boolean, default=False)

    @property
    def role_set(self) -> frozenset[str]:
        return frozenset(r for r in self.roles.split(",") if r)


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    title: Mapped[str] = mapped_column(String(200))
    description: Mapped[str] = mapped_column(Text, default="")
    # Indexed for the owner's storage quota, summed over their projects on every batch.
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    # The upload's file name, shown to people only; nothing is stored under it.
    script_name: Mapped[str] = mapped_column(String(255))
    script_source: Mapped[str] = mapped_column(Text)
    script_sha256: Mapped[str] = mapped_column(String(64))
    dataset_name: Mapped[str] = mapped_column(String(255))
    dataset_format: Mapped[str] = mapped_column(String(8))
    columns_json: Mapped[str] = mapped_column(Text)
    rows_total: Mapped[int] = mapped_column(Integer)
    rows_succeeded: Mapped[int] = mapped_column(Integer, default=0)
    rows_failed: Mapped[int] = mapped_column(Integer, default=0)
    batch_size: Mapped[int] = mapped_column(Integer)
    row_timeout: Mapped[float] = mapped_column(Float)
    # Per-project sandbox limits (None: the settings' defaults), at most the admin maxima.
    memory_limit_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    output_limit_mb: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    error_traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    # 1 for the first run; each "re-run failed rows" starts the next attempt.
    attempt: Mapped[int] = mapped_column(Integer, default=1)
    # Verification (engine.verification): how many volunteers must agree on each row.
    replication: Mapped[int] = mapped_column(Integer, default=1)
    max_replicas: Mapped[int] = mapped_column(Integer, default=1)
    comparison: Mapped[str] = mapped_column(String(16), default="exact")
    tolerance: Mapped[float] = mapped_column(Float, default=1e-9)
    rows_verified: Mapped[int] = mapped_column(Integer, default=0)
    rows_inconclusive: Mapped[int] = mapped_column(Integer, default=0)
    rows_trusted: Mapped[int] = mapped_column(Integer, default=0)  # accepted from a trusted node alone
    executions: Mapped[int] = mapped_column(Integer, default=0)
    # UTF-8 bytes of the result text stored for the project (outputs, errors and tracebacks
    # of its tasks, replicas and earlier attempts), kept by engine.ledger as results arrive:
    # the storage quotas (project_storage_mb, user_storage_mb) are checked against it.
    stored_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    # What the dispatcher wants the researcher to know, e.g. "waiting for 1 more volunteer".
    notice: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    finished_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class DatasetChunk(Base):
    """A slice of a project's rows, as a JSON array of arrays (values in column order).

    Rows are stored in chunks rather than one table row each: a million-row upload is
    written in about a thousand inserts, and a batch or a results page reads one or two.
    """

    __tablename__ = "dataset_chunks"

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    chunk_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    start_row: Mapped[int] = mapped_column(Integer)
    row_count: Mapped[int] = mapped_column(Integer)
    payload: Mapped[str] = mapped_column(Text)


def failed_tasks(session) -> str:
    """The FROM clause for a query over failed rows only, one that uses ``ix_tasks_failed``.

    SQLite's planner, without ANALYZE statistics, prefers the primary key and scans every
    row of the project; PostgreSQL's planner picks the partial index itself.
    """
    if session.get_bind().dialect.name == "sqlite":
        return "tasks INDEXED BY ix_tasks_failed"
    return "tasks"


class _RowOutcome:
    """The columns of a row's outcome, the same for its current one (``Task``) and for the
    earlier attempts a re-run keeps (``TaskHistory``), which ``status.rerun_failed`` copies
    from one to the other. ``sort_order`` keeps every column where it was: the row's key
    first (``TaskHistory.attempt`` after ``row_index``), ``Task.verification`` last."""

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True,
                                            sort_order=-3)
    row_index: Mapped[int] = mapped_column(Integer, primary_key=True, sort_order=-2)
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    finished_at: Mapped[float] = mapped_column(Float)


class Task(_RowOutcome, Base):
    """The stored outcome of one row. A row without a Task is still pending."""

    __tablename__ = "tasks"
    __table_args__ = (
        # Failed rows only: the Results page pages through them and groups their errors.
        # An index over every row cost each insert ~20% more, on the hottest write path.
        # A query uses it only with the literal 'failed' in its WHERE (not a parameter),
        # and on SQLite only when told to: see failed_tasks().
        Index("ix_tasks_failed", "project_id", "row_index",
              sqlite_where=text("status = 'failed'"), postgresql_where=text("status = 'failed'")),
        {"sqlite_with_rowid": False},
    )

    verification: Mapped[str] = mapped_column(String(20), default="unverified", sort_order=1)


class Replica(Base):
    """One volunteer's result for a row of a replicated project; every candidate is kept."""

    __tablename__ = "replicas"
    __table_args__ = ({"sqlite_with_rowid": False},)

    project_id: Mapped[int] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    row_index: Mapped[int] = mapped_column(Integer, primary_key=True)
    party: Mapped[str] = mapped_column(String(64), primary_key=True)  # volunteer name, or "head"
    node_id: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16))
    output: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    traceback: Mapped[str | None] = mapped_column(Text, nullable=True)
    cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    finished_at: Mapped[float] = mapped_column(Float)
    # None until the row is decided; then whether this replica was on the winning side.
    agreed: Mapped[bool | None] = mapped_column(Boolean, nullable=True)


class TaskHistory(_RowOutcome, Base):
    """Earlier outcomes of rows that were re-run (``rerun-failed``): nothing is thrown away."""

    __tablename__ = "task_history"

    # After the row's key, before its outcome: the key is (project_id, row_index, attempt).
    attempt: Mapped[int] = mapped_column(Integer, primary_key=True, sort_order=-1)


class NodeScriptFailure(Base):
    """A node where a script's top-level code raised (e.g. a package it imports is missing)."""

    __tablename__ = "node_script_failures"

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    script_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[int] = mapped_column(Integer)
    error: Mapped[str] = mapped_column(Text)
    failed_at: Mapped[float] = mapped_column(Float)


class DispatcherLease(Base):
    """At most one dispatcher runs projects at a time; it holds this row's lease.

    The holder also reports the cluster's health here, which the portal shows.
    """

    __tablename__ = "dispatcher_lease"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[float] = mapped_column(Float)
    cluster_status: Mapped[str] = mapped_column(String(16), default="starting")
    cluster_message: Mapped[str] = mapped_column(Text, default="")
    cluster_cpus: Mapped[float] = mapped_column(Float, default=0.0)


class LoginFailures(Base):
    """Recent failed sign-ins of one user name (a row exists only while there are some)."""

    __tablename__ = "login_failures"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)
    window_started: Mapped[float] = mapped_column(Float)


class Node(Base):
    """One Ray node the cluster has seen: the head, a volunteer's machine, or an unclaimed one."""

    __tablename__ = "nodes"
    __table_args__ = (Index("ix_nodes_volunteer", "volunteer"),)

    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    # "head", "volunteer" (labels verify, or verified once before a rotation) or "unclaimed".
    role: Mapped[str] = mapped_column(String(16), default="unclaimed")
    # The verified owner. Kept after a rotation, so that earlier tasks keep their credit.
    volunteer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # Whether the signature verifies now; false for the head and unclaimed nodes.
    claimed: Mapped[bool] = mapped_column(Boolean, default=False)
    # The name the labels claim, verified or not (shown to admins).
    label_volunteer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # When the node's signature stopped verifying (rotation, account disabled): the node
    # earns nothing for tasks finished after this, and stays unclaimed until it re-joins.
    revoked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    hostname: Mapped[str] = mapped_column(String(255), default="")
    cpus: Mapped[float] = mapped_column(Float, default=0.0)
    memory_bytes: Mapped[float] = mapped_column(Float, default=0.0)
    python_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    ray_version: Mapped[str | None] = mapped_column(String(32), nullable=True)
    # What the node's own sandbox self-test said: "available", "unavailable: <reason>",
    # or "unknown" before the node check ran there.
    sandbox: Mapped[str] = mapped_column(Text, default="unknown")
    first_seen: Mapped[float] = mapped_column(Float)
    last_seen: Mapped[float] = mapped_column(Float)
    online: Mapped[bool] = mapped_column(Boolean, default=True)
    # Whether the node may get work (engine.status.NodeHealth; changed by engine.health).
    health: Mapped[str] = mapped_column(String(16), default="checking")
    health_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    failures: Mapped[int] = mapped_column(Integer, default=0)      # in a row, infrastructure only
    quarantined_until: Mapped[float | None] = mapped_column(Float, nullable=True)
    checked_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    # An operator's own machine, marked by an admin: its results are accepted as "trusted".
    trusted: Mapped[bool] = mapped_column(Boolean, default=False)


class VolunteerKey(Base):
    """A volunteer's signature generation; rotating bumps it and voids older signatures."""

    __tablename__ = "volunteer_keys"

    volunteer: Mapped[str] = mapped_column(String(64), primary_key=True)
    generation: Mapped[int] = mapped_column(Integer, default=1)
    rotated_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class Trust(Base):
    """How many results in a row a volunteer got right for one script."""

    __tablename__ = "volunteer_trust"

    volunteer: Mapped[str] = mapped_column(String(64), primary_key=True)
    script_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    streak: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)


class CreditRollup(Base):
    """Per project, node and hour: what the node completed and what it earns for."""

    __tablename__ = "credit_rollup"
    __table_args__ = (
        Index("ix_credit_rollup_hour", "hour", "node_id", "project_id", "accepted"),
        Index("ix_credit_rollup_node", "node_id", "completed", "last_finished"),
        {"sqlite_with_rowid": False},
    )

    project_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    node_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    hour: Mapped[int] = mapped_column(Integer, primary_key=True)   # UNIX time // 3600
    completed: Mapped[int] = mapped_column(Integer)      # every stored task, whatever its status
    accepted: Mapped[int] = mapped_column(Integer)       # accepted, and not after a revocation
    cpu_seconds: Mapped[float] = mapped_column(Float)    # measured CPU time of the accepted ones
    last_finished: Mapped[float] = mapped_column(Float)


class ProjectCredit(Base):
    """A project's median CPU seconds per accepted task, and the counters it was summed at."""

    __tablename__ = "credit_projects"

    project_id: Mapped[int] = mapped_column(Integer, primary_key=True)
    median_cpu_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    accepted: Mapped[int] = mapped_column(Integer, default=0)
    snapshot: Mapped[str] = mapped_column(String(80), default="")
    refreshed_at: Mapped[float] = mapped_column(Float, default=0.0)
    refresh_seconds: Mapped[float] = mapped_column(Float, default=0.0)


class OwnDriver(Base):
    """A Ray driver (job) of Constellation's own: a dispatcher registers its job id here.

    Any other driver in Ray's job table is a rogue (``engine.drivers``)."""

    __tablename__ = "own_drivers"

    job_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128))
    registered_at: Mapped[float] = mapped_column(Float)


class SecurityAlert(Base):
    """Something an admin must look at: for now, a driver that is not Constellation's."""

    __tablename__ = "security_alerts"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    raised_at: Mapped[float] = mapped_column(Float)
    kind: Mapped[str] = mapped_column(String(32))
    job_id: Mapped[str] = mapped_column(String(32), unique=True)
    node_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    volunteer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text)
