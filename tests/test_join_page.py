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


def test_trust_is_visible_to_admins_and_to_each_volunteer_for_themself(portal):
    from engine.verification import Trust, trust_for

    store = portal
    with store.session() as s:
        s.add_all([Trust(volunteer="vic", script_sha256="a" * 64, streak=12, updated_at=1.0),
                   Trust(volunteer="both", script_sha256="a" * 64, streak=0, updated_at=1.0)])
    assert [t["volunteer"] for t in trust_for(store, accounts.get_user(store, "vic"))] == ["vic"]
    assert len(trust_for(store, accounts.get_user(store, "root"))) == 2
    at = open_page(signed_in("vic"), "app_pages/join.py")
    table = at.dataframe[-1].value
    assert list(table["volunteer"]) == ["vic"] and list(table["trusted"]) == [True]
    at = open_page(signed_in("root"), "app_pages/admin.py")
    assert any(list(df.value.get("volunteer", [])) == ["both", "vic"] for df in at.dataframe)
