"""Runs the linters in check mode, the pinned ruff (pyproject.toml: lint and format) over the
Python and the pinned clang-format (.clang-format) over the C++ and CUDA sources, prints their
findings and writes RESULTS_DIR/lint.xml (one JUnit case per check) for scripts/test's summary.

usage: lint.py ROOT RESULTS_DIR"""

import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

CPP_SUFFIXES = (".cpp", ".h", ".cu", ".cuh")


def tracked_files(root, suffixes):
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=root,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [name for name in listed.splitlines() if name.endswith(suffixes)]


def run(name, command, root):
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    output = (result.stdout + result.stderr).strip()
    if result.returncode != 0:
        print(f"[lint] {name} found problems:\n{output[-6000:]}", file=sys.stderr)
    return name, result.returncode == 0, output


def main():
    root, results = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
    tools = pathlib.Path(sys.executable).parent
    checks = [
        run("ruff check", [sys.executable, "-m", "ruff", "check", "--no-cache", "."], root),
        run(
            "ruff format",
            [sys.executable, "-m", "ruff", "format", "--check", "--no-cache", "."],
            root,
        ),
        run(
            "clang-format",
            [
                str(tools / "clang-format"),
                "--dry-run",
                "--Werror",
                *tracked_files(root, CPP_SUFFIXES),
            ],
            root,
        ),
    ]
    suite = ET.Element("testsuite", name="lint", tests=str(len(checks)))
    for name, ok, output in checks:
        case = ET.SubElement(suite, "testcase", classname="lint", name=name)
        if not ok:
            ET.SubElement(case, "failure", message=f"{name} found problems").text = output
    results.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(suite).write(results / "lint.xml")
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
