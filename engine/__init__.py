"""Constellation's engine: a library that runs ``main(row)`` over datasets on Ray.

It never imports Streamlit; the portal and the CLI are its clients. The public API:
"""

from engine.accounts import Role, local_admin
from engine.errors import (ClusterUnavailable, ConstellationError, Forbidden, InvalidDataset,
                           InvalidRequest, InvalidScript, NotFound)
from engine.export import export_results
from engine.projects import (ProjectStatusView, cancel_project, check_upload, list_projects,
                             project_status, rerun_failed_rows, rows_per_node,
                             submit_project)
from engine.settings import SETTINGS, Settings
from engine.status import ProjectStatus, TaskStatus
from engine.store import Store
# Modules that declare tables must be imported before a Store creates the schema.
from engine import credit, nodes, verification  # noqa: E402,F401  (isort: skip)

__all__ = [
    "ClusterUnavailable", "ConstellationError", "Forbidden", "InvalidDataset", "InvalidRequest",
    "InvalidScript", "NotFound", "ProjectStatus", "ProjectStatusView", "Role", "SETTINGS",
    "Settings", "Store", "TaskStatus", "cancel_project", "check_upload", "export_results",
    "list_projects", "local_admin", "project_status", "rerun_failed_rows", "rows_per_node",
    "submit_project",
]
