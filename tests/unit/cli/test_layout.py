"""Each command in its own module of job.cli, none importing the group back: the group imports the commands."""

import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = sorted(p.stem for p in (Path(__file__).resolve().parents[3] / "job" / "cli").glob("*.py")
                  if p.stem not in ("__init__", "__main__", "main"))


@pytest.mark.parametrize("module", COMMANDS)
def test_a_command_module_imports_no_other_command_and_not_the_group(module):
    probe = (f"import sys, job.cli.{module}; "
             "print(' '.join(sorted(m for m in sys.modules if m.startswith('job.cli.'))))")
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) <= {f"job.cli.{module}", "job.cli.common"}, loaded
