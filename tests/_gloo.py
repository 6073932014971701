"""Two CPU processes joined as torchrun joins them (gloo), for the tests that check a sharded run gives the
one-process result."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EVALUATE = "import sys; from walt.metrics import evaluate_main; sys.exit(evaluate_main(sys.argv[1:]))"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment of a subprocess that imports this checkout's walt, one thread per process (two processes
    share the machine's cores)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **extra}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_two_processes(code: str, args: Sequence[str], timeout: float = 600) -> list[str]:
    """Runs ``python -c code *args`` as rank 0 and 1 of a 2-process gloo group; asserts both exit with 0 and
    returns their logs."""
    env = subprocess_env(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, *args],
            env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(2)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    return logs
