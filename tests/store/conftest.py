"""The store layer: the engine on a real store, a SQLite file in a temporary directory or a
database on the session's PostgreSQL server (``postgres_server``, ``support.on_backend``),
and the CLI as a subprocess on it. No Ray: ``ray.nodes()`` entries are written by hand
(``support.registry``). A test marked ``slow`` here may run a project on the session's Ray
head (``ray_head``, ``cluster_settings``). It has no fixtures of its own beyond
``tests/conftest.py``'s.
"""
