"""Shared test helpers: run the real CLI in a subprocess, read stage outputs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """``python -m foundv2 ...`` from the repo root; fails the test with the output on error."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "foundv2", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout, env=env)
    if res.returncode != 0:
        raise AssertionError(f"foundv2 {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res
