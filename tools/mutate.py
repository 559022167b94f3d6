#!/usr/bin/env python3
"""Mutation testing: does a module's test suite notice when the module is subtly wrong?

Usage (from the repository root, with the test dependencies installed)::

    .venv/bin/python tools/mutate.py syncstore/_ids.py tests/test_ids.py
    .venv/bin/python tools/mutate.py syncstore/wal.py tests/test_wal.py \\
        --function _vouching_frame --function 'WriteAheadLog._*'
    .venv/bin/python tools/mutate.py syncstore/_ids.py tests/test_ids.py --list
    .venv/bin/python tools/mutate.py syncstore/_ids.py tests/test_ids.py --run 17 --run 18 [--verbose]
    .venv/bin/python tools/mutate.py MODULE TESTS... -- -k 'not slow'   # extra pytest arguments

It parses MODULE with :mod:`ast`, makes *mutants* -- copies of the module with
one small change each -- and runs the named test files against each mutant.
A mutant the tests fail on (or that hangs past the per-mutant timeout) is
*killed*; one they pass on *survived*: either the tests miss a real fault of
that shape, or the change is equivalent (behaves identically) and the
survivor is explained.  The score is killed / all mutants.

Mutations (each one at a time, at every place it applies):

* comparisons: ``<`` <-> ``<=``, ``<`` -> ``>=`` (likewise the others),
  ``==`` <-> ``!=``, ``is`` <-> ``is not``, ``in`` <-> ``not in``
* arithmetic and bit operators: ``+`` <-> ``-``, ``*`` -> ``//``, ``//`` -> ``*``,
  ``%`` -> ``//``, ``<<`` <-> ``>>``, ``&`` <-> ``|``, ``^`` -> ``&``; an
  addition or subtraction dropping its right operand (``a + b`` -> ``a``)
* integer constants +1 and -1, ``True`` <-> ``False``, a bytes constant emptied
* ``and`` <-> ``or``, dropping one operand of ``and``/``or``, removing ``not``
  or a unary minus, negating a bare ``if``/``while`` condition
* slice bounds +1 and -1, ``min`` <-> ``max``
* ``return x`` -> ``return None``
* statement deletion (replaced by ``pass``): expression statements (calls),
  ``raise``, ``break``, ``continue``, augmented assignments, and assignments
  to attributes or items (object state)

Not mutated: docstrings, ``assert`` statements (import-time self-checks),
annotations, f-strings and other string constants (messages).

Isolation and determinism: the tracked source is never modified.  The
package, the directories of the test files and the project's config files
are copied to a temporary directory; each mutant is written into the copy
and pytest runs there in a subprocess (``python -m pytest -x``, so the copy
shadows the installed package; checked before the run), without bytecode
caches and with ``--hypothesis-seed=0`` and a fresh hypothesis database per
mutant, so a run's result does not depend on the previous one.  The copy is
removed at the end, also on Ctrl-C or SIGTERM.  A baseline run of the unmutated module
(round-tripped through ``ast.unparse`` like every mutant) must pass first;
its duration sets the per-mutant timeout (3x + 30 s, a hang guard, not a
measurement) unless ``--timeout`` is given.

Output: one line per mutant on stderr (with the first test that failed on it),
then the score and every survivor as ``path:line:col  before -> after
[operator]  #id``.  ``--json FILE`` writes the results; ``--run ID`` runs only
chosen mutants (to see which test kills a mutant, or that a new test does),
``--verbose`` shows pytest's output for each.
"""

from __future__ import annotations

import argparse
import ast
import copy
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

# --- mutation operators -----------------------------------------------------------------

