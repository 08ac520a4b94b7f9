"""The cluster layer: several Ray nodes on this machine, each joined with ``ray start`` by
the exact text of its join command, from the volunteers' clean venv
(``support.volunteer_env``), as volunteers' machines join (``volunteer_cluster.py``). Each
test module starts the cluster it needs; there are no fixtures here beyond
``tests/conftest.py``'s.
"""
