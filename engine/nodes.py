"""Nodes: the join command a volunteer copies, and the registry of the cluster's nodes.

A volunteer joins by running one shell command. It carries the cluster token (Ray 2.60
needs ``RAY_AUTH_MODE=token`` with it) and two node labels: the volunteer's name and a
signature, an HMAC-SHA256 of that name under a server secret that never leaves the data
directory. Anyone holding the token can start a node with any labels, so a node counts as
the volunteer's only when its signature verifies; otherwise it is "unclaimed", earns
nothing, and runs work only if the admin allows it (``allow_unclaimed_nodes``).

Each volunteer's signature has a generation. Rotating it bumps the generation: nodes
started with the old signature stop earning from that moment (tasks they finished before
still count) and must join again with the new command.

The registry is a copy of ``ray.nodes()`` kept in the store by ``sync_registry`` (the
dispatcher calls it every few seconds), so the portal can list nodes without being a Ray
driver, and nodes that left stay listed, offline.

What the dispatcher asks of the registry (which nodes get no work, who answers for each
node, the label selector that keeps batches off nodes) lives in ``engine.placement``.

Why this module is over 400 lines: the join command and the registry share the labels and
the signature rule (a node is a volunteer's while the labels its join command wrote still
verify), which reads best in one file; 45 of its lines are the Join page's instructions.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from sqlalchemy import select, update

from engine import cluster, confinement, credit
from engine.accounts import OPERATOR, Role, is_admin, require_may_join, require_role, user_named
from engine.errors import InvalidRequest, NotFound
from engine.keys import data_secret
from engine.models import Node, User, VolunteerKey
from engine.settings import Settings
from engine.status import NodeHealth, NodeRole, NodeStatus
from engine.store import Store

logger = logging.getLogger(__name__)

VOLUNTEER_LABEL = "constellation-volunteer"
SIGNATURE_LABEL = "constellation-signature"
ROLE_LABEL = "constellation-role"          # NodeRole.HEAD on the head (engine.cluster.LocalHead)
NODE_ID_LABEL = "ray.io/node-id"           # set by Ray on every node

# Ray label values are at most 63 characters, alphanumeric at both ends. 40 hex digits
# (160 bits) of the HMAC fit beside the generation number.
_SIGNATURE_HEX = 40
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,61}[A-Za-z0-9])?")
# User names never contain a dot, so "u.<id>" can stand for a name that is not a valid label.
_USER_ID_LABEL = re.compile(r"u\.(\d+)")


# -- the server secret and signatures ----------------------------------------------------


def _server_secret(settings: Settings) -> bytes:
    """The HMAC key, created on first use in the data directory (mode 0600, never logged)."""
    return bytes.fromhex(data_secret(settings, "volunteer_signing_key"))


def signature(settings: Settings, volunteer: str, generation: int) -> str:
    """The label value that proves a node belongs to ``volunteer``: ``<generation>-<hmac>``."""
    mac = hmac.new(_server_secret(settings), f"{volunteer}\n{generation}".encode(), hashlib.sha256)
    return f"{generation}-{mac.hexdigest()[:_SIGNATURE_HEX]}"


def _label_for(user: User) -> str:
    return user.name if _LABEL_VALUE.fullmatch(user.name) else f"u.{user.id}"


def _may_volunteer(user: User | None) -> bool:
    return (user is not None and not user.disabled
            and (Role.VOLUNTEER.value in user.role_set or is_admin(user)))


def _volunteer(session, name: str) -> User:
    user = user_named(session, name)
    if not _may_volunteer(user):
        # Same message for "no such user" and "not a volunteer": names are not probed this way.
        raise NotFound(f"no volunteer named {name!r}")
    return user


def _generation(session, name: str) -> int:
    key = session.get(VolunteerKey, name)
    if key is None:
        key = VolunteerKey(volunteer=name, generation=1)
        session.add(key)
        session.flush()
    return key.generation


def short_id(node_id: str | None) -> str:
    """How a node id appears in logs and messages: its first 12 hex digits."""
    return (node_id or "?")[:12]


# -- the join command --------------------------------------------------------------------


def join_command(store: Store, settings: Settings, volunteer_name: str) -> str:
    """The one shell command that joins a machine to the cluster as ``volunteer_name``'s node.

    The node runs confined (``confinement.node_argv``: no home directory, the system and the
    volunteer's venv read-only), so it is run as the volunteer's own user in a shell where
    that venv is activated. It ends with ``ray start``'s options, so options such as
    ``--num-cpus=2`` can be appended. Raises NotFound unless the user exists, is enabled
    and may volunteer, and Forbidden while ``volunteer_approval`` holds them back.
    """
    with store.session() as session:
        user = _volunteer(session, volunteer_name)
        generation = _generation(session, user.name)
        label = _label_for(user)
    require_may_join(store, settings, user.name)  # volunteer_approval
    labels = f"{VOLUNTEER_LABEL}={label},{SIGNATURE_LABEL}={signature(settings, user.name, generation)}"
    env = {
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": cluster.cluster_token(settings),
        # Ray demands the head's exact Python patch release by default; the minor version
        # is what matters for pickled code, and volunteers cannot be asked to match patches.
        "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL": "minor",
    }
    options = [f"--address={cluster.head_address(settings)}", f"--labels={labels}",
               "--disable-usage-stats", *cluster.port_options(settings.node_ports)]
    return confinement.node_command(env, options)


def python_minor() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def install_instructions(settings: Settings) -> str:
    """What a volunteer installs and needs to know, as Markdown (the Join page; docs/volunteers.md
    says the same at more length)."""
    import ray

    py, head = python_minor(), cluster.head_address(settings)
    node_ports = settings.node_ports or "Ray's random ports"
    head_ports = settings.head_ports or "Ray's random ports"
    return (
        f"**1. Install** Python **{py}** (any {py}.x; the head runs {sys.version.split()[0]}), "
        f"**Ray {ray.__version__}** exactly, and **bubblewrap**, the sandbox research code runs "
        f"in. Nothing else of Constellation's: the head sends its code with the work.\n"
        f"- *Debian, Ubuntu:* `sudo apt install python{py} python{py}-venv bubblewrap`, then "
        f"`python{py} -m venv ~/constellation && ~/constellation/bin/pip install 'ray=={ray.__version__}'` "
        f"and `source ~/constellation/bin/activate`.\n"
        f"- *Fedora:* `sudo dnf install python{py} bubblewrap`, then the same venv steps.\n"
        f"- *Windows:* in WSL2 (Ubuntu), the Debian steps; WSL2's kernel has the user "
        f"namespaces bubblewrap needs. Use WSL's mirrored networking (`networkingMode=mirrored` "
        f"in `.wslconfig`) so that the head can reach the node.\n"
        f"- *macOS:* in a Linux virtual machine (for example Lima or UTM) with bridged "
        f"networking; bubblewrap needs Linux.\n"
        f"- *Ubuntu 23.10 and later* restrict unprivileged user namespaces: if the node is "
        f"quarantined with a bubblewrap error, allow them "
        f"(an AppArmor profile for `bwrap`, or `sudo sysctl kernel.apparmor_restrict_unprivileged_userns=0`).\n\n"
        f"If Ray's or Python's version differs from the head's, `ray start` refuses to join "
        f"and says which; install the versions above.\n\n"
        f"**2. Check the network.** Ray needs every machine to reach every other one directly:\n"
        f"- your machine opens connections to the head at `{head}` and to the head's ports "
        f"{head_ports};\n"
        f"- the head and other volunteers' nodes open connections to your machine on ports "
        f"{node_ports} (the command pins them), so a firewall on your machine must let those in.\n"
        f"\nBehind NAT (a home router), the head cannot reach you: you need a shared network, "
        f"the same LAN or an overlay network such as WireGuard or Tailscale, and then append "
        f"`--node-ip-address=<your address on it>` to the command.\n\n"
        f"**3. Run the command below as your own user, not root,** in the shell where that "
        f"venv is activated. It starts your node confined with bubblewrap: the node sees the "
        f"system and the venv read-only, and nothing of your home or your other processes. "
        f"Append options at the end: `--num-cpus=N` gives at most N CPUs. Within seconds this "
        f"page shows your machine being checked, then ready (or what to fix).\n\n"
        f"**4. To stop** contributing, press Ctrl-C, or run `ray stop`. If the head restarts, "
        f"your node leaves after about a minute: run the same command again.\n\n"
        f"The command contains the cluster's secret token and your signature: do not share "
        f"it. If it leaks, rotate your signature (the old one stops earning)."
    )


def rotate_signature(store: Store, volunteer_name: str, actor: User | None = None) -> int:
    """Void ``volunteer_name``'s current signature; returns the new generation.

    Their nodes stop earning at once and are unclaimed until they join with the new command.
    ``actor`` (when acting for a signed-in user) must be that volunteer or an admin.
    """
    if actor is not None:
        require_role(actor, Role.VOLUNTEER)
        if actor.name != volunteer_name and not is_admin(actor):
            raise NotFound(f"no volunteer named {volunteer_name!r}")
    now = time.time()
    with store.session() as session:
        user = _volunteer(session, volunteer_name)
        generation = _generation(session, user.name) + 1
        session.execute(update(VolunteerKey).where(VolunteerKey.volunteer == user.name)
                        .values(generation=generation, rotated_at=now))
        session.execute(update(Node).where(Node.volunteer == user.name, Node.claimed.is_(True))
                        .values(claimed=False, revoked_at=now))
    logger.info("volunteer %s: signature rotated to generation %d", volunteer_name, generation)
    return generation


# -- the registry ------------------------------------------------------------------------


def _verify(settings: Settings, labels: dict, users_by_name: dict, users_by_id: dict,
            generations: dict) -> tuple[str | None, str | None]:
    """(verified owner or None, the name the labels claim or None)."""
    label = labels.get(VOLUNTEER_LABEL)
    if not label:
        return None, None
    match = _USER_ID_LABEL.fullmatch(label)
    user = users_by_id.get(int(match.group(1))) if match else users_by_name.get(label)
    claimed_name = user.name if user is not None else label
    given = labels.get(SIGNATURE_LABEL, "")
    if not _may_volunteer(user) or user.name not in generations:
        return None, claimed_name
    expected = signature(settings, user.name, generations[user.name])
    if hmac.compare_digest(given.encode(), expected.encode()):
        return user.name, claimed_name
    return None, claimed_name


def _is_head(ray_node: dict) -> bool:
    return ((ray_node.get("Labels") or {}).get(ROLE_LABEL) == NodeRole.HEAD
            or "node:__internal_head__" in (ray_node.get("Resources") or {}))


def sync_registry(store: Store, settings: Settings, ray_nodes: list[dict], *,
                  refresh_credit: bool = True) -> None:
    """Bring the registry in line with ``ray.nodes()`` and the credit tables with the tasks.

    Verifies each node's signature (so a rotation takes effect here too), marks nodes
    online or offline, and records first and last seen. Nodes missing from ``ray_nodes``
    (the head restarted and forgot them) are offline. Without ``refresh_credit`` the
    caller brings the credit tables up to date itself (the dispatcher does, on a thread).
    """
    import ray

    now = time.time()
    seen: set[str] = set()
    with store.session() as session:
        users = session.execute(select(User)).scalars().all()
        users_by_name = {u.name: u for u in users}
        users_by_id = {u.id: u for u in users}
        generations = dict(session.execute(select(VolunteerKey.volunteer, VolunteerKey.generation)).all())
        known = {n.node_id: n for n in session.execute(select(Node)).scalars()}
        for ray_node in ray_nodes:
            node_id = ray_node["NodeID"]
            seen.add(node_id)
            alive = bool(ray_node.get("Alive"))
            labels = ray_node.get("Labels") or {}
            resources = ray_node.get("Resources") or {}
            node = known.get(node_id)
            if node is None:
                node = Node(node_id=node_id, first_seen=now, last_seen=now,
                            # Ray refuses a node whose Ray or Python minor version differs
                            # from the head's, so a node that joined runs these.
                            python_version=python_minor(), ray_version=ray.__version__)
                session.add(node)
                known[node_id] = node
            if alive:
                node.last_seen = now
                # A dead node's resources are reported empty; keep what it had.
                node.cpus = float(resources.get("CPU", 0.0))
                node.memory_bytes = float(resources.get("memory", 0.0))
            node.online = alive
            node.host = ray_node.get("NodeManagerAddress") or node.host or ""
            node.hostname = ray_node.get("NodeManagerHostname") or node.hostname or ""
            if _is_head(ray_node):
                node.role, node.claimed, node.volunteer = NodeRole.HEAD.value, False, None
                continue
            owner, node.label_volunteer = _verify(settings, labels, users_by_name, users_by_id,
                                                  generations)
            _claim(node, owner, now)
            if node.claimed and not node.trusted and node.first_seen == now:
                # A trusted machine that joined again is a new Ray node: it stays trusted.
                node.trusted = any(
                    other.trusted and other.volunteer == node.volunteer
                    and other.hostname == node.hostname and other.node_id != node_id
                    for other in known.values())
        for node in known.values():
            if node.node_id not in seen and node.online:
                node.online = False
                logger.info("node %s: gone from the cluster", short_id(node.node_id))
    if refresh_credit:
        credit.refresh(store)


def _claim(node: Node, owner: str | None, now: float) -> None:
    if node.revoked_at is not None:
        return  # a voided node stays unclaimed until it re-joins (as a new node)
    if owner is not None and node.volunteer in (None, owner):
        if not node.claimed:
            logger.info("node %s: claimed by volunteer %s", short_id(node.node_id), owner)
        node.role, node.volunteer, node.claimed = NodeRole.VOLUNTEER.value, owner, True
    elif node.volunteer is not None:
        # It verified once and no longer does: the signature was rotated or the account
        # disabled. Earlier tasks keep their credit; later ones earn nothing.
        node.claimed, node.revoked_at = False, now
        logger.warning("node %s: the signature of %s no longer verifies; it stops earning",
                       short_id(node.node_id), node.volunteer)
    else:
        if node.role != NodeRole.UNCLAIMED:
            node.role = NodeRole.UNCLAIMED.value
        node.claimed = False


def record_node_facts(store: Store, node_id: str, *, sandbox: str | None = None,
                      python_version: str | None = None, ray_version: str | None = None) -> None:
    """Record what a probe measured on a node (e.g. ``executor.sandbox_status()`` run there)."""
    values = {k: v for k, v in (("sandbox", sandbox), ("python_version", python_version),
                                ("ray_version", ray_version)) if v is not None}
    if values:
        with store.session() as session:
            session.execute(update(Node).where(Node.node_id == node_id).values(**values))


def set_trusted(store: Store, node_id: str, trusted: bool, actor: User | None | str = OPERATOR) -> None:
    """Mark a volunteer's node as one of the operator's own machines (or no longer).

    A trusted node's results are accepted without replication, as the head's are, and earn
    no credit. Only an admin (or the operator at the CLI) may do this. When the machine
    joins again (a new Ray node), it stays trusted: same volunteer, same host name.
    """
    if actor != OPERATOR and not is_admin(actor):
        raise NotFound(f"no node {node_id!r}")
    with store.session() as session:
        node = session.get(Node, node_id) or _by_prefix(session, node_id)
        if node is None:
            raise NotFound(f"no node {node_id!r}")
        if node.role == NodeRole.HEAD:
            raise InvalidRequest("the head is always trusted")
        node.trusted = trusted
        logger.info("node %s: %s by an admin", short_id(node.node_id),
                    "trusted" if trusted else "no longer trusted")


def _by_prefix(session, prefix: str) -> Node | None:
    """A node named by the start of its id, as lists show it, if exactly one matches."""
    if len(prefix) < 6:
        return None
    found = session.execute(select(Node).where(Node.node_id.startswith(prefix)).limit(2)).scalars().all()
    return found[0] if len(found) == 1 else None


# -- listings ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    """One row of ``nodes --json``, the Join page and the admin's node list."""

    node_id: str
    volunteer: str | None       # the verified owner while the signature verifies, else None
    claimed: bool
    attribution: str            # NodeRole.HEAD, the volunteer's name, or NodeRole.UNCLAIMED
    label_volunteer: str | None  # the name the labels claim (verified or not)
    status: NodeStatus          # online or offline
    host: str
    hostname: str
    cpus: float
    memory_bytes: float
    python_version: str | None
    ray_version: str | None
    sandbox: str
    first_seen: str
    last_seen: str
    tasks_completed: int
    last_activity: str | None
    health: NodeHealth = NodeHealth.CHECKING  # checking, ready, quarantined, removed
    health_reason: str | None = None  # why it gets no work, in words a volunteer can act on
    quarantined_until: str | None = None
    trusted: bool = False            # the head, or an operator's machine an admin trusts

    @property
    def volunteer_owned(self) -> bool:
        """Whether a volunteer answers for it (not the head, not unclaimed)."""
        return self.attribution not in (NodeRole.HEAD, NodeRole.UNCLAIMED)

    def to_dict(self) -> dict:
        return asdict(self)


def attribution_of(node: Node) -> str:
    """Whom a registry row's node is attributed to, as lists show it: the head, its verified
    volunteer's name, or unclaimed."""
    if node.role == NodeRole.HEAD:
        return NodeRole.HEAD.value
    return node.volunteer if node.claimed else NodeRole.UNCLAIMED.value


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="seconds")


