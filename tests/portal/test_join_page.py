"""The Join page: a volunteer's own command, and rotating its signature."""

from portal_pages import open_page, signed_in

from engine import accounts, nodes
from engine.errors import NotFound

import pytest


def test_volunteer_rotates_their_signature_from_the_join_page(portal):
    at = open_page(signed_in("vic"), "app_pages/join.py")
    before = at.code[0].value
    # It ends in ray start's options, where a volunteer appends their own.
    assert "RAY_AUTH_MODE=token" in before and before.rstrip().split()[-1].startswith("--")
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


def _nodes_of_vic(store):
    """vic's three machines, as the registry holds them: one checking, one ready, one
    quarantined with its reason."""
    import time

    from engine.models import Node

    now = time.time()
    with store.session() as s:
        for node_id, host, health, reason in (
                ("c" * 56, "laptop", "checking", None),
                ("r" * 56, "desktop", "ready", None),
                ("q" * 56, "old-pc", "quarantined", "bubblewrap is not installed on this machine: "
                                                    "sudo apt install bubblewrap")):
            s.add(Node(node_id=node_id, role="volunteer", volunteer="vic", claimed=True,
                       hostname=host, first_seen=now, last_seen=now, online=True, health=health,
                       health_reason=reason, quarantined_until=now + 30 if reason else None))


def test_the_join_page_shows_each_machine_checking_ready_or_quarantined_and_why(portal):
    _nodes_of_vic(portal)
    at = open_page(signed_in("vic"), "app_pages/join.py")
    text = lambda kind: " ".join(e.value.replace("\\", "") for e in getattr(at, kind))  # noqa: E731
    assert "laptop" in text("info") and "is being checked" in text("info")
    assert "desktop" in text("success") and "ready" in text("success")
    assert "old-pc" in text("error") and "sudo apt install bubblewrap" in text("error")
    table = next(df.value for df in at.dataframe if "health" in df.value)
    assert sorted(table["health"]) == ["checking", "quarantined", "ready"]


def test_admins_see_quarantined_nodes_with_their_reason_and_can_trust_a_node(portal):
    _nodes_of_vic(portal)
    at = open_page(signed_in("root"), "app_pages/admin.py")
    assert any("old-pc" in e.value and "bubblewrap" in e.value for e in at.error)
    table = next(df.value for df in at.dataframe if "health" in df.value)
    assert list(table.loc[table["machine"] == "old-pc", "why"])[0].startswith("bubblewrap is not installed")
    at.selectbox(key="trust_choice").set_value(
        next(o for o in at.selectbox(key="trust_choice").options if "desktop" in o))
    trust_button = next(b for b in at.button if b.label == "Trust / stop trusting")
    trust_button.click()
    at.run()
    assert {v.hostname: v.trusted for v in nodes.list_nodes(portal)}["desktop"] is True
    # The table shows it in the same run.
    table = next(df.value for df in at.dataframe if "health" in df.value)
    assert list(table.loc[table["machine"] == "desktop", "trusted"]) == [True]