_COMPARE = {
    ast.Lt: (ast.LtE, ast.GtE),
    ast.LtE: (ast.Lt, ast.Gt),
    ast.Gt: (ast.GtE, ast.LtE),
    ast.GtE: (ast.Gt, ast.Lt),
    ast.Eq: (ast.NotEq,),
    ast.NotEq: (ast.Eq,),
    ast.Is: (ast.IsNot,),
    ast.IsNot: (ast.Is,),
    ast.In: (ast.NotIn,),
    ast.NotIn: (ast.In,),
}
_BINOP = {
    ast.Add: (ast.Sub,),
    ast.Sub: (ast.Add,),
    ast.Mult: (ast.FloorDiv,),
    ast.Div: (ast.Mult,),
    ast.FloorDiv: (ast.Mult,),
    ast.Mod: (ast.FloorDiv,),
    ast.Pow: (ast.Mult,),
    ast.LShift: (ast.RShift,),
    ast.RShift: (ast.LShift,),
    ast.BitOr: (ast.BitAnd,),
    ast.BitAnd: (ast.BitOr,),
    ast.BitXor: (ast.BitAnd,),
}
_DELETABLE = (ast.Expr, ast.Raise, ast.Break, ast.Continue, ast.AugAssign)

Replace = Callable[[], ast.AST]


def _src(node: ast.AST) -> str:
    return ast.unparse(node)


def _is_docstring(node: ast.AST, parent: ast.AST | None) -> bool:
    return (
        isinstance(node, ast.Expr)
        and isinstance(node.value, ast.Constant)
        and isinstance(node.value.value, str)
        and isinstance(parent, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and parent.body
        and parent.body[0] is node
    )


def _plus(node: ast.expr, k: int) -> ast.expr:
    return ast.BinOp(copy.deepcopy(node), ast.Add() if k > 0 else ast.Sub(), ast.Constant(abs(k)))


def mutations_of(node: ast.AST, parent: ast.AST | None, field: str) -> list[tuple[str, str, Replace]]:
    """(operator, replacement source, build) for every mutant of ``node`` itself (not its children)."""
    out: list[tuple[str, str, Replace]] = []

    def add(operator: str, build: Replace) -> None:
        out.append((operator, _src(build()), build))

    if isinstance(node, ast.Compare):
        for i, op in enumerate(node.ops):
            for new in _COMPARE.get(type(op), ()):

                def build(i: int = i, new: type = new) -> ast.AST:
                    changed = copy.deepcopy(node)
                    changed.ops[i] = new()
                    return changed

                add("compare", build)
    elif isinstance(node, ast.BinOp):
        for new in _BINOP.get(type(node.op), ()):
            add("arithmetic", lambda new=new: ast.BinOp(copy.deepcopy(node.left), new(), copy.deepcopy(node.right)))
        if isinstance(node.op, (ast.Add, ast.Sub)) and not isinstance(node.left, (ast.Constant, ast.JoinedStr)):
            add("drop operand", lambda: copy.deepcopy(node.left))
    elif isinstance(node, ast.AugAssign):
        for new in _BINOP.get(type(node.op), ()):
            add("arithmetic", lambda new=new: ast.AugAssign(copy.deepcopy(node.target), new(), copy.deepcopy(node.value)))
    elif isinstance(node, ast.BoolOp):
        other = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        add("and/or", lambda: ast.BoolOp(other, copy.deepcopy(node.values)))
        for i in range(len(node.values)):
            rest = node.values[:i] + node.values[i + 1 :]

            def build(rest: list = rest) -> ast.AST:
                return copy.deepcopy(rest[0]) if len(rest) == 1 else ast.BoolOp(type(node.op)(), copy.deepcopy(rest))

            add("drop condition", build)
    elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub, ast.Invert)):
        add("remove unary", lambda: copy.deepcopy(node.operand))
    elif isinstance(node, ast.Constant) and field not in ("kind",):
        value = node.value
        if type(value) is bool:
            add("constant", lambda: ast.Constant(not value))
        elif type(value) is int:
            add("constant", lambda: ast.Constant(value + 1))
            add("constant", lambda: ast.Constant(value - 1))
        elif type(value) is bytes:
            add("constant", lambda: ast.Constant(b"" if value else b"\x01"))
    elif isinstance(node, ast.Slice):
        for bound in ("lower", "upper"):
            expr = getattr(node, bound)
            if expr is None or isinstance(expr, ast.Constant):
                continue  # constants are mutated as constants
            for k in (1, -1):

                def build(bound: str = bound, expr: ast.expr = expr, k: int = k) -> ast.AST:
                    changed = copy.deepcopy(node)
                    setattr(changed, bound, _plus(expr, k))
                    return changed

                add("slice bound", build)
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
        swapped = "max" if node.func.id == "min" else "min"

        def build() -> ast.AST:
            changed = copy.deepcopy(node)
            changed.func = ast.Name(swapped, ast.Load())
            return changed

        add("min/max", build)
    elif isinstance(node, ast.Return) and node.value is not None:
        if not (isinstance(node.value, ast.Constant) and node.value.value is None):
            add("return None", lambda: ast.Return(ast.Constant(None)))

    # Bare conditions (a name, call or attribute): negate them.
    if isinstance(node, (ast.If, ast.While, ast.IfExp)) and isinstance(node.test, (ast.Name, ast.Call, ast.Attribute, ast.Subscript)):

        def build() -> ast.AST:
            changed = copy.deepcopy(node)
            changed.test = ast.UnaryOp(ast.Not(), changed.test)
            return changed

        out.append(("negate condition", f"not {_src(node.test)}", build))

    # Statement deletion.
    deletable = isinstance(node, _DELETABLE) or (
        isinstance(node, ast.Assign) and all(isinstance(t, (ast.Attribute, ast.Subscript)) for t in node.targets)
    )
    if deletable and not _is_docstring(node, parent):
        out.append(("delete statement", "pass", lambda: ast.Pass()))
    return out


