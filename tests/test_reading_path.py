"""The reading path: the code a reader follows beside the papers, in README's "Paper to code" order.

`python tests/test_reading_path.py` prints it with line counts. The test checks that every piece named here
still exists, that README lists each of them and quotes the total, so none of it goes stale silently. Counted: whole functions (decorators and docstrings included) and the marked sections.
"""
from __future__ import annotations

import ast
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (file, what): "*" the whole file; "from A to B" the lines from the one starting with A to the one before B;
# otherwise a top-level function or class name.
PATH = [
    ("trie.py", "*"),
    ("advantages.py", "from \"\"\"advantages.py to # ---- TreeRL"),
    ("rollout.py", "sampling_logprobs"),
    ("rollout.py", "entropy_of"),
    ("rollout.py", "fork_rule"),
    ("rollout.py", "sample"),
    ("train.py", "from # ALGO LOGIC 1 to # ALGO LOGIC 2"),
    ("train.py", "update"),
    ("train.py", "train_step"),
    ("train.py", "rollout_step"),
    ("train.py", "reward_step"),
    ("train.py", "advantage_step"),
    ("train.py", "compute_advantages"),
    ("train.py", "update_step"),
]


def lines_of(file: str, what: str) -> int:
    """How many lines `what` spans in `file` (see PATH); a KeyError if it is not there."""
    src = open(os.path.join(ROOT, file)).read().split("\n")
    if what == "*":
        return len(src) - (src[-1] == "")
    if what.startswith("from "):
        start, _, end = what[5:].partition(" to ")
        a = next(i for i, line in enumerate(src) if line.startswith(start))
        b = next(i for i, line in enumerate(src) if i > a + 1 and line.startswith(end))
        return b - a
    for node in ast.parse("\n".join(src)).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)) and node.name == what:
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return node.end_lineno - first + 1
    raise KeyError(f"{file}: no top-level {what}")


def test_every_piece_exists_and_readme_names_it_and_its_length():
    readme = open(os.path.join(ROOT, "README.md")).read()
    section = readme[readme.index("### The reading path"):]
    for file, what in PATH:
        assert lines_of(file, what) > 0
        name = file if what == "*" or what.startswith("from ") else f"{file[:-3]}.{what}"
        assert name in section, f"README's reading path does not name {name}"
    total = sum(lines_of(file, what) for file, what in PATH)
    assert f"({total:,} lines;" in section[:400], f"README's reading path should say ({total:,} lines; ...)"


def test_the_readmes_hold_no_unfilled_placeholder():
    """A measured number is written in by hand after its run; a `{NAME}` left behind means it never was."""
    import re
    for file in ("README.md", "benchmarks/README.md"):
        left = re.findall(r"\{[A-Z][A-Z_]+\}", open(os.path.join(ROOT, file)).read())
        assert not left, f"{file} still holds {left}"


if __name__ == "__main__":
    total = 0
    for file, what in PATH:
        n = lines_of(file, what)
        total += n
        print(f"{n:5d}  {file} {what}")
    print(f"{total:5d}  in all", file=sys.stdout)
