"""Uploads: names are display text only, and nothing uploaded runs where it is uploaded.

Scripts and datasets are stored in the database (``Project.script_source`` and
``DatasetChunk``), never as files; a user-supplied name is never a path.
"""

import os

from engine import accounts, projects
from engine.models import Project


def tree(path):
    return {os.path.join(d, f) for d, _dirs, files in os.walk(path) for f in files}


def test_a_path_like_upload_name_is_only_display_text(store, settings, data_dir, tmp_path):
    marker = tmp_path / "executed"
    source = (f"open({str(marker)!r}, 'w').write('ran at import')\n"
              f"def main(row):\n    return row['x']\n").encode()
    # Where a traversal from the data directory (or the working directory) would land.
    landing = [data_dir.parent / "x.py", data_dir.parent.parent / "x.py",
               data_dir / "uploads" / "x.py", data_dir.parent / "d.csv"]
    before = tree(data_dir)
    pid = projects.submit_project(
        store, settings, accounts.local_admin(store), title="t", script_name="../../x.py",
        script_bytes=source, dataset_name="../../../d.csv", dataset_bytes=b"x\n1\n2\n")
    with store.session() as session:
        project = session.get(Project, pid)
        assert (project.script_name, project.dataset_name) == ("../../x.py", "../../../d.csv")
        assert project.script_source == source.decode()
    # Only the database itself (and its journal files) changed in the data directory.
    assert {os.path.basename(p) for p in tree(data_dir) - before} <= {
        "constellation.db", "constellation.db-wal", "constellation.db-shm"}
    assert not any(path.exists() for path in landing)
    assert not (os.path.exists("x.py") or os.path.exists("../x.py"))
    # Checking and storing the upload never ran its top-level code.
    assert not marker.exists()
    view = projects.project_status(store, accounts.local_admin(store), pid)
    assert view.title == "t" and view.rows_total == 2