# --- walking the tree -----------------------------------------------------------------------

_SKIP_FIELDS = {"annotation", "returns", "type_comment", "decorator_list"}


def _walk(tree: ast.Module) -> Iterator[tuple[ast.AST, str, int | None, ast.AST, str]]:
    """(parent, field, index, node, qualified name of the enclosing function) in a fixed order."""

    def visit(node: ast.AST, scope: str) -> Iterator[tuple[ast.AST, str, int | None, ast.AST, str]]:
        for field, value in ast.iter_fields(node):
            if field in _SKIP_FIELDS:
                continue
            children = value if isinstance(value, list) else [value]
            for index, child in enumerate(children):
                if not isinstance(child, ast.AST):
                    continue
                if isinstance(child, (ast.Assert, ast.JoinedStr)) or _is_docstring(child, node):
                    continue
                inner = scope
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    inner = f"{scope}.{child.name}" if scope else child.name
                yield node, field, index if isinstance(value, list) else None, child, scope
                yield from visit(child, inner)

    yield from visit(tree, "")


@dataclass
class Mutant:
    id: int
    path: str
    line: int
    col: int
    scope: str
    operator: str
    before: str
    after: str
    status: str = "not run"  # killed | survived | timeout | not run
    seconds: float = 0.0
    killed_by: str = ""  # the first failing test, as pytest names it

    def where(self) -> str:
        return f"{self.path}:{self.line}:{self.col + 1}"

    def describe(self) -> str:
        before, after = self.before, self.after
        if len(before) > 90:
            before, after = before[:87] + "...", after[:87] + "..."
        return f"{self.where()}  {before}  ->  {after}  [{self.operator}]  #{self.id}"


def _in_scope(scope: str, line: int, functions: list[str], lines: list[tuple[int, int]]) -> bool:
    if functions and not any(
        fnmatch.fnmatchcase(scope, pattern) or fnmatch.fnmatchcase(scope, pattern + ".*") for pattern in functions
    ):
        return False
    return not lines or any(lo <= line <= hi for lo, hi in lines)


def generate(source: str, path: str, functions: list[str], lines: list[tuple[int, int]]) -> list[Mutant]:
    """Every mutant of ``source`` in scope, numbered in a fixed order."""
    tree = ast.parse(source)
    mutants: list[Mutant] = []
    for parent, field, _index, node, scope in _walk(tree):
        line = getattr(node, "lineno", None)
        if line is None or not _in_scope(scope, line, functions, lines):
            continue
        if "pragma: no mutate" in source.splitlines()[line - 1]:
            continue
        for operator, after, _build in mutations_of(node, parent, field):
            before = ast.get_source_segment(source, node) or _src(node)
            before = " ".join(before.split())
            mutants.append(Mutant(len(mutants), path, line, node.col_offset, scope, operator, before, " ".join(after.split())))
    return mutants


