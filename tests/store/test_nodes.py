"""The join command and the node registry, on real SQLite (no Ray cluster needed).

``sync_registry`` takes ``ray.nodes()`` output; here it gets hand-written entries of that
shape, so that each claim rule is checked on its own. tests/cluster/test_volunteers.py checks the
same rules against a real multi-node cluster.
"""

import logging
import os
import stat
import subprocess
import sys

import pytest
from ray._private.label_utils import validate_label_selector

from support import ROOT, engine_env
from support.registry import labels_of, parse, ray_node
from engine import accounts, nodes, placement
from engine.accounts import Role
from engine.errors import Forbidden, NotFound


@pytest.fixture
def people(store):
    for name, roles in (("alice", {Role.VOLUNTEER}), ("bob", {Role.VOLUNTEER}),
                        ("rita", {Role.RESEARCHER})):
        accounts.create_user(store, name, roles)
    return store


def by_id(store):
    return {v.node_id: v for v in nodes.list_nodes(store)}


def test_join_command_sets_the_token_and_ends_with_ray_start(people, settings):
    from engine.cluster import cluster_token

    settings = settings.replace(head_host="192.0.2.7", ray_port=6390)
    command = nodes.join_command(people, settings, "alice")
    env, argv = parse(command)
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN"] == cluster_token(settings)
    assert argv[:3] == ["ray", "start", "--address=192.0.2.7:6390"]
    labels = labels_of(command)
    assert labels[nodes.VOLUNTEER_LABEL] == "alice"
    assert labels[nodes.SIGNATURE_LABEL] == nodes.signature(settings, "alice", 1)
    # Every port the node listens on is in the documented range a firewall can open.
    options = dict(word.lstrip("-").split("=", 1) for word in argv[2:] if "=" in word)
    ports = {k: int(v) for k, v in options.items() if k.endswith("-port")}
    assert set(ports) == {"node-manager-port", "object-manager-port", "runtime-env-agent-port",
                          "dashboard-agent-grpc-port", "dashboard-agent-listen-port",
                          "metrics-export-port", "min-worker-port", "max-worker-port"}
    assert all(20000 <= p <= 20299 for p in ports.values()), ports
    assert len(set(ports.values())) == len(ports)
    assert ports["max-worker-port"] - ports["min-worker-port"] >= 100
    # Appending an option still gives one valid ray start command line.
    _, appended = parse(command + " --num-cpus=2")
    assert appended[-1] == "--num-cpus=2" and appended[:2] == ["ray", "start"]
    # Each volunteer gets their own signature; asking again gives the same command.
    assert labels_of(nodes.join_command(people, settings, "bob"))[nodes.SIGNATURE_LABEL] != \
        labels[nodes.SIGNATURE_LABEL]
    assert nodes.join_command(people, settings, "alice") == command


def test_join_command_only_for_volunteers(people, settings):
    for name in ("nobody", "rita"):
        with pytest.raises(NotFound):
            nodes.join_command(people, settings, name)
    accounts.create_user(people, "ada", {Role.ADMIN})
    assert "constellation-volunteer=ada" in nodes.join_command(people, settings, "ada")


def test_names_that_are_not_valid_labels_are_carried_by_user_id(people, settings):
    user = accounts.create_user(people, "_x" + "y" * 62, {Role.VOLUNTEER})
    command = nodes.join_command(people, settings, user.name)
    assert labels_of(command)[nodes.VOLUNTEER_LABEL] == f"u.{user.id}"
    nodes.sync_registry(people, settings, [ray_node("n1", labels_of(command))])
    assert by_id(people)["n1"].volunteer == user.name


def test_signing_key_is_private_and_never_logged(people, settings, caplog):
    caplog.set_level(logging.DEBUG)
    command = nodes.join_command(people, settings, "alice")
    key = settings.data_path / "secrets" / "volunteer_signing_key"
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    secret = key.read_text().strip()
    assert secret not in command
    assert all(secret not in r.getMessage() for r in caplog.records)
    token = (settings.data_path / "secrets" / "cluster_token").read_text().strip()
    assert all(token not in r.getMessage() for r in caplog.records)


