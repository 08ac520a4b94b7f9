"""The store: one SQLAlchemy engine over SQLite (or PostgreSQL), its schema, and sessions.

SQLite runs in WAL mode, so the portal reads while the dispatcher writes, with a busy
timeout so that a writer waits for another instead of failing with "database is locked".
``synchronous=NORMAL`` is safe in WAL mode (a power cut can lose the last commits, never
corrupt the file) and makes each batch commit several times cheaper.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from engine.errors import InvalidRequest
from engine.models import SCHEMA_VERSION, Base, DispatcherLease, Meta, Project, Task
from engine.settings import Settings
from engine.status import ClusterStatus, NodeHealth

logger = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
_SCHEMA_LOCK = 0x436F6E73  # any fixed key; PostgreSQL advisory locks are per database


class Store:
    """A handle on the database. Cheap to share; create one per process."""

    def __init__(self, settings: Settings):
        self.settings = settings
        url = settings.database_url
        self.is_sqlite = url.startswith("sqlite")
        if self.is_sqlite:
            db_path = url.split("///", 1)[-1]
            if db_path and db_path != ":memory:":
                Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            self.engine: Engine = create_engine(
                url, connect_args={"timeout": BUSY_TIMEOUT_MS / 1000, "check_same_thread": False})
            event.listen(self.engine, "connect", _sqlite_pragmas)
        else:
            self.engine = create_engine(url, pool_pre_ping=True)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        self.create_schema()

    def create_schema(self) -> None:
        with self.session() as session:
            # The portal and the dispatcher start together and would both create the tables
            # (the second fails: "table already exists"). DDL is transactional in SQLite and
            # PostgreSQL, so with one lock held to the commit the second finds the schema.
            if self.is_sqlite:
                session.connection().exec_driver_sql("BEGIN IMMEDIATE")
            else:
                session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _SCHEMA_LOCK})
            Base.metadata.create_all(session.connection())
            row = session.get(Meta, "schema_version")
            if row is None:
                session.add(Meta(key="schema_version", value=str(SCHEMA_VERSION)))
                return
            version = int(row.value)
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"database schema version {version} is newer than this release "
                    f"({SCHEMA_VERSION}); upgrade Constellation")
            for step in range(version + 1, SCHEMA_VERSION + 1):
                _MIGRATIONS[step](session)
                logger.info("store: migrated the schema to version %d", step)
            row.value = str(SCHEMA_VERSION)

    def schema_version(self) -> int:
        with self.session() as session:
            return int(session.get(Meta, "schema_version").value)

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session whose transaction commits on success and rolls back on error."""
        session = self._sessions()
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def backup(self, destination: str | Path) -> Path:
        """Copy the database to ``destination`` with SQLite's online backup API.

        Safe while the portal and the dispatcher are writing: the copy is a consistent
        snapshot. To restore, stop Constellation and put the copy in place of the database
        file (or point CONSTELLATION_DB_URL at it).
        """
        if not self.is_sqlite:
            raise InvalidRequest("backup works on SQLite databases; use pg_dump for PostgreSQL")
        destination = Path(destination).resolve()
        if destination.exists():
            raise InvalidRequest(f"{destination} already exists; choose a new file")
        destination.parent.mkdir(parents=True, exist_ok=True)
        source_connection = self.engine.raw_connection()
        try:
            target = sqlite3.connect(destination)
            try:
                source_connection.driver_connection.backup(target)
            finally:
                target.close()
        finally:
            source_connection.close()
        logger.info("store: backed up to %s", destination)
        return destination

    # -- the dispatcher lease -------------------------------------------------------

    def acquire_lease(self, holder: str, seconds: float) -> bool:
        """Take or renew the single dispatcher lease; False while another holder's is live.

        The conditional UPDATE is the compare-and-set; the primary key makes two
        first-time inserts collide, so only one dispatcher can ever win.
        """
        now = time.time()
        try:
            with self.session() as session:
                updated = session.execute(
                    text("UPDATE dispatcher_lease SET holder = :h, expires_at = :e "
                         "WHERE id = 1 AND (holder = :h OR expires_at <= :now)"),
                    {"h": holder, "e": now + seconds, "now": now})
                if updated.rowcount == 1:
                    return True
                if session.get(DispatcherLease, 1) is not None:
                    return False
                session.add(DispatcherLease(id=1, holder=holder, expires_at=now + seconds))
            return True
        except IntegrityError:
            return False

    def release_lease(self, holder: str) -> None:
        with self.session() as session:
            session.execute(text("UPDATE dispatcher_lease SET expires_at = 0 WHERE holder = :h"),
                            {"h": holder})

    def cluster_health(self) -> dict:
        """What the portal shows about the cluster, from the dispatcher's lease row.

        ``status`` is ``online``, ``unavailable`` (the head is not answering) or
        ``no dispatcher`` (none holds a live lease, so nothing runs).
        """
        with self.session() as session:
            lease = session.get(DispatcherLease, 1)
            if lease is None or lease.expires_at <= time.time():
                return {"status": ClusterStatus.NO_DISPATCHER.value,
                        "message": "no dispatcher is running", "cpus": 0.0}
            return {"status": lease.cluster_status, "message": lease.cluster_message,
                    "cpus": lease.cluster_cpus}

    def lease_holder(self) -> str | None:
        """The live lease's holder, or None when no dispatcher is running."""
        with self.session() as session:
            lease = session.get(DispatcherLease, 1)
            if lease is None or lease.expires_at <= time.time():
                return None
            return lease.holder


