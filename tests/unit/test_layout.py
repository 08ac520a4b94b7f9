"""The shape of the code: settings documented (docs/configuration.md), engine independent of the portal."""

import ast
import re
import subprocess
import sys

import pytest

from support import ROOT
from engine.settings import SETTINGS, Settings


def test_engine_never_imports_streamlit_or_portal():
    code = "import sys, engine, engine.cli, engine.scheduler, engine.node.executor; " \
           "bad = [m for m in sys.modules if m.split('.')[0] in ('streamlit', 'portal')]; " \
           "assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


# What a volunteer's machine does not have (it has Python, the pinned ray, bubblewrap).
_NOT_ON_VOLUNTEERS = ("sqlalchemy", "bcrypt", "pandas", "numpy", "streamlit",
                      "streamlit_authenticator", "dill", "pyarrow", "psycopg")

_BLOCKER = f"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {_NOT_ON_VOLUNTEERS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: not on volunteers)", name=name)
sys.meta_path.insert(0, Blocked())
"""


def test_the_node_side_imports_only_the_standard_library():
    """Everything in engine.node imports on a machine with nothing of ours but this package,
    and loads nothing beyond the standard library and engine.node itself (Ray is imported
    only inside the functions that run in a Ray worker, where it is there)."""
    code = _BLOCKER + """
before = set(sys.modules)
import engine.node, engine.node.entry, engine.node.batch, engine.node.executor
import engine.node.sandbox, engine.node.result
loaded = {m for m in sys.modules if m.startswith("engine")}
assert loaded <= {"engine", "engine.node"} | {m for m in loaded if m.startswith("engine.node.")}, loaded
outside = {m.split(".")[0] for m in set(sys.modules) - before} - set(sys.stdlib_module_names) - {"engine"}
assert not outside, outside
"""
    subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code],
                   cwd="/", check=True)


def test_the_blocker_really_blocks():
    """The test above would pass vacuously if blocking did nothing."""
    code = _BLOCKER + "import engine.accounts\n"
    run = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n" + code],
                         cwd="/", capture_output=True, text=True)
    assert run.returncode != 0 and "blocked: not on volunteers" in run.stderr


def test_entry_failure_kinds_match_the_result_shape():
    from engine.node import entry
    from engine.node.result import FailureKind

    assert FailureKind(entry.CODE_UNLOADABLE) is FailureKind.CODE_UNLOADABLE
    assert FailureKind(entry.NODE_ERROR) is FailureKind.NODE_ERROR


# The settings table of docs/configuration.md: `| `name` | `ENV` | default | meaning |`.
_SETTING_ROW = re.compile(r"\| `(\w+)` \| `(\w+)` \| (.+?) \| (.+) \|")


def _documented_settings() -> dict[str, tuple[str, str, str]]:
    text = (ROOT / "docs" / "configuration.md").read_text()
    rows = [_SETTING_ROW.fullmatch(line.strip()) for line in text.splitlines()]
    return {row[1]: (row[2], row[3], row[4]) for row in rows if row}


def test_every_setting_is_documented_in_the_configuration_page():
    """docs/configuration.md has one row per setting: its name, its environment variable and
    its default as the environment would give it ("empty" for an empty value), and a meaning.
    A row for a setting that no longer exists fails too."""
    documented = _documented_settings()
    for setting in SETTINGS:
        assert setting.name in documented, f"{setting.name} is missing from docs/configuration.md"
        env, default, meaning = documented[setting.name]
        assert env == setting.env, f"{setting.name}: docs/configuration.md says {env}, not {setting.env}"
        shown = default.strip()
        text = "" if shown == "empty" else shown.removeprefix("`").removesuffix("`")
        assert shown == "empty" or shown == f"`{text}`", f"{setting.name}: default {shown!r} is not `quoted`"
        assert setting.parse(text) == setting.default, \
            f"{setting.name}: docs/configuration.md gives the default {shown}, the code {setting.default!r}"
        assert meaning.strip(), f"{setting.name} has no meaning in docs/configuration.md"
    stale = set(documented) - {setting.name for setting in SETTINGS}
    assert not stale, f"docs/configuration.md documents settings that do not exist: {sorted(stale)}"


def test_environment_overrides_defaults():
    settings = Settings.from_env({"CONSTELLATION_BATCH_SIZE": "77", "CONSTELLATION_ROW_TIMEOUT": "2.5",
                                  "CONSTELLATION_DB_URL": "sqlite:////tmp/x.db",
                                  "CONSTELLATION_RAY_NUM_CPUS": ""})
    assert settings.batch_size == 77 and settings.row_timeout == 2.5
    assert settings.database_url == "sqlite:////tmp/x.db"
    assert settings.ray_num_cpus is None
    assert Settings.from_env({}).database_url.endswith("/data/constellation.db")


def test_no_catch_all_modules():
    names = {p.stem for p in (ROOT / "engine").glob("*.py")} | {p.stem for p in (ROOT / "portal").glob("*.py")}
    assert not names & {"utils", "common", "helpers", "misc"}


def engine_imports() -> dict[str, set[str]]:
    """Module -> the engine modules it imports, anywhere in it (a function-level import
    hides a cycle from Python, not from the reader)."""
    root = ROOT / "engine"
    modules = {"engine." + ".".join(p.relative_to(root).with_suffix("").parts): p
               for p in root.rglob("*.py")}
    modules = {name.removesuffix(".__init__"): path for name, path in modules.items()}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "engine":
                found |= {f"engine.{alias.name}" for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
        graph[name] = {m for m in found if m in modules and m not in (name, "engine")}
    return graph


def test_engine_modules_import_each_other_without_a_cycle():
    graph, done, path = engine_imports(), set(), []

    def visit(module: str) -> None:
        if module in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(module):] + [module]))
        if module in done:
            return
        path.append(module)
        for imported in sorted(graph[module]):
            visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    # The check itself sees a cycle, function-level imports included.
    graph["engine.parties"] = {"engine.placement"}
    done.clear()
    with pytest.raises(AssertionError, match="import cycle"):
        visit("engine.placement")


# -- one status vocabulary ----------------------------------------------------------------

def _status_words() -> set[str]:
    from engine import status

    vocabularies = (status.ProjectStatus, status.TaskStatus, status.Verification, status.Verdict,
                    status.NodeHealth, status.NodeStatus, status.NodeRole, status.ClusterStatus)
    return {member.value for vocabulary in vocabularies for member in vocabulary}


# Where a status word may still be typed as a string, and how often. Each entry says why;
# one more occurrence than counted here fails.
_WORDS_ALLOWED: dict[tuple[str, str], tuple[int, str]] = {
    # engine.status imports engine.models, so models cannot import the enums back (a cycle);
    # test_model_defaults_are_the_status_words checks that these are the enums' values.
    ("engine/models.py", "unverified"): (1, "Task.verification's default"),
    ("engine/models.py", "unclaimed"): (1, "Node.role's default"),
    ("engine/models.py", "checking"): (1, "Node.health's default"),
    ("engine/models.py", "'failed'"): (2, "the partial index's DDL (FAILED_ROW, checked below)"),
    # Words in sentences or names of things, not stored values.
    ("engine/cli.py", "volunteer"): (3, "argparse's name of the VOLUNTEER argument"),
    ("engine/cli.py", "trusted"): (1, "the trust-node message: 'trusted' / 'no longer trusted'"),
    ("engine/nodes.py", "trusted"): (1, "set_trusted's log message"),
    ("app_pages/admin.py", "trusted"): (1, "the Trust button's message"),
    ("app_pages/leaderboard.py", "volunteer"): (1, "the chart's x column, named by the frame"),
    ("engine/store.py", "trusted"): (1, "a column name in the schema-6 migration"),
    ("engine/models.py", "volunteer"): (1, "a column name in ix_nodes_volunteer"),
    ("engine/accounts.py", "volunteer"): (1, "accounts.Role, the accounts' own vocabulary"),
    ("app_pages/results.py", "failed"): (1, "part of a widget's key (failed rows or all)"),
}


def _keys(tree: ast.AST) -> set[int]:
    """Constants used as a key: of a dict display, or a subscript (column and field names)."""
    keys = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Dict):
            keys |= {id(k) for k in node.keys if k is not None}
        elif isinstance(node, ast.Subscript):
            keys.add(id(node.slice))
    return keys


def status_words_typed(words: set[str]) -> dict[tuple[str, str], list[int]]:
    """(file, word) -> lines where a status word is a string literal, or is quoted SQL-style
    ('failed') inside one, in engine/ (but engine/status.py), portal/ and app_pages/.

    engine/node/ is left out: the node side imports only the standard library, not
    engine.status, and its words are its own (the child's "ready" message)."""
    found: dict[tuple[str, str], list[int]] = {}
    files = [p for folder in ("engine", "portal", "app_pages") for p in (ROOT / folder).rglob("*.py")]
    for path in files:
        name = path.relative_to(ROOT).as_posix()
        if name == "engine/status.py" or name.startswith("engine/node/"):
            continue
        tree = ast.parse(path.read_text())
        keys = _keys(tree)
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Constant) and isinstance(node.value, str)) or id(node) in keys:
                continue
            hits = {node.value} & words
            hits |= {f"'{word}'" for word in words if f"'{word}'" in node.value}
            for word in hits:
                found.setdefault((name, word), []).append(node.lineno)
    return found


