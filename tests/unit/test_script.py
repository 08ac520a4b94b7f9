"""Script checks use ast only: they never run the script."""

import pytest

from engine.errors import InvalidScript
from engine.script import check_script


def check(source: str):
    return check_script("s.py", source.encode(), max_bytes=10_000)


def test_accepts_main_with_one_argument():
    assert check("import os\n\ndef main(row):\n    return row\n").source.startswith("import os")
    check("def main(row, scale=2):\n    return row\n")
    check("def main(*args):\n    return args\n")


def test_never_executes_the_script(tmp_path):
    marker = tmp_path / "ran"
    check(f"open({str(marker)!r}, 'w').write('x')\ndef main(row):\n    return row\n")
    assert not marker.exists()


@pytest.mark.parametrize("source, expected", [
    ("def main(row):\n    return (\n", "s.py, line 2"),
    ("def helper(row):\n    return row\n", "s.py: no top-level function main(row) is defined"),
    ("class A:\n    def main(self, row):\n        pass\n", "no top-level function main(row)"),
    ("def main(row, other):\n    return row\n", "s.py, line 1: main must take exactly one positional argument"),
    ("def main():\n    return 1\n", "main must take exactly one positional argument"),
    ("def main(row, *, key):\n    return row\n", "main must take exactly one positional argument"),
    ("async def main(row):\n    return row\n", "main must be a plain function"),
])
def test_rejects_with_a_specific_message(source, expected):
    with pytest.raises(InvalidScript) as caught:
        check(source)
    assert expected in str(caught.value)


def test_syntax_error_names_the_line():
    with pytest.raises(InvalidScript, match=r"s.py, line 3, column \d+: SyntaxError"):
        check("def main(row):\n    x = 1\n    return x +* 2\n")


def test_size_limit_and_encoding():
    with pytest.raises(InvalidScript, match="above the limit"):
        check_script("s.py", b"#" * 100, max_bytes=10)
    with pytest.raises(InvalidScript, match="line 2: not UTF-8"):
        check_script("s.py", b"def main(row):\n    return '\xff'\n", max_bytes=100)