def _index_failed_rows_only(session: Session) -> None:
    """Version 2: the index over every task's status becomes one over failed rows only."""
    session.execute(text("DROP INDEX IF EXISTS ix_tasks_project_status"))
    for index in Task.__table__.indexes:
        if index.name == "ix_tasks_failed":
            index.create(session.connection(), checkfirst=True)


# Schema version -> the step that brings a database from the version before it.
def _node_health(session: Session) -> None:
    """Version 3: nodes are checked when they join, can be quarantined, and can be trusted;
    projects count the rows accepted from a trusted node."""
    existing = {c["name"] for c in inspect(session.connection()).get_columns("nodes")}
    for column, kind in (("health", f"VARCHAR(16) NOT NULL DEFAULT '{NodeHealth.CHECKING.value}'"),
                         ("health_reason", "TEXT"), ("failures", "INTEGER NOT NULL DEFAULT 0"),
                         ("quarantined_until", "FLOAT"), ("checked_at", "FLOAT"),
                         ("trusted", "BOOLEAN NOT NULL DEFAULT FALSE")):
        # create_all, which runs first, made the table whole if it did not exist yet.
        if column not in existing:
            session.execute(text(f"ALTER TABLE nodes ADD COLUMN {column} {kind}"))
    if "rows_trusted" not in {c["name"] for c in inspect(session.connection()).get_columns("projects")}:
        session.execute(text("ALTER TABLE projects ADD COLUMN rows_trusted INTEGER NOT NULL DEFAULT 0"))


def _account_sessions(session: Session) -> None:
    """Version 4: signing out ends a user's sessions on the server; registrations remember
    their client address (for the registration rate limit)."""
    existing = {c["name"] for c in inspect(session.connection()).get_columns("users")}
    for column, kind in (("sessions_valid_after", "FLOAT NOT NULL DEFAULT 0"),
                         ("registered_from", "VARCHAR(64)")):
        if column not in existing:
            session.execute(text(f"ALTER TABLE users ADD COLUMN {column} {kind}"))


def _volunteer_approval(session: Session) -> None:
    """Version 5: an admin can approve volunteers (the ``volunteer_approval`` setting). Every
    account that is a volunteer already counts as approved, so that turning the setting on
    does not hide the join command from people who are contributing."""
    existing = {c["name"] for c in inspect(session.connection()).get_columns("users")}
    if "volunteer_approved" not in existing:
        session.execute(text("ALTER TABLE users ADD COLUMN volunteer_approved "
                             "BOOLEAN NOT NULL DEFAULT FALSE"))
    session.execute(text("UPDATE users SET volunteer_approved = TRUE WHERE roles LIKE '%volunteer%'"))


def _stored_bytes(session: Session) -> None:
    """Version 6: projects count the bytes of result text they store, and are indexed by
    owner (the storage quotas).

    Existing projects get what they hold now, so that a project or an owner already past
    a quota stops at its next batch rather than being counted from zero. This reads every
    stored result once, so the upgrade takes time in proportion to the database's size."""
    existing = {c["name"] for c in inspect(session.connection()).get_columns("projects")}
    if "stored_bytes" not in existing:
        session.execute(text("ALTER TABLE projects ADD COLUMN stored_bytes "
                             "BIGINT NOT NULL DEFAULT 0"))
    # Bytes, as the quota counts them: SQLite's length() counts characters of text, and a
    # blob's length is its bytes (SQLite 3.40 has no octet_length).
    postgresql = session.get_bind().dialect.name == "postgresql"

    def size(column: str) -> str:
        return f"COALESCE(octet_length({column}), 0)" if postgresql \
            else f"COALESCE(length(CAST({column} AS BLOB)), 0)"

    text_size = " + ".join(size(c) for c in ("output", "error", "traceback"))
    held = " + ".join(
        f"(SELECT COALESCE(SUM({text_size}), 0) FROM {table} WHERE {table}.project_id = projects.id)"
        for table in ("tasks", "replicas", "task_history"))
    session.execute(text(f"UPDATE projects SET stored_bytes = {held}"))
    for index in Project.__table__.indexes:
        if index.name == "ix_projects_owner_id":
            index.create(session.connection(), checkfirst=True)


_MIGRATIONS = {2: _index_failed_rows_only, 3: _node_health, 4: _account_sessions,
               5: _volunteer_approval, 6: _stored_bytes}


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    _use_wal(cursor)
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _use_wal(cursor) -> None:
    """Put the file in WAL mode (a property of the file: the first connection sets it).

    Switching needs the file to itself. Processes opening a new database together (the
    portal and the dispatcher) once got "database is locked" here in a test under load, so
    a busy switch is retried for as long as the busy timeout.
    """
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")  # an in-memory database stays "memory"
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
