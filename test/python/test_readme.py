"""Every Python snippet in the README runs as written (from the repository root)."""

import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT

SNIPPETS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


@pytest.mark.parametrize("snippet", SNIPPETS, ids=[f"snippet{i}" for i in range(len(SNIPPETS))])
def test_readme_snippet_runs(snippet):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "python"))
    prelude = "import torch\n" if "import torch" not in snippet else ""
    result = subprocess.run(
        [sys.executable, "-c", prelude + snippet], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_readme_has_snippets():
    assert len(SNIPPETS) >= 2
