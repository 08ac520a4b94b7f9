"""The node layer: what runs on a volunteer's machine, for real but without Ray. The
executor and its sandboxed children (bubblewrap), trial runs, the join command's
confinement; a store where the code under test needs one. A test marked ``slow`` here may
run its project through the dispatcher on the session's Ray head (``cluster_settings``).

Every test ends the executor's warm children, so that none outlives it into the next.
"""

from __future__ import annotations

import pytest

from engine.node import executor


@pytest.fixture(autouse=True)
def _stop_children():
    yield
    executor.shutdown()
