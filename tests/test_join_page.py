"""The Join page: a volunteer's own command, and rotating its signature."""

from test_portal import open_page, portal, signed_in  # noqa: F401  (portal is a fixture)

from engine import accounts, nodes
from engine.errors import NotFound

import pytest


def test_volunteer_rotates_their_signature_from_the_join_page(portal):
    at = open_page(signed_in("vic"), "app_pages/join.py")
    before = at.code[0].value
    assert "RAY_AUTH_MODE=token" in before and before.rstrip().split()[-1] == "--disable-usage-stats"
    [button] = [b for b in at.button if b.label == "Rotate my signature"]
    button.click()
    at.run()
    after = at.code[0].value
    assert after != before
    assert nodes.SIGNATURE_LABEL + "=2-" in after  # the next generation
    assert any("Signature rotated" in s.value for s in at.success)


def test_only_the_volunteer_or_an_admin_rotates_a_signature(portal):
    store = portal
    with pytest.raises(NotFound):
        nodes.rotate_signature(store, "vic", actor=accounts.get_user(store, "both"))
    assert nodes.rotate_signature(store, "vic", actor=accounts.get_user(store, "root")) == 2
