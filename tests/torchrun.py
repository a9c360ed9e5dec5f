"""Running a command in two CPU processes under ``torchrun``, as the tests of the trainer and the bench do."""

import os
import subprocess
import sys
from pathlib import Path


def torchrun(arguments: list[str], cwd: Path) -> str:
    """The standard output of ``torchrun --standalone --nproc_per_node=2 <arguments>`` run in ``cwd`` with one
    thread per process; a failure shows the processes' standard error."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *arguments]
    run = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, f"torchrun exited with {run.returncode}:\n{run.stderr}"
    return run.stdout
