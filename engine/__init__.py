"""Constellation's engine: a library that runs ``main(row)`` over datasets on Ray.

It never imports Streamlit; the portal and the CLI are its clients. ``engine.node`` is
the part that runs on volunteers' machines, standard library and Ray only; so that it
can be imported there, importing ``engine`` itself imports nothing, and the public API
below is loaded on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it
_PUBLIC = {
    "Role": "engine.accounts", "local_admin": "engine.accounts",
    "ClusterUnavailable": "engine.errors", "ConstellationError": "engine.errors",
    "Forbidden": "engine.errors", "InvalidDataset": "engine.errors",
    "InvalidRequest": "engine.errors", "InvalidScript": "engine.errors",
    "NotFound": "engine.errors",
    "export_results": "engine.export",
    "ProjectStatusView": "engine.projects", "cancel_project": "engine.projects",
    "check_upload": "engine.projects", "list_projects": "engine.projects",
    "project_status": "engine.projects", "rerun_failed_rows": "engine.projects",
    "rows_per_node": "engine.projects", "submit_project": "engine.projects",
    "SETTINGS": "engine.settings", "Settings": "engine.settings",
    "ProjectStatus": "engine.status", "TaskStatus": "engine.status",
    "Store": "engine.store",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name]), name)
        globals()[name] = value
        return value
    # ``from engine import nodes`` and the like: submodules import as usual.
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
