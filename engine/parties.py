"""Parties: who answers for a node's results.

A node's role (``engine.status.NodeRole``) says whom it belongs to: the head, a volunteer
(by name, once its signature verifies), or nobody (unclaimed). The party of a result is
the volunteer's name, or ``TRUSTED_PARTY`` for the head and the nodes an admin trusts (the
operator's own machines). Party names are stored in the replicas table and read by
credit, verification and the portal; they live here so that none of those modules
imports another for them.
"""

from engine.status import NodeRole

# Who answers for results of the head and of nodes an admin trusts: one party, stored as
# "head" in the replicas table.
TRUSTED_PARTY = NodeRole.HEAD.value
