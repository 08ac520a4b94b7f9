"""Per-project sandbox limits: a project may set them, up to the admin maximum."""

import io
import json

import pytest

from support import run_to_end, submit_numbers
from engine import accounts
from engine.errors import InvalidRequest
from engine.export import export_results


def allocating(mib_per_row: int) -> bytes:
    return (b"def main(row):\n"
            b"    block = bytearray((row['x'] + 1) * %d * 1024 * 1024)\n"
            b"    return len(block)\n" % mib_per_row)


@pytest.mark.slow
def test_a_project_memory_limit_applies_to_its_rows(store, cluster_settings):
    small = submit_numbers(store, cluster_settings, "alloc.py", 2, source=allocating(1),
                           memory_limit_mb=256)
    assert run_to_end(store, cluster_settings, small).rows_succeeded == 2
    big = submit_numbers(store, cluster_settings, "alloc.py", 1, source=allocating(300),
                         memory_limit_mb=256)
    assert run_to_end(store, cluster_settings, big).rows_failed == 1
    out = io.StringIO()
    export_results(store, accounts.local_admin(store), big, "json", out)
    assert json.loads(out.getvalue())[0]["error"] == "MemoryError: memory limit of 256 MiB exceeded"


def test_limits_above_the_admin_maximum_are_refused(store, settings):
    with pytest.raises(InvalidRequest, match="memory limit must be between 1 and 8192 MB"):
        submit_numbers(store, settings, "square.py", 1, memory_limit_mb=9000)
    with pytest.raises(InvalidRequest, match="output limit must be between 1 and 100 MB"):
        submit_numbers(store, settings, "square.py", 1, output_limit_mb=101)
