"""The README stays true: its quickstart is the example script, and running it does what the README says."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def readme_quickstart() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quickstart", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_quickstart_is_the_example_script():
    example = (ROOT / "examples" / "quickstart.py").read_text()
    body = example.split('"""', 2)[2].lstrip("\n")
    assert readme_quickstart() == body


def test_quickstart_runs_and_reverses_the_sequence():
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "-> output: [8, 12, 17, 4, 9, 5, 2]" in result.stdout
    loss = float(re.search(r"loss after 150 steps: ([0-9.]+)", result.stdout).group(1))
    assert loss < 0.2
