"""The portal layer: the portal's pages under Streamlit's AppTest through the real entry
point (a real store; trial runs in the real sandbox), and the download route over real
HTTP. Its ``slow`` tests serve the whole stack (``support.served_portal``) and talk to it
over HTTP or Streamlit's websocket (``portal_session.py``), without a browser. The page
helpers are in ``portal_pages.py``; the fixture here gives the pages their environment.
"""

from __future__ import annotations

import pytest

from engine import accounts
from portal_pages import PASSWORD, USERS


@pytest.fixture
def portal(settings, store, monkeypatch):
    """The portal's environment: the test's data directory, and one account per role."""
    monkeypatch.setenv("CONSTELLATION_DATA_DIR", settings.data_dir)
    monkeypatch.setenv("CONSTELLATION_ROW_TIMEOUT", "10")
    for name, roles in USERS.items():
        accounts.add_user(store, name, roles, password=PASSWORD, email=f"{name}@x.org")
    return store
