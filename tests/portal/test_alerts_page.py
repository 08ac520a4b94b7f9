"""Security alerts on the Admin page (issue 12): a rogue driver, answered by the engine's own
``drivers.watch``, shows first on the page with its node and volunteer; without alerts the
page shows no alert block. Real SQLite, real entry point; no Ray."""

from __future__ import annotations

import time

from engine import accounts, drivers
from engine.models import Node
from portal_pages import open_page, signed_in, texts

VIC_NODE, HEAD_NODE, STRANGER = "a" * 56, "h" * 56, "e" * 56


def _registry(store) -> None:
    now = time.time()
    with store.session() as session:
        session.add(Node(node_id=VIC_NODE, role="volunteer", volunteer="vic", claimed=True,
                         label_volunteer="vic", hostname="laptop.example.org", first_seen=now,
                         last_seen=now, health="ready"))
        session.add(Node(node_id=HEAD_NODE, role="head", hostname="portal-host", first_seen=now,
                         last_seen=now, health="ready"))


def _rogue(job_id: str, node_id: str) -> drivers.Driver:
    return drivers.Driver(job_id=job_id, node_id=node_id, ip="192.0.2.5", pid=4242,
                          started_at=time.time() - 60, ended=False, entrypoint="python loot.py")


def _alert_table(at):
    return next((df.value for df in at.dataframe if "detail" in df.value), None)


def test_the_admin_sees_a_rogue_driver_alert_naming_the_node_and_the_volunteer(portal):
    _registry(portal)
    drained = []
    answers = drivers.watch(portal, [_rogue("03000000", VIC_NODE), _rogue("05000000", STRANGER)],
                            drained.append)
    assert len(answers) == 2 and drained == [VIC_NODE]
    assert accounts.get_user(portal, "vic").disabled

    at = open_page(signed_in("root"), "app_pages/admin.py")
    [alert] = [e for e in texts(at, "error") if "security alert" in e]
    assert alert.startswith("**2 security alerts**:")
    assert "removed from the cluster" in alert and "disabled pending your review" in alert
    assert "Users" in alert and "Enable" in alert  # how to let the volunteer back in
    table = _alert_table(at)
    assert list(table.columns) == ["when", "kind", "node", "volunteer", "detail"]
    by_job = {("03000000" in d): row for d, row in zip(table["detail"], table.to_dict("records"))}
    vic_row, stranger_row = by_job[True], by_job[False]
    # The node by its machine name (and the short id the CLI takes), the volunteer by name.
    assert vic_row["node"] == f"laptop ({VIC_NODE[:12]})" and vic_row["volunteer"] == "vic"
    assert vic_row["kind"] == drivers.ROGUE_DRIVER and "disabled pending review" in vic_row["detail"]
    assert stranger_row["node"] == f"unknown node {STRANGER[:12]}"
    assert stranger_row["volunteer"] == "unknown"
    # The alert is above the tabs: the first table on the page.
    assert at.dataframe[0].value.equals(table)

    # After review the volunteer is enabled again with the page's own Enable.
    at.selectbox(key="user_choice").set_value("vic")
    at.run()
    at.button(key="enable_user").click()
    at.run()
    assert not accounts.get_user(portal, "vic").disabled


def test_a_driver_through_the_head_names_the_head_and_no_volunteer(portal):
    _registry(portal)
    drivers.watch(portal, [_rogue("04000000", HEAD_NODE)], lambda node_id: None)
    at = open_page(signed_in("root"), "app_pages/admin.py")
    assert any(e.startswith("**1 security alert**:") for e in texts(at, "error"))
    [row] = _alert_table(at).to_dict("records")
    assert row["node"] == f"head · portal-host ({HEAD_NODE[:12]})" and row["volunteer"] == "unknown"


def test_no_alert_block_without_alerts(portal):
    _registry(portal)
    at = open_page(signed_in("root"), "app_pages/admin.py")
    assert not any("security alert" in e for e in texts(at, "error"))
    assert _alert_table(at) is None
    assert at.dataframe[0].value.columns[0] == "name"  # the Users table comes first
