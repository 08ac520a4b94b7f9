"""Join commands taken apart, and hand-written entries of ``ray.nodes()``' shape, for the
node registry's tests (``sync_registry`` takes ``ray.nodes()`` output) in several layers."""

from __future__ import annotations

import shlex

from ray._private.label_utils import parse_node_labels_string

from engine import confinement


def parse(command: str) -> tuple[dict, list[str]]:
    """Split a join command into its environment assignments and the ``ray start`` argv it
    runs (inside the node's confinement: ``bwrap ... -- sh -c SCRIPT $0 OPTIONS``)."""
    words = shlex.split(command)
    env = {}
    while "=" in words[0] and not words[0].startswith("-"):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    assert words[0] == "bwrap", words[:3]
    script = words.index(confinement.NODE_WATCH)
    assert words[script - 2:script] == ["sh", "-c"] and 'ray start "$@"' in words[script]
    return env, ["ray", "start", *words[script + 2:]]


def labels_of(command: str) -> dict:
    _, argv = parse(command)
    (value,) = [w.split("=", 1)[1] for w in argv if w.startswith("--labels=")]
    return parse_node_labels_string(value)  # Ray's own parser and validator


def ray_node(node_id: str, labels: dict | None = None, alive: bool = True, head: bool = False,
             cpus: float = 2.0) -> dict:
    """An entry shaped like one item of ``ray.nodes()``."""
    resources = {"CPU": cpus, "memory": 2e9, "node:192.0.2.9": 1.0} if alive else {}
    if head and alive:
        resources["node:__internal_head__"] = 1.0
    return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": "192.0.2.9",
            "NodeManagerHostname": "box", "Resources": resources,
            "Labels": {**(labels or {}), "ray.io/node-id": node_id}}
