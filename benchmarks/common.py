"""What every benchmark records beside its figures, and where it writes them."""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from data_modules.store import atomic_write_json

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench-results"
LIBS = ("torch", "lightning", "torchmetrics", "datasets", "transformers", "numpy", "pyarrow", "scikit-learn",
        "vector-quantize-pytorch")


def machine() -> dict:
    libs = {}
    for lib in LIBS:
        try:
            libs[lib] = version(lib)
        except PackageNotFoundError:
            libs[lib] = None
    return {"cores": os.cpu_count(), "python": sys.version.split()[0], "platform": platform.platform(),
            "libraries": libs}


def peak_rss_mb() -> float:
    """This process's peak resident memory (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def previous_figures(name: str, keys) -> dict:
    """The figures under ``keys`` (None: every key) from the last ``bench-results/<name>.json``
    (empty if none): what a partial run (one data set) keeps of the last full one."""
    path = RESULTS / f"{name}.json"
    if not path.exists():
        return {}
    return {k: v for k, v in json.loads(path.read_text()).items() if keys is None or k in keys}


def write_results(name: str, figures: dict, config: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "config": config, **figures}
    atomic_write_json(out, payload, default=float)
    print(json.dumps(figures, indent=1, default=float))
    print(f"wrote {out}")
    return out