def mutated_source(source: str, mutant_id: int, functions: list[str], lines: list[tuple[int, int]]) -> str:
    """The module with mutant ``mutant_id`` applied (same numbering as :func:`generate`)."""
    tree = ast.parse(source)
    count = 0
    for parent, field, index, node, scope in _walk(tree):
        line = getattr(node, "lineno", None)
        if line is None or not _in_scope(scope, line, functions, lines):
            continue
        if "pragma: no mutate" in source.splitlines()[line - 1]:
            continue
        found = mutations_of(node, parent, field)
        if count + len(found) > mutant_id:
            new = found[mutant_id - count][2]()
            ast.copy_location(new, node)
            if index is None:
                setattr(parent, field, new)
            else:
                getattr(parent, field)[index] = new
            return ast.unparse(ast.fix_missing_locations(tree))
        count += len(found)
    raise IndexError(f"no mutant #{mutant_id}")


# --- running ------------------------------------------------------------------------------


class Sandbox:
    """A temporary copy of the project in which mutants are written and tested."""

    def __init__(self, root: str, module: str, tests: list[str]) -> None:
        self.dir = tempfile.mkdtemp(prefix="syncstore-mutate-")
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis", ".pytest_cache")
        tops = {module.split(os.sep)[0]} | {t.split(os.sep)[0] for t in tests if os.sep in t}
        for top in sorted(tops):
            shutil.copytree(os.path.join(root, top), os.path.join(self.dir, top), ignore=ignore)
        for name in ("setup.cfg", "pyproject.toml", "pytest.ini", "tox.ini", "conftest.py"):
            if os.path.isfile(os.path.join(root, name)):
                shutil.copy2(os.path.join(root, name), self.dir)
        self.target = os.path.join(self.dir, module)
        self.package = module.split(os.sep)[0]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # a stale .pyc of another mutant must never load
        env["PYTHONHASHSEED"] = "0"
        env.pop("PYTHONPATH", None)
        return env

    def check_shadowing(self) -> None:
        """The copy, not the installed package, must be what the tests import."""
        probe = subprocess.run(
            [sys.executable, "-c", f"import {self.package}; print({self.package}.__file__)"],
            cwd=self.dir, env=self.env(), capture_output=True, text=True, check=True,
        )
        found = os.path.realpath(probe.stdout.strip())
        if not found.startswith(os.path.realpath(self.dir) + os.sep):
            raise SystemExit(f"mutate: the tests would import {found}, not the sandbox copy; aborting")

    def write(self, source: str) -> None:
        shutil.rmtree(os.path.join(self.dir, ".hypothesis"), ignore_errors=True)
        with open(self.target, "w", encoding="utf-8") as f:
            f.write(source)

    def run(self, command: list[str], timeout: float | None, show: bool) -> tuple[str, float, str]:
        """('passed' | 'failed' | 'timeout', seconds, output)."""
        started = time.monotonic()
        proc = subprocess.Popen(
            command, cwd=self.dir, env=self.env(), start_new_session=True,
            stdout=None if show else subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        try:
            output, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            output, _ = proc.communicate()
            return "timeout", time.monotonic() - started, output or ""
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - started, output or ""

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _first_failure(output: str) -> str:
    """The node id of the first test pytest reports as failed (or erroring) in ``output``."""
    for line in output.splitlines():
        if line.startswith(("FAILED ", "ERROR ")):
            return line.split(" ", 1)[1].split(" - ", 1)[0]
    return ""


def _parse_lines(spec: str) -> tuple[int, int]:
    lo, _, hi = spec.partition("-")
    return int(lo), int(hi or lo)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    parser = argparse.ArgumentParser(
        prog="tools/mutate.py",
        description="Mutation testing of one module against its tests (see the module docstring).",
        epilog="example: tools/mutate.py syncstore/_ids.py tests/test_ids.py",
    )
    parser.add_argument("module", help="the module to mutate, e.g. syncstore/_ids.py")
    parser.add_argument("tests", nargs="+", help="test files (or file::test node ids) to run against each mutant")
    parser.add_argument("--function", action="append", default=[], metavar="NAME",
                        help="only mutate inside this function or class (qualified name, glob allowed; repeatable)")
    parser.add_argument("--lines", action="append", default=[], type=_parse_lines, metavar="A-B",
                        help="only mutate nodes starting on these lines (repeatable)")
    parser.add_argument("--timeout", type=float, help="seconds per mutant (default: 3 x baseline + 30)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--run", action="append", type=int, default=[], metavar="ID",
                        help="run only these mutants (repeatable)")
    parser.add_argument("--verbose", action="store_true", help="show the test output of every mutant")
    parser.add_argument("--show", action="append", type=int, default=[], metavar="ID",
                        help="print the mutated function of these mutants and exit (repeatable)")
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON")
    args = parser.parse_args(argv)

    root = os.getcwd()
    module = os.path.normpath(args.module)
    tests = [os.path.normpath(t.partition("::")[0]) + "".join(t.partition("::")[1:]) for t in args.tests]
    for path in (module, *(t.partition("::")[0] for t in tests)):
        if not os.path.exists(path) or os.path.isabs(path) or path.startswith(".."):
            parser.error(f"{path}: give paths relative to the repository root (run from there)")
    with open(module, encoding="utf-8") as f:
        source = f.read()
    mutants = generate(source, module, args.function, args.lines)
    if args.list:
        for m in mutants:
            print(m.describe())
        print(f"{len(mutants)} mutants", file=sys.stderr)
        return 0
    if args.show:
        for i in args.show:
            print(f"# {mutants[i].describe()}")
            print(mutated_source(source, i, args.function, args.lines))
        return 0
    chosen = [mutants[i] for i in args.run] if args.run else mutants
    if not chosen:
        print("no mutants in scope", file=sys.stderr)
        return 2

    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "--hypothesis-seed=0", *tests, *extra]
    if args.verbose:
        command = [c for c in command if c != "-q"] + ["-rf", "--tb=short"]
    # SIGTERM (a killed job) unwinds like Ctrl-C, so the sandbox is removed.
    signal.signal(signal.SIGTERM, lambda _signum, _frame: sys.exit(143))
    sandbox = Sandbox(root, module, tests)
    try:
        sandbox.check_shadowing()
        sandbox.write(ast.unparse(ast.parse(source)))
        print(f"baseline: {' '.join(command[1:])}", file=sys.stderr)
        outcome, seconds, output = sandbox.run(command, None, show=False)
        if outcome != "passed":
            print(output, file=sys.stderr)
            print("mutate: the tests fail on the unmutated module; fix that first", file=sys.stderr)
            return 2
        timeout = args.timeout or 3 * seconds + 30
        print(f"baseline passed in {seconds:.1f} s; {len(chosen)} mutants, timeout {timeout:.0f} s each", file=sys.stderr)
        for n, m in enumerate(chosen, 1):
            sandbox.write(mutated_source(source, m.id, args.function, args.lines))
            if args.verbose:
                print(f"\n=== mutant {m.describe()}", flush=True)
            outcome, m.seconds, output = sandbox.run(command, timeout, show=args.verbose)
            m.status = {"failed": "killed", "passed": "survived", "timeout": "timeout"}[outcome]
            m.killed_by = _first_failure(output) if outcome == "failed" else ""
            by = f"  <- {m.killed_by}" if m.killed_by else ""
            print(f"[{n}/{len(chosen)}] {m.status:8} {m.seconds:6.1f}s  {m.describe()}{by}", file=sys.stderr, flush=True)
    finally:
        sandbox.remove()

    killed = sum(m.status in ("killed", "timeout") for m in chosen)
    survivors = [m for m in chosen if m.status == "survived"]
    score = 100.0 * killed / len(chosen)
    print(f"\n{module}: {killed}/{len(chosen)} mutants killed ({score:.1f}%), "
          f"{sum(m.status == 'timeout' for m in chosen)} of them by timeout; {len(survivors)} survived")
    for m in survivors:
        print(f"  survived: {m.describe()}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"module": module, "tests": tests, "pytest_args": extra, "functions": args.function,
                       "killed": killed, "total": len(chosen), "score": round(score, 1),
                       "mutants": [asdict(m) for m in chosen]}, f, indent=1)
    return 0 if not survivors else 1


if __name__ == "__main__":
    sys.exit(main())
