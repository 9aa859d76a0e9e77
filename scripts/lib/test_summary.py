"""Reads the JUnit XML that scripts/test's suites write and prints one summary line per suite
and a total; exits non-zero when anything failed or a suite wrote no results.

usage: test_summary.py RESULTS_DIR SUITE...
  SUITE is lint, pytest, or ctest:PREFIX:BUILD_DIR (ctest's own XML, plus the XML each
  GoogleTest binary writes to BUILD_DIR/test-results/NAME.xml)."""

import pathlib
import sys
import xml.etree.ElementTree as ET

# GoogleTest binaries, reported case by case under their own suite names.
GOOGLETEST = {"custom_bn_tests": "googletest", "custom_bn_simt_tests": "simt"}


def count_cases(root):
    """(passed, failed, skipped) of the <testcase> elements under root."""
    passed = failed = skipped = 0
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed += 1
        elif case.find("skipped") is not None or case.get("result") == "skipped":
            skipped += 1
        else:
            passed += 1
    return passed, failed, skipped


def ctest_suites(results, prefix, build_dir):
    """Suites of one ctest run: each GoogleTest binary case by case, the other entries as
    ctest-other. A binary that ctest saw fail with no failed case crashed or was stopped by a
    sanitizer: it counts as a failure."""
    junit = results / f"{prefix}ctest.xml"
    if not junit.exists():
        return {f"{prefix}ctest": (0, 1, 0)}
    suites = {}
    other = [0, 0, 0]
    for case in ET.parse(junit).getroot().iter("testcase"):
        name, status = case.get("name"), case.get("status")
        if name in GOOGLETEST:
            xml = pathlib.Path(build_dir) / "test-results" / f"{name}.xml"
            passed, failed, skipped = (
                count_cases(ET.parse(xml).getroot()) if xml.exists() else (0, 0, 0)
            )
            if status != "run" and failed == 0:
                failed = 1
            suites[prefix + GOOGLETEST[name]] = (passed, failed, skipped)
        elif status == "run":
            other[0] += 1
        elif status in ("disabled", "notrun") and case.find("skipped") is not None:
            other[2] += 1
        else:
            other[1] += 1
    suites[prefix + "ctest-other"] = tuple(other)
    return suites


def main():
    results = pathlib.Path(sys.argv[1])
    suites = {}
    for suite in sys.argv[2:]:
        if suite.startswith("ctest:"):
            _, prefix, build_dir = suite.split(":", 2)
            suites.update(ctest_suites(results, prefix, build_dir))
        else:
            xml = results / f"{suite}.xml"
            suites[suite] = count_cases(ET.parse(xml).getroot()) if xml.exists() else (0, 1, 0)
    totals = [sum(counts[i] for counts in suites.values()) for i in range(3)]
    print()
    for name, (passed, failed, skipped) in suites.items():
        print(f"{name + ':':<16} {passed} passed, {failed} failed, {skipped} skipped")
    print(f"total: {totals[0]} passed, {totals[1]} failed, {totals[2]} skipped")
    return 1 if totals[1] else 0


if __name__ == "__main__":
    sys.exit(main())
