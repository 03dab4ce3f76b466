"""How much does storing the append cache in float16 or int8 cost in appended codes, against float32?

On a finished `make bench-scale` size (its run folder: stage 1, the tokenizer, the tokens and the
next-day events file), this builds the append cache once per dtype (``foundv2 tokenize --append
--cache_dtype``), appends the same next day from each, and compares the appended windows' codes
with those of the float32 cache (equal to a full re-tokenize to float rounding). Prints, per dtype,
the cache's bytes per user, the seconds of the cache build and of the append, and the share of
appended slices whose whole code tuple equals float32's; writes them to
``bench-results/append_cache_dtype.json``.

    .venv/bin/python research/append_cache_dtype.py --size-dir runs/scale/synthetic/10000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

DTYPES = ("float32", "float16", "int8")


def run(cmd: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if rc:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {log}")
    return time.perf_counter() - t0


def codes_by_user(folder: Path) -> dict[int, np.ndarray]:
    from data_modules.store import read_stage_output

    ds, _ = read_stage_output(folder)
    users = np.asarray(ds.data.column("user_id").to_numpy(), np.int64)
    codes = ds.data.column("codes").to_pylist()
    return {int(u): np.asarray(c, np.int64) for u, c in zip(users, codes, strict=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-dir", required=True, help="a bench_scale size folder (run/, size.yaml, next-day.parquet)")
    ap.add_argument("--work", default="runs/append-dtype", help="where the versions go (gitignored)")
    a = ap.parse_args()
    size = Path(a.size_dir).resolve()
    work = Path(a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    from bench_scale import PIPELINE

    cfg = yaml.safe_load(PIPELINE.read_text())["pipeline"]
    data = [*cfg["data"], str(size / "size.yaml")]
    from foundv2.launch import best_or_last_checkpoint

    run_dir = size / "run"
    base = [sys.executable, "-m", "foundv2", "tokenize", "--append", *[x for d in data for x in ("--config", d)],
            "--tokenizer", str(run_dir / "tokenizer" / "export"),
            "--qformer", str(best_or_last_checkpoint(run_dir / "stage1"))]
    out: dict = {}
    for dtype in DTYPES:
        v0, v1 = work / f"{dtype}-v0", work / f"{dtype}-v1"
        for v in (v0, v1):
            shutil.rmtree(v, ignore_errors=True)
        build_s = run([*base, "--tokens", str(run_dir / "tokenizer" / "tokens"), "--output", str(v0),
                       "--cache_dtype", dtype], work / f"{dtype}-cache.log")
        append_s = run([*base, "--tokens", str(v0), "--events", str(size / "next-day.parquet"), "--output", str(v1)],
                       work / f"{dtype}-append.log")
        meta = json.loads((v0 / "append_cache" / "cache.json").read_text())
        out[dtype] = {"cache_bytes": meta["bytes"], "build_s": build_s, "append_s": append_s}
        print(dtype, out[dtype], flush=True)
    old = codes_by_user(run_dir / "tokenizer" / "tokens")
    ref = codes_by_user(work / "float32-v1")
    n_users = len(ref)
    for dtype in DTYPES:
        got = codes_by_user(work / f"{dtype}-v1")
        same = total = 0
        for u, codes in ref.items():
            new = codes[len(old[u]):]  # the appended slices
            total += len(new)
            same += int((got[u][len(old[u]):] == new).all(1).sum()) if len(new) else 0
        out[dtype].update(bytes_per_user=out[dtype]["cache_bytes"] / n_users, appended_slices=total,
                          same_as_float32=same / max(total, 1))
        print(f"{dtype}: {out[dtype]['bytes_per_user'] / 1024:.1f} KB per user, cache {out[dtype]['build_s']:.0f} s, "
              f"append {out[dtype]['append_s']:.0f} s, appended slices equal to float32's: "
              f"{out[dtype]['same_as_float32']:.2%} of {total:,}", flush=True)
    from common import write_results

    write_results("append_cache_dtype", {"dtypes": out, "users": n_users}, {"size_dir": str(size)})


if __name__ == "__main__":
    main()