def list_nodes(store: Store, actor: User | None | str = OPERATOR) -> list[NodeView]:
    """Nodes in the registry: all of them for an admin or the operator, only their own for a
    volunteer. Online first, then most recently seen. Anyone else, anonymous (``None``)
    included, is refused."""
    with store.session() as session:
        query = select(Node).order_by(Node.online.desc(), Node.last_seen.desc(), Node.node_id)
        if actor != OPERATOR:
            require_role(actor, Role.VOLUNTEER)
            if not is_admin(actor):
                query = query.where(Node.volunteer == actor.name)
        nodes = session.execute(query).scalars().all()
    activity = credit.node_activity(store, [n.node_id for n in nodes])
    views = []
    for n in nodes:
        completed, last = activity.get(n.node_id, (0, None))
        attribution = attribution_of(n)
        views.append(NodeView(
            node_id=n.node_id, volunteer=n.volunteer if n.claimed else None, claimed=n.claimed,
            attribution=attribution, label_volunteer=n.label_volunteer,
            status=NodeStatus.ONLINE if n.online else NodeStatus.OFFLINE, host=n.host, hostname=n.hostname,
            cpus=n.cpus, memory_bytes=n.memory_bytes, python_version=n.python_version,
            ray_version=n.ray_version, sandbox=n.sandbox, first_seen=_iso(n.first_seen),
            last_seen=_iso(n.last_seen), tasks_completed=completed, last_activity=_iso(last),
            health=NodeHealth(n.health), health_reason=n.health_reason,
            quarantined_until=_iso(n.quarantined_until),
            trusted=n.role == NodeRole.HEAD or n.trusted))
    return views
