"""A throwaway PostgreSQL server for tests and benchmarks, from Debian's ``postgresql`` package.

The server lives in a short temporary directory, listens only on a Unix socket there (no
TCP port, so parallel sessions cannot collide), trusts local connections, and is stopped
by its PID. PostgreSQL refuses to run as root, so under root the server runs as the
package's ``postgres`` system user (``nobody`` if that user is missing): the directory is
handed to that user, and ``subprocess`` switches uid before it executes ``initdb`` and
``postgres``, which needs neither ``su`` nor ``runuser``.

``make test`` installs the package (``make system-deps``). Without it the
``postgres_server`` fixture (``tests/conftest.py``) skips with the reason, except under CI
(``CI`` set), where a missing server must fail loudly rather than quietly drop the
PostgreSQL half of the store's tests. ``bench/scaling.py`` imports this module alone.
"""

from __future__ import annotations

import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

BIN_GLOB = "/usr/lib/postgresql/*/bin"
USER = "constellation"
PORT = 5432  # only names the socket file (.s.PGSQL.5432) inside the private directory


class PostgresUnavailable(RuntimeError):
    """The postgresql package is not installed."""


def find_bin_dir() -> Path | None:
    """The newest PostgreSQL's bin directory with both ``initdb`` and ``postgres``, if any."""
    found = []
    for path in Path("/usr/lib/postgresql").glob("*/bin"):
        if (path / "initdb").exists() and (path / "postgres").exists():
            version = re.match(r"\d+", path.parent.name)
            found.append((int(version.group()) if version else 0, path))
    return max(found)[1] if found else None


class PostgresServer:
    """One private PostgreSQL server. ``durable=False`` (tests) turns fsync off.

    A benchmark uses ``durable=True``: PostgreSQL's defaults, each commit flushed to the WAL.
    """

    def __init__(self, *, durable: bool = False):
        self.bin_dir = find_bin_dir()
        if self.bin_dir is None:
            raise PostgresUnavailable(
                "PostgreSQL is not installed (no /usr/lib/postgresql/*/bin/initdb); "
                "`make system-deps` installs Debian's postgresql package")
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="cpg-", dir="/tmp"))
        self.data = self.root / "data"
        self.process: subprocess.Popen | None = None
        self._names = itertools.count(1)
        self._as_user: dict = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                account = pwd.getpwnam("nobody")
            self._as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
            os.chown(self.root, account.pw_uid, account.pw_gid)

    def _run(self, *args: str) -> None:
        done = subprocess.run([str(self.bin_dir / args[0]), *args[1:]], capture_output=True,
                              text=True, cwd=self.root, timeout=120, **self._as_user)
        if done.returncode != 0:
            raise RuntimeError(f"{args[0]} failed ({done.returncode}): {done.stderr[-2000:]}")

    def start(self) -> "PostgresServer":
        init = ["initdb", "-D", str(self.data), "-U", USER, "--auth=trust", "--encoding=UTF8",
                "--locale=C", "--no-instructions"]
        self._run(*init, *([] if self.durable else ["--no-sync"]))
        options = {"listen_addresses": "", "unix_socket_directories": str(self.root),
                   "port": str(PORT), "max_connections": "200"}
        if not self.durable:
            options.update(fsync="off", synchronous_commit="off", full_page_writes="off")
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data)]
        for key, value in options.items():
            command += ["-c", f"{key}={value}"]
        self.log = self.root / "server.log"
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.root, start_new_session=True, **self._as_user)
        self._wait_ready()
        return self

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.conninfo("postgres"), connect_timeout=2):
                    return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    tail = self.log.read_text(errors="replace")[-2000:]
                    self.stop()
                    raise RuntimeError(f"PostgreSQL did not start:\n{tail}") from None
                time.sleep(0.1)

    def conninfo(self, database: str) -> str:
        return f"host={self.root} port={PORT} user={USER} dbname={database}"

    def url(self, database: str) -> str:
        """The SQLAlchemy URL (``CONSTELLATION_DB_URL``) of one database on this server."""
        return f"postgresql+psycopg://{USER}@/{database}?host={self.root}&port={PORT}"

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database; returns its URL."""
        import psycopg

        name = name or f"t{next(self._names)}"
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: sessions are ended, nothing is waited on.
            os.kill(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        shutil.rmtree(self.root, ignore_errors=True)

