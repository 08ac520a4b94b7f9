"""Fixtures of several layers: real SQLite files, a PostgreSQL server, a real Ray head on a
free port.

Only fixtures and hooks live in conftest files; plain helpers are in ``tests/support``.
Importing ``support`` first puts the session's cluster token in the environment, before
any test imports Ray.
"""

from __future__ import annotations

import os
import shutil

import pytest

from support import TEST_HEAD_PORTS, free_port, short_tempdir, write_token
from support.postgres import PostgresServer, PostgresUnavailable
from engine.settings import Settings
from engine.store import Store


@pytest.fixture(scope="session")
def ray_head():
    """A real Ray head for the whole session, started and stopped by PID."""
    from engine.cluster import LocalHead

    data_dir = short_tempdir("cr-head-")
    write_token(data_dir)
    settings = Settings(data_dir=str(data_dir), ray_port=free_port(), ray_num_cpus=2,
                        head_ports=TEST_HEAD_PORTS)
    head = LocalHead(settings)
    yield settings
    import ray

    ray.shutdown()
    head.stop(grace=1)
    shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server():
    """A PostgreSQL server for the whole session; each test makes its own database."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as exc:
        if os.environ.get("CI"):
            pytest.fail(f"{exc} (CI must run the store's tests on PostgreSQL)")
        pytest.skip(str(exc))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def data_dir():
    path = short_tempdir("cr-")
    write_token(path)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def settings(data_dir) -> Settings:
    # One node here: replication 1 unless a test builds a cluster of volunteers.
    return Settings(data_dir=str(data_dir), row_timeout=10.0, replication=1,
                    head_ports=TEST_HEAD_PORTS)


@pytest.fixture
def cluster_settings(settings, ray_head) -> Settings:
    """Settings for a test that runs projects on the session's Ray head."""
    return settings.replace(ray_port=ray_head.ray_port)


@pytest.fixture
def store(settings) -> Store:
    return Store(settings)


