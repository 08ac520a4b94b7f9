"""Checking an uploaded research script without running it.

The portal and the CLI never execute research code: this module only parses it with
``ast``. Execution happens on the nodes, through ``engine.node.executor``.
"""

from __future__ import annotations

import ast
import hashlib
from dataclasses import dataclass

from engine.errors import InvalidScript


@dataclass(frozen=True)
class Script:
    name: str
    source: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()


def check_script(name: str, data: bytes, *, max_bytes: int) -> Script:
    """Return the script if it parses and defines ``main(row)``; else raise ``InvalidScript``."""
    if len(data) > max_bytes:
        raise InvalidScript(f"{name}: the script is {len(data)} bytes, above the limit of {max_bytes}")
    try:
        source = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise InvalidScript(f"{name}, line {line}: not UTF-8 text (byte offset {exc.start})") from None
    try:
        tree = ast.parse(source, filename=name)
    except SyntaxError as exc:
        where = f"line {exc.lineno}" + (f", column {exc.offset}" if exc.offset else "")
        raise InvalidScript(f"{name}, {where}: SyntaxError: {exc.msg}") from None
    except ValueError as exc:  # e.g. a NUL byte in the source
        raise InvalidScript(f"{name}: {exc}") from None
    main = None
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "main":
            main = node
    if main is None:
        raise InvalidScript(f"{name}: no top-level function main(row) is defined")
    if isinstance(main, ast.AsyncFunctionDef):
        raise InvalidScript(f"{name}, line {main.lineno}: main must be a plain function, not async")
    args = main.args
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    required_keyword = [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is None]
    if required > 1 or (positional == 0 and args.vararg is None) or required_keyword:
        raise InvalidScript(
            f"{name}, line {main.lineno}: main must take exactly one positional argument "
            f"(the row), as in: def main(row):")
    return Script(name=name, source=source)
