"""tools/mutate.py: the mutants it makes, and a whole run on a toy project."""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import sys

import pytest

_TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "mutate.py")
_spec = importlib.util.spec_from_file_location("mutate_tool", _TOOL)
mutate = importlib.util.module_from_spec(_spec)
sys.modules["mutate_tool"] = mutate  # dataclasses look their module up there
_spec.loader.exec_module(mutate)

SOURCE = '''"""Docstring: not mutated."""
LIMIT = 10
assert LIMIT > 0  # import-time self-check: not mutated


def clamp(x: int, flag: bool = True) -> int:
    """Not mutated either."""
    if x > LIMIT and flag:
        return LIMIT
    log(x)
    return min(x, data[1:n])
'''


def test_mutants_of_each_kind_apply_one_change_at_a_time():
    mutants = mutate.generate(SOURCE, "m.py", [], [])
    described = {(m.line, m.operator, m.before, m.after) for m in mutants}
    expected = {
        (2, "constant", "10", "11"),
        (2, "constant", "10", "9"),
        (6, "constant", "True", "False"),
        (8, "compare", "x > LIMIT", "x >= LIMIT"),
        (8, "compare", "x > LIMIT", "x <= LIMIT"),
        (8, "and/or", "x > LIMIT and flag", "x > LIMIT or flag"),
        (8, "drop condition", "x > LIMIT and flag", "flag"),
        (8, "drop condition", "x > LIMIT and flag", "x > LIMIT"),
        (9, "return None", "return LIMIT", "return None"),
        (10, "delete statement", "log(x)", "pass"),
        (11, "min/max", "min(x, data[1:n])", "max(x, data[1:n])"),
        (11, "constant", "1", "2"),
        (11, "slice bound", "1:n", "1:n + 1"),
        (11, "slice bound", "1:n", "1:n - 1"),
    }
    assert expected <= described, expected - described
    assert not [m for m in mutants if m.line in (1, 3, 7)], "docstrings and asserts are not mutated"
    assert [m.id for m in mutants] == list(range(len(mutants)))
    original = ast.dump(ast.parse(SOURCE))
    for m in mutants:
        changed = mutate.mutated_source(SOURCE, m.id, [], [])
        assert ast.dump(ast.parse(changed)) != original, m.describe()
        assert m.after.split()[0] in changed or m.after == "pass", m.describe()


def test_scope_options_select_functions_and_lines():
    only_clamp = mutate.generate(SOURCE, "m.py", ["clamp"], [])
    assert only_clamp and {m.scope for m in only_clamp} == {"clamp"}
    assert all(m.line >= 6 for m in only_clamp)
    assert {m.line for m in mutate.generate(SOURCE, "m.py", [], [(8, 9)])} == {8, 9}


def test_a_run_reports_survivors_and_leaves_the_source_untouched(tmp_path, monkeypatch, capsys):
    """A toy project whose test misses one mutant: the score, the survivor, and the module
    file byte-identical afterwards."""
    (tmp_path / "toy").mkdir()
    module = "def f(x):\n    return x + 1\n"
    (tmp_path / "toy" / "__init__.py").write_text("")
    (tmp_path / "toy" / "mod.py").write_text(module)
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text("from toy.mod import f\n\n\ndef test_f():\n    assert f(0) >= 1\n")
    monkeypatch.chdir(tmp_path)
    report = tmp_path / "report.json"
    status = mutate.main(["toy/mod.py", "tests/test_mod.py", "--json", str(report)])
    out = capsys.readouterr().out
    assert status == 1  # survivors
    assert "toy/mod.py: 4/5 mutants killed (80.0%)" in out
    assert "survived: toy/mod.py:2:16  1  ->  2  [constant]" in out
    assert (tmp_path / "toy" / "mod.py").read_text() == module
    result = json.loads(report.read_text())
    assert (result["killed"], result["total"]) == (4, 5)
    assert [m["status"] for m in result["mutants"]].count("survived") == 1


def test_tests_failing_on_the_unmutated_module_abort_the_run(tmp_path, monkeypatch, capsys):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "__init__.py").write_text("")
    (tmp_path / "toy" / "mod.py").write_text("def f(x):\n    return x\n")
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_mod.py").write_text("from toy.mod import f\n\n\ndef test_f():\n    assert f(0) == 1\n")
    monkeypatch.chdir(tmp_path)
    assert mutate.main(["toy/mod.py", "tests/test_mod.py"]) == 2
    assert "the tests fail on the unmutated module" in capsys.readouterr().err


@pytest.mark.parametrize("bad", ["/abs/path.py", "../outside.py", "missing.py"])
def test_paths_must_be_inside_the_repository(tmp_path, monkeypatch, bad):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit):
        mutate.main([bad, "tests/test_x.py"])