def test_no_status_word_is_typed_outside_the_status_module():
    """Statuses, verifications, node health, node roles and the cluster's state are enums in
    engine/status.py; everywhere else uses them, never their words as strings."""
    found = status_words_typed(_status_words())
    extra = {f"{name}:{lines} {word!r}" for (name, word), lines in found.items()
             if len(lines) > _WORDS_ALLOWED.get((name, word), (0, ""))[0]}
    assert not extra, "status words typed as strings (use the enums of engine/status.py): " \
                      + ", ".join(sorted(extra))


def test_the_status_word_check_sees_literals(tmp_path, monkeypatch):
    """The check above finds a word typed in a comparison and inside SQL, not in a dict key."""
    (tmp_path / "engine").mkdir()
    (tmp_path / "engine" / "page.py").write_text(
        "ok = {'failed': 1}['failed']\n"
        "if view.status == 'running': pass\n"
        "sql = \"SELECT 1 FROM tasks WHERE status = 'failed'\"\n")
    (tmp_path / "portal").mkdir()
    (tmp_path / "app_pages").mkdir()
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    assert status_words_typed(_status_words()) == {("engine/page.py", "running"): [2],
                                                   ("engine/page.py", "'failed'"): [3]}


def test_model_defaults_are_the_status_words():
    """The literals engine.models keeps (it cannot import engine.status) are the enums'."""
    from engine.models import Node, Task
    from engine.status import FAILED_ROW, NodeHealth, NodeRole, Verification

    assert Task.__table__.c.verification.default.arg == Verification.UNVERIFIED.value
    assert Node.__table__.c.role.default.arg == NodeRole.UNCLAIMED.value
    assert Node.__table__.c.health.default.arg == NodeHealth.CHECKING.value
    [index] = [i for i in Task.__table__.indexes if i.name == "ix_tasks_failed"]
    assert {str(index.dialect_options[d]["where"]) for d in ("sqlite", "postgresql")} == {FAILED_ROW}