def test_cli_join_command_prints_exactly_the_command(people, settings):
    env = engine_env(settings)
    out = subprocess.run([sys.executable, "-m", "engine", "join-command", "alice"], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == nodes.join_command(people, settings, "alice") + "\n"
    missing = subprocess.run([sys.executable, "-m", "engine", "join-command", "rita"], cwd=ROOT,
                             env=env, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 3 and missing.stdout == ""


def test_registry_claims_only_verified_nodes(people, settings):
    alice = labels_of(nodes.join_command(people, settings, "alice"))
    bob = labels_of(nodes.join_command(people, settings, "bob"))
    forged = {**alice, nodes.SIGNATURE_LABEL: nodes.signature(settings, "bob", 1)}
    guessed = {nodes.VOLUNTEER_LABEL: "alice", nodes.SIGNATURE_LABEL: "1-" + "0" * 40}
    nodes.sync_registry(people, settings, [
        ray_node("head", {"constellation-role": "head"}, head=True),
        ray_node("a1", alice), ray_node("b1", bob), ray_node("f1", forged),
        ray_node("g1", guessed), ray_node("plain"), ray_node("rita", {nodes.VOLUNTEER_LABEL: "rita",
                                                                     nodes.SIGNATURE_LABEL: "1-00"}),
    ])
    views = by_id(people)
    assert {k: (v.attribution, v.volunteer, v.claimed) for k, v in views.items()} == {
        "head": ("head", None, False), "a1": ("alice", "alice", True), "b1": ("bob", "bob", True),
        "f1": ("unclaimed", None, False), "g1": ("unclaimed", None, False),
        "plain": ("unclaimed", None, False), "rita": ("unclaimed", None, False)}
    assert views["f1"].label_volunteer == "alice"
    assert views["a1"].status == "online" and views["a1"].cpus == 2.0
    assert views["a1"].python_version == nodes.python_minor() and views["a1"].sandbox == "unknown"
    nodes.record_node_facts(people, "a1", sandbox="available", python_version="3.11.9")
    assert (by_id(people)["a1"].sandbox, by_id(people)["a1"].python_version) == ("available", "3.11.9")
    assert placement.excluded_node_ids(people, settings) == {"f1", "g1", "plain", "rita"}
    assert placement.parties(people) == {"head": "head", "a1": "alice", "b1": "bob"}
    assert placement.excluded_node_ids(people, settings.replace(allow_unclaimed_nodes=True)) == set()


def test_nodes_go_offline_and_keep_their_history(people, settings):
    alice = labels_of(nodes.join_command(people, settings, "alice"))
    nodes.sync_registry(people, settings, [ray_node("a1", alice), ray_node("a2", alice)])
    first = by_id(people)["a1"]
    # a1 died (Ray reports it dead, without resources); a2 vanished (the head restarted).
    nodes.sync_registry(people, settings, [ray_node("a1", alice, alive=False)])
    views = by_id(people)
    assert (views["a1"].status, views["a2"].status) == ("offline", "offline")
    assert views["a1"].cpus == 2.0 and views["a1"].first_seen == first.first_seen
    assert views["a1"].volunteer == "alice"
    # Re-running the command after a head restart gives a new node, claimed again.
    nodes.sync_registry(people, settings, [ray_node("a3", alice)])
    assert by_id(people)["a3"].claimed


def test_rotation_voids_old_signatures(people, settings):
    old = labels_of(nodes.join_command(people, settings, "alice"))
    nodes.sync_registry(people, settings, [ray_node("a1", old)])
    assert nodes.rotate_signature(people, "alice") == 2
    assert by_id(people)["a1"].attribution == "unclaimed"
    new = labels_of(nodes.join_command(people, settings, "alice"))
    assert new[nodes.SIGNATURE_LABEL].startswith("2-") and new != old
    nodes.sync_registry(people, settings, [ray_node("a1", old), ray_node("a2", new),
                                           ray_node("a3", old)])
    views = by_id(people)
    assert (views["a1"].claimed, views["a2"].claimed, views["a3"].claimed) == (False, True, False)
    assert views["a1"].label_volunteer == "alice"
    assert "a1" in placement.excluded_node_ids(people, settings)
    assert placement.parties(people) == {"a2": "alice"}


def test_disabled_volunteer_stops_earning(people, settings):
    from engine.models import User

    labels = labels_of(nodes.join_command(people, settings, "bob"))
    nodes.sync_registry(people, settings, [ray_node("b1", labels)])
    with people.session() as session:
        session.query(User).filter(User.name == "bob").update({"disabled": True})
    nodes.sync_registry(people, settings, [ray_node("b1", labels)])
    assert by_id(people)["b1"].claimed is False


def test_label_selector_excludes_without_pinning(people, settings):
    assert placement.label_selector(set()) is None
    ids = {"a" * 56, "b" * 56}
    selector = placement.label_selector(ids)
    assert selector == {"ray.io/node-id": f"!in({'a' * 56},{'b' * 56})"}
    assert validate_label_selector(selector) is None  # Ray accepts it


def test_volunteers_see_only_their_own_nodes(people, settings):
    alice = labels_of(nodes.join_command(people, settings, "alice"))
    bob = labels_of(nodes.join_command(people, settings, "bob"))
    nodes.sync_registry(people, settings, [ray_node("a1", alice), ray_node("b1", bob),
                                           ray_node("x1")])
    assert [v.node_id for v in nodes.list_nodes(people, accounts.get_user(people, "alice"))] == ["a1"]
    assert len(nodes.list_nodes(people, accounts.local_admin(people))) == 3
    with pytest.raises(Forbidden):
        nodes.list_nodes(people, accounts.get_user(people, "rita"))


def test_the_join_instructions_say_what_to_install_and_open(settings):
    text = nodes.install_instructions(settings.replace(head_host="192.0.2.7", ray_port=6390))
    import ray

    assert f"ray=={ray.__version__}" in text and "bubblewrap" in text
    for platform in ("Debian", "Fedora", "WSL2", "macOS"):
        assert platform in text
    # Which connections each side opens, on which ports, and what NAT needs.
    assert "192.0.2.7:6390" in text and settings.node_ports in text and settings.head_ports in text
    assert "NAT" in text and "WireGuard" in text and "--node-ip-address" in text
    assert "refuses to join" in text  # what happens when versions differ
