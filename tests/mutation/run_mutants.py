"""Plant each bug of tests/mutation/mutants.py, one at a time, run the tests named for it, and
report which were caught: the check that the tests can fail, run on the whole list at once.

    python tests/mutation/run_mutants.py                 # every mutant (39 min here: a mutant of a
                                                         # Numba file recompiles it, Winograd 2-5 min)
    python tests/mutation/run_mutants.py relu maxpool    # the mutants whose name contains a word
    python tests/mutation/run_mutants.py --list          # names, bugs, tests; plants nothing
    python tests/mutation/run_mutants.py --check         # every edit matches exactly once

Nothing in the working tree is ever changed: the repository is copied into a temporary folder
(without .git and virtual environments), the bug is planted in the copy, the tests run there
(the copy's tinyunet is imported, not the installed one: checked before the first mutant), and
the copy's file is restored after each mutant, in a ``finally``, so Ctrl-C leaves nothing
behind either way; the copy is deleted at the end.

A mutant is *caught* when its tests fail (pytest exit status 1), *survived* when they pass.
Anything else (no test collected, a selection that names no test, a timeout) is reported as an
error, and counts as not caught: a misspelled selection must never pass for a catch. Before the
first mutant the same selections run on the unmutated copy (--no-baseline skips this), and
must pass: a test that fails anyway catches nothing.

Numba caches its compiled kernels beside each source file; the copy keeps the tree's cache
(file times preserved), and each mutant's recompiled cache of the planted file is replaced by
the original one again on restore, so only the mutated module is ever recompiled.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
from mutants import MUTANTS, Mutant  # noqa: E402

SKIPPED_IN_COPY = {".git", ".venv", "venv", "runs", ".hypothesis", ".pytest_cache", "build", "dist", "shared"}


def check_edits(mutants, root: Path) -> list[str]:
    """Every problem with the list: an edit whose old text occurs other than exactly once, a
    file that does not exist, a duplicate name. Empty when the list is sound."""
    problems, names = [], set()
    for mutant in mutants:
        if mutant.name in names:
            problems.append(f"{mutant.name}: the name is used twice")
        names.add(mutant.name)
        if not mutant.tests:
            problems.append(f"{mutant.name}: no tests named")
        texts = {}
        for file, old, new in mutant.edits:
            path = root / file
            if not path.is_file():
                problems.append(f"{mutant.name}: {file} does not exist")
                continue
            text = texts.setdefault(file, path.read_text())
            count = text.count(old)
            if count != 1:
                problems.append(f"{mutant.name}: {old!r} occurs {count} times in {file}, must be once")
            elif old == new:
                problems.append(f"{mutant.name}: an edit of {file} changes nothing")
            else:
                texts[file] = text.replace(old, new)
    return problems


def copy_tree(root: Path, target: Path) -> Path:
    """The repository copied into ``target``/tree, file times kept (Numba's cache checks them).
    setup.cfg maps kernels/ to the import name tinyunet.kernels; the copy gets a link
    tinyunet/kernels -> ../kernels so that a plain import from the copy finds it."""
    tree = target / "tree"
    shutil.copytree(root, tree, symlinks=True, ignore=lambda d, names: [n for n in names if n in SKIPPED_IN_COPY
                                                                          or n.endswith(".egg-info")])
    link = tree / "tinyunet" / "kernels"
    if not link.exists():
        link.symlink_to(Path("..") / "kernels", target_is_directory=True)
    return tree


def environment(tree: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(tree) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.pop("TINYUNET_KERNELS", None)
    env.setdefault("HYPOTHESIS_PROFILE", "ci")
    return env


def assert_copy_is_imported(tree: Path, python: str):
    """The editable install points at the real tree; the copy must win (PYTHONPATH comes first)."""
    code = "import tinyunet, tinyunet.kernels.cpu as c; print(tinyunet.__file__); print(c.__file__)"
    out = subprocess.run([python, "-c", code], cwd=tree, env=environment(tree), capture_output=True, text=True,
                         check=True).stdout.split()
    if not all(Path(p).resolve().is_relative_to(tree.resolve()) or Path(p).is_relative_to(tree) for p in out):
        raise SystemExit(f"run_mutants: the copy's tinyunet is not the one imported ({out}); refusing to run")


def numba_cache_files(path: Path) -> list[Path]:
    cache = path.parent / "__pycache__"
    if not cache.is_dir():
        return []
    return [p for p in cache.iterdir() if p.name.startswith(path.stem + ".") and p.suffix in (".nbi", ".nbc")]


def run_pytest(tree: Path, python: str, tests: list, timeout: float) -> tuple[str, float, str]:
    """(outcome, seconds, first failing test or the reason) for one selection in the copy."""
    command = [python, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "--no-header", *tests]
    start = time.monotonic()
    try:
        result = subprocess.run(command, cwd=tree, env=environment(tree), capture_output=True, text=True,
                                timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start, f"over {timeout:.0f} s"
    seconds = time.monotonic() - start
    output = result.stdout + result.stderr
    failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, flags=re.M)
    if result.returncode == 0:
        return "passed", seconds, ""
    if result.returncode == 1 and failed:
        return "failed", seconds, failed[0]
    tail = " | ".join(line for line in output.strip().splitlines()[-3:])
    return f"error (pytest exit {result.returncode})", seconds, tail[:300]


class Planted:
    """``with Planted(tree, mutant):`` the mutant's edits in the copy; on exit (always) the
    original bytes, file times and Numba cache files come back."""

    def __init__(self, tree: Path, mutant: Mutant, backup: Path):
        self.tree, self.mutant, self.backup = tree, mutant, backup
        self.saved = {}

    def __enter__(self):
        for file in dict.fromkeys(f for f, _, _ in self.mutant.edits):
            path = self.tree / file
            stat = path.stat()
            cache = self.backup / file.replace("/", "__")
            cache.mkdir(parents=True)
            for p in numba_cache_files(path):
                shutil.copy2(p, cache / p.name)
            self.saved[file] = (path.read_bytes(), stat.st_atime_ns, stat.st_mtime_ns, cache)
        for file, old, new in self.mutant.edits:
            path = self.tree / file
            path.write_text(path.read_text().replace(old, new, 1))
        return self

    def __exit__(self, *exc):
        for file, (data, atime, mtime, cache) in self.saved.items():
            path = self.tree / file
            path.write_bytes(data)
            os.utime(path, ns=(atime, mtime))
            for p in numba_cache_files(path):
                p.unlink()
            for p in cache.iterdir():
                shutil.copy2(p, path.parent / "__pycache__" / p.name)
            shutil.rmtree(cache)
        return False


def table(rows) -> str:
    lines = ["| mutant | file | result | s | caught by |", "|---|---|---|---:|---|"]
    for row in rows:
        lines.append(f"| {row['name']} | {row['file']} | {row['result']} | {row['seconds']:.0f} | {row['detail']} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("words", nargs="*", help="run only the mutants whose name contains one of these")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--check", action="store_true", help="check that every edit matches once, and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the run on the unmutated copy")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per mutant (default 600)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--python", default=sys.executable, help="the interpreter that runs pytest")
    args = parser.parse_args(argv)

    mutants = [m for m in MUTANTS if not args.words or any(w in m.name for w in args.words)]
    if not mutants:
        print(f"run_mutants: no mutant's name contains any of {args.words}", file=sys.stderr)
        return 2
    problems = check_edits(MUTANTS, ROOT)
    if problems:
        print("run_mutants: the list does not fit the code:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 2
    if args.list:
        for m in mutants:
            print(f"{m.name}\n    {m.bug}\n    in {', '.join(dict.fromkeys(f for f, _, _ in m.edits))}\n"
                  f"    tests: {' '.join(m.tests)}")
        return 0
    if args.check:
        print(f"run_mutants: {len(MUTANTS)} mutants, every edit matches exactly once")
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="tinyunet-mutants-") as scratch:
        scratch = Path(scratch)
        tree = copy_tree(ROOT, scratch)
        assert_copy_is_imported(tree, args.python)
        print(f"run_mutants: {len(mutants)} mutants, in a copy at {tree}", flush=True)
        if not args.no_baseline:
            selection = list(dict.fromkeys(t for m in mutants for t in m.tests))
            outcome, seconds, detail = run_pytest(tree, args.python, selection, args.timeout * 3)
            print(f"baseline (the {len(selection)} selections, unmutated): {outcome} in {seconds:.0f} s {detail}",
                  flush=True)
            if outcome != "passed":
                print("run_mutants: the tests fail without any mutant; fix that first", file=sys.stderr)
                return 2
        try:
            for number, mutant in enumerate(mutants, start=1):
                with Planted(tree, mutant, scratch / f"backup-{number}"):
                    outcome, seconds, detail = run_pytest(tree, args.python, mutant.tests, args.timeout)
                result = {"failed": "caught", "passed": "SURVIVED"}.get(outcome, outcome)
                rows.append(dict(name=mutant.name, bug=mutant.bug, file=", ".join(dict.fromkeys(
                    f for f, _, _ in mutant.edits)), result=result, seconds=seconds, detail=detail,
                    tests=mutant.tests))
                print(f"[{number}/{len(mutants)}] {result:8} {seconds:5.0f} s  {mutant.name}  {detail}", flush=True)
        except KeyboardInterrupt:
            print("\nrun_mutants: interrupted; the copy was restored and is being deleted", file=sys.stderr)
    caught = sum(r["result"] == "caught" for r in rows)
    print()
    print(table(rows))
    print(f"\nscore: {caught}/{len(rows)} caught"
          + (f" ({len(mutants) - len(rows)} not run)" if len(rows) < len(mutants) else ""))
    survivors = [r["name"] for r in rows if r["result"] != "caught"]
    if survivors:
        print("not caught: " + ", ".join(survivors))
    if args.json:
        args.json.write_text(json.dumps(dict(score=f"{caught}/{len(rows)}", rows=rows), indent=1))
    return 0 if rows and caught == len(rows) == len(mutants) else 1


if __name__ == "__main__":
    sys.exit(main())
