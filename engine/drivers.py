"""Ray drivers: which are Constellation's own, and what happens to any other.

Ray trusts every holder of the cluster token, and every volunteer holds it (it is in the
join command). Anyone of them can start a driver of their own (``ray.init(address=HEAD)``)
and send tasks anywhere in the cluster. Ray has no per-driver authorization, so the
engine watches Ray's list of drivers (its job table) instead:

- Constellation's own drivers are the dispatchers. Each registers its Ray job id in the
  store as soon as it connects (``register``); a rogue driver cannot, because the store is
  out of the cluster's reach.
- Any other driver is a rogue (``watch``). It is logged, and kept as an alert that admins
  see on the Admin page, naming the node it connected through and, when that node is a
  volunteer's, the volunteer. That node is drained (Ray schedules nothing more there and
  counts it dead) and marked removed: it never gets work again. The volunteer is disabled
  pending an admin's review, so their signature stops verifying and their other nodes
  are unclaimed too.

A driver is judged once it has had ``_GRACE_SECONDS`` to register, or once it has ended:
a rogue that ran for a second is still found. Detection is not prevention: the head's and
volunteers' Ray processes are confined so that what such a driver's tasks can reach is
of no value (see docs/security.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable, Iterable

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from engine.accounts import Role, require_role
from engine.models import Node, OwnDriver, SecurityAlert, User
from engine.nodes import short_id
from engine.status import NodeHealth, NodeRole
from engine.store import Store

logger = logging.getLogger(__name__)

_GRACE_SECONDS = 10.0
ROGUE_DRIVER = "rogue-driver"


@dataclass(frozen=True)
class Driver:
    """One row of Ray's job table: a driver that connected to the cluster."""

    job_id: str
    node_id: str       # the raylet it connected through: the machine it runs on
    ip: str
    pid: int
    started_at: float  # UNIX seconds
    ended: bool
    entrypoint: str


def read_drivers() -> list[Driver]:
    """Ray's job table, from the GCS (needs a connected driver: the dispatcher)."""
    from ray._private import state
    from ray.core.generated import gcs_pb2

    accessor = state.state._connect_and_get_accessor()
    drivers = []
    for raw in accessor.get_job_table(skip_submission_job_info_field=True,
                                      skip_is_running_tasks_field=True):
        entry = gcs_pb2.JobTableData.FromString(raw)
        drivers.append(Driver(job_id=entry.job_id.hex(), node_id=entry.driver_address.node_id.hex(),
                              ip=entry.driver_address.ip_address, pid=entry.driver_pid,
                              started_at=entry.start_time / 1000, ended=entry.is_dead,
                              entrypoint=entry.entrypoint))
    return drivers


def register(store: Store, job_id: str, holder: str) -> None:
    """Record one of Constellation's own drivers (a dispatcher that just connected)."""
    with store.session() as session:
        if session.get(OwnDriver, job_id) is None:
            session.add(OwnDriver(job_id=job_id, holder=holder, registered_at=time.time()))
    logger.info("drivers: %s is Ray job %s", holder, job_id)


@dataclass(frozen=True)
class Answer:
    alert: SecurityAlert
    removed_node: str | None  # the volunteer's node taken out of the cluster, if any


def watch(store: Store, drivers: Iterable[Driver], drain: Callable[[str], None],
          now: float | None = None) -> list[Answer]:
    """Find drivers that are not Constellation's and answer each once."""
    now = time.time() if now is None else now
    with store.session() as session:
        own = set(session.execute(select(OwnDriver.job_id)).scalars())
        known = set(session.execute(select(SecurityAlert.job_id)).scalars())
    raised = []
    for driver in drivers:
        if driver.job_id in own or driver.job_id in known:
            continue
        if not driver.ended and now - driver.started_at < _GRACE_SECONDS:
            continue  # one of ours may not have registered yet
        answer = _answer(store, driver, drain)
        if answer is not None:
            raised.append(answer)
    return raised


def answer_rogues(store: Store, drain: Callable[[str], None]) -> list[Answer]:
    """Read Ray's drivers and answer those that are not Constellation's (``watch``).

    The GCS may be restarting: then nothing is read, and the next call tries again.
    """
    try:
        found = read_drivers()
    except Exception as exc:
        logger.warning("drivers: cannot read Ray's drivers: %s", exc)
        return []
    return watch(store, found, drain)


def _answer(store: Store, driver: Driver, drain: Callable[[str], None]) -> Answer | None:
    with store.session() as session:
        node = session.get(Node, driver.node_id)
        volunteer = None if node is None or node.role == NodeRole.HEAD else (
            node.volunteer or node.label_volunteer)
        on_head = node is not None and node.role == NodeRole.HEAD
        actions = []
        if node is not None and not on_head:
            node.health, node.health_reason = (NodeHealth.REMOVED.value,
                                               f"a driver that is not Constellation's connected "
                                               f"through it (Ray job {driver.job_id})")
            actions.append("node removed from the cluster and refused work")
        if volunteer is not None:
            changed = session.execute(update(User).where(User.name == volunteer,
                                                         User.disabled.is_(False))
                                      .values(disabled=True)).rowcount
            if changed:
                actions.append(f"volunteer {volunteer} disabled pending review")
        where = ("the head's own machine" if on_head else
                 f"node {short_id(driver.node_id)}" if node is not None else
                 f"an unknown node {short_id(driver.node_id)}")
        detail = (f"Ray job {driver.job_id} from {where} ({driver.ip}, pid {driver.pid}): "
                  f"{driver.entrypoint[:300]}. " + ("; ".join(actions) + "." if actions else ""))
        alert = SecurityAlert(raised_at=time.time(), kind=ROGUE_DRIVER, job_id=driver.job_id,
                              node_id=driver.node_id, volunteer=volunteer, detail=detail)
        session.add(alert)
        try:
            session.flush()
        except IntegrityError:
            return None  # another dispatcher answered it a moment ago
    logger.warning("drivers: a driver that is not Constellation's: %s", detail)
    if node is None or on_head:
        # The head's own machine (its operator) or an unknown node: nothing to remove.
        return Answer(alert, None)
    try:
        drain(driver.node_id)
    except Exception as exc:  # the node may be gone already
        logger.warning("drivers: could not drain node %s: %s", short_id(driver.node_id), exc)
    return Answer(alert, driver.node_id)


def drain_with_ray(address: str) -> Callable[[str], None]:
    """A ``drain`` for ``watch``: ask the GCS to take the node out of the cluster."""

    def drain(node_id: str) -> None:
        import ray
        from ray.core.generated import autoscaler_pb2

        client = ray._raylet.GcsClient(address=address)
        accepted, why = client.drain_node(
            node_id, autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
            "a driver that is not Constellation's came from this node", 0)
        if not accepted:
            raise RuntimeError(why)
        logger.info("drivers: node %s drained", short_id(node_id))

    return drain


@dataclass(frozen=True)
class AlertView:
    raised_at: str
    kind: str
    job_id: str
    node_id: str
    volunteer: str | None
    detail: str

    def to_dict(self) -> dict:
        return asdict(self)


def alerts(store: Store, actor: User) -> list[AlertView]:
    """Security alerts, newest first (admins only)."""
    require_role(actor, Role.ADMIN)
    with store.session() as session:
        rows = session.execute(select(SecurityAlert).order_by(SecurityAlert.raised_at.desc())).scalars()
        return [AlertView(datetime.fromtimestamp(a.raised_at, timezone.utc).isoformat(timespec="seconds"),
                          a.kind, a.job_id, a.node_id, a.volunteer, a.detail) for a in rows]
