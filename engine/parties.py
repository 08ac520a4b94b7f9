"""Parties: who answers for a node's results.

A node belongs to the head (the operator's machine, and nodes an admin trusts), to a
volunteer (by name, once its signature verifies), or to nobody (unclaimed). These names
are stored in the registry and in the replicas table, and read by credit, verification and
the portal; they live here so that none of those modules imports another for them.
"""

HEAD = "head"
VOLUNTEER = "volunteer"
UNCLAIMED = "unclaimed"
# Who answers for results of the head and of nodes an admin trusts (the operator's own
# machines): one party, stored as "head" in the replicas table.
TRUSTED_PARTY = HEAD
