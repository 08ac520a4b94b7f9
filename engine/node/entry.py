"""The functions Ray runs on a node: a batch, and the check of a node that just joined.

They are pickled by value (``engine.cluster.connect`` registers this module with Ray's
cloudpickle), and their arguments are plain values, so that Ray can start them on a
node even when that node cannot import ``engine``. They import the rest of the node
package only once running, and report a node that cannot load it as a failure of that
node, with its id and the reason in plain words: the dispatcher then quarantines the
node instead of failing the project's rows. Keep them small, standard library and Ray
only, and free of references to other modules' globals (those would be pickled by
reference, and need the import this is here to survive).

The failure kinds below are ``engine.node.result.FailureKind`` values; that module
cannot be imported where it matters most here. ``tests`` check the two agree.
"""

import pickle
import platform
import traceback

CODE_UNLOADABLE = "code-unloadable"
NODE_ERROR = "node-error"


def run_batch(source, filename, columns, payload, limits):
    """One batch of rows, on whichever node Ray chose. Returns an encoded ``BatchReport``."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    try:
        from engine.node import batch
    except Exception as exc:
        return _failed(node_id, CODE_UNLOADABLE, exc)
    try:
        return batch.run(source, filename, columns, payload, limits)
    except Exception as exc:  # not BaseException: a cancelled batch's interrupt goes through
        return _failed(node_id, NODE_ERROR, exc)


def check_node():
    """The check of a node that joined: loads the node code, tests the sandbox, runs a row."""
    import ray

    node_id = ray.get_runtime_context().get_node_id()
    try:
        from engine.node import batch
    except Exception as exc:
        return _failed(node_id, CODE_UNLOADABLE, exc)
    try:
        return batch.check()
    except Exception as exc:
        return _failed(node_id, NODE_ERROR, exc)


def _failed(node_id, kind, exc):
    import ray

    text = str(exc).strip().splitlines()
    cause = f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
    message = (f"this machine cannot load Constellation's code: {cause}"
               if kind == CODE_UNLOADABLE else f"Constellation's code failed on this machine: {cause}")
    facts = {"python_version": platform.python_version(), "ray_version": ray.__version__}
    return pickle.dumps((node_id, [], 0.0, facts, (kind, message, traceback.format_exc())),
                        protocol=pickle.HIGHEST_PROTOCOL)
