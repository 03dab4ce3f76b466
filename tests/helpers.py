"""Shared test helpers: run the real CLI in a subprocess, read stage outputs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port free now: the rendezvous of a hand-spawned gloo process group."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_cli(*args: str, timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m foundv2 ...`` from the repo root; with ``check``, fails the test with the
    output on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    res = subprocess.run([sys.executable, "-m", "foundv2", *args], capture_output=True, text=True, cwd=ROOT,
                         timeout=timeout, env=env)
    if check and res.returncode != 0:
        raise AssertionError(f"foundv2 {' '.join(args)} exited {res.returncode}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}")
    return res


def kill_when(argv: list[str], marker: Path, timeout: float, what: str, **popen) -> None:
    """Start ``argv`` from the repo root and SIGKILL it as soon as ``marker`` exists (the run has
    reached the point to kill it at); fails the test if that never happens within ``timeout``."""
    proc = subprocess.Popen(argv, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, **popen)
    try:
        deadline = time.time() + timeout
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), f"the {what} to kill did not start"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()


def empty_event_batch(b: int, e: int, w: int, text_dim: int, tabular: torch.Tensor) -> dict:
    """An event batch (data_modules/batch.py) of ``b`` users with ``e`` event slots and ``w``
    windows, all padding: tests fill in the events they need."""
    return {
        "ev_source": torch.zeros(b, e, dtype=torch.long),
        "ev_item": torch.zeros(b, e, dtype=torch.long),
        "ev_text": torch.full((b, e), -1, dtype=torch.long),
        "ev_text_emb": torch.zeros(b, e, text_dim),
        "ev_value": torch.zeros(b, e),
        "ev_time": torch.zeros(b, e, dtype=torch.long),
        "ev_category": torch.full((b, e), -1, dtype=torch.long),
        "ev_window": torch.zeros(b, e, dtype=torch.long),
        "ev_mask": torch.zeros(b, e, dtype=torch.bool),
        "win_key": torch.zeros(b, w, dtype=torch.long),
        "win_mask": torch.zeros(b, w, dtype=torch.bool),
        "tabular": tabular,
    }


@contextlib.contextmanager
def read_only(folder: Path):
    """Make ``folder`` unwritable, even for root (chattr +i) where chmod is not enough."""
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o555)
    immutable = False
    if os.access(folder, os.W_OK):  # root ignores modes
        immutable = subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode == 0
        if not immutable:
            folder.chmod(0o755)
            pytest.skip("cannot make a folder read-only here (root without chattr)")
    try:
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
