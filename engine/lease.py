"""The dispatcher's lease: one dispatcher at a time, and what it tells the portal.

The lease is one row in the store (``Store.acquire_lease``): a dispatcher takes it, renews
it three times per lease period, and gives it up when it stops; another cannot take it
while it is live, and one whose lease another took stops at once (``LeaseLost``). The
same row carries the cluster's state as the portal shows it (``Store.cluster_health``):
whether the Ray head answers, the CPUs the dispatcher fills, and the store's error
while it refuses results.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Callable

from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError

from engine.models import DispatcherLease
from engine.settings import Settings
from engine.store import Store

logger = logging.getLogger(__name__)


class LeaseLost(RuntimeError):
    """Another dispatcher took the lease: this one must stop at once."""


class Lease:
    """One dispatcher's hold on the lease, and its reports through the lease row."""

    def __init__(self, store: Store, settings: Settings, cpus: Callable[[], float]):
        self.store = store
        self.settings = settings
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._cpus = cpus  # the CPUs the dispatcher fills, for the portal
        self._renewed = 0.0

    def wait(self, should_stop: Callable[[], bool] = lambda: False) -> bool:
        """Take the lease, waiting while another dispatcher holds it; False if ``should_stop``."""
        while not self.store.acquire_lease(self.holder, self.settings.lease_seconds):
            if should_stop():
                return False
            time.sleep(0.5)
        logger.info("dispatcher %s: holds the lease", self.holder)
        return True

    def keep(self, now: float, status: str, message: str) -> None:
        """Renew the lease when a third of it has passed, reporting the cluster's state."""
        if now - self._renewed <= self.settings.lease_seconds / 3:
            return
        self._renewed = now
        try:
            if not self.store.acquire_lease(self.holder, self.settings.lease_seconds):
                raise LeaseLost(f"dispatcher {self.holder}: lost the lease")
            self.report(status, message)
        except SQLAlchemyError as exc:
            # The lease outlives a few failed renewals; the store may be briefly unwritable.
            logger.error("dispatcher %s: cannot renew the lease: %s", self.holder, exc)

    def report(self, status: str, message: str) -> None:
        """Tell the portal how the cluster is doing (through the lease row)."""
        with self.store.session() as session:
            session.execute(update(DispatcherLease).where(
                DispatcherLease.id == 1, DispatcherLease.holder == self.holder).values(
                cluster_status=status, cluster_message=message, cluster_cpus=float(self._cpus())))

    def release(self) -> None:
        self.store.release_lease(self.holder)
