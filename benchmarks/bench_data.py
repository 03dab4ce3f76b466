"""Data preparation: MovieLens-1M first and cached runs; synthetic at 10k/100k/1M users.

Run:  make bench-data      (writes bench-results/data.json)

Every measurement runs in its own process so that peak memory (ru_maxrss) is that run's alone.
Expect peak memory to stay roughly flat as users grow: preparation is chunked by users and
everything lands in memory-mapped Arrow shards.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, machine, write_results  # noqa: E402

from foundv2.bench.report import write_block  # noqa: E402


def child(kind: str, n_users: int, cache: str, chunk_users: int) -> None:
    """Runs inside the measuring subprocess; prints one JSON line."""
    import time

    from common import peak_rss_mb

    from data_modules.datamodule import UserDataModule

    if kind == "synthetic":
        dm = UserDataModule(dataset="synthetic", loader_args={"n_users": n_users, "seed": 0,
                                                               "chunk_users": chunk_users},
                            window_mode="day", text_encoder="hashing", cache_dir=cache, progress=False)
    else:
        dm = UserDataModule(dataset="movielens-1m", window_mode="events", window_size=8, text_encoder="minilm",
                            cache_dir=cache, progress=False)
    t0 = time.perf_counter()
    meta = dm.prepare_data()
    dm.setup()
    n = 0
    for b in dm.train_dataloader():  # one pass over a few batches proves the shards read back
        n += int(b["user_id"].shape[0])
        if n >= 512:
            break
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(), "users": meta["users"],
                      "events": meta["history_events"] + meta["future_events"]}))


def measure(kind: str, n_users: int, cache: str, chunk_users: int = 10_000) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--n-users", str(n_users), "--cache", cache,
           "--chunk-users", str(chunk_users)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def docs_block(figures: dict) -> str:
    """The preparation table of docs/benchmarks.md."""
    m = machine()
    lines = [f"`make bench-data` ({m['cores']} cores, torch {m['libraries']['torch']}): each run in its own process.", "",
             "| run | seconds | peak RSS |", "|---|---|---|",
             f"| MovieLens-1M, first run ({figures['ml1m_events'] / 1e6:.1f} M events, MiniLM encoding of its texts "
             f"included) | {figures['ml1m_prepare_s']:.1f} | {figures['ml1m_peak_rss_mb']:,.0f} MB |",
             f"| MovieLens-1M, second run (prepared cache reused) | {figures['ml1m_prepare_cached_s']:.1f} | |",
             f"| MovieLens-1M, prepared cache deleted, text cache kept | {figures['ml1m_prepare_text_cached_s']:.1f} | |"]
    for n, r in figures["synthetic"].items():
        lines.append(f"| synthetic, {int(n):,} users ({r['events'] / 1e6:.1f} M events, chunks of 10k users) | "
                     f"{r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child")
    ap.add_argument("--n-users", type=int, default=0)
    ap.add_argument("--cache")
    ap.add_argument("--chunk-users", type=int, default=10_000)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    a = ap.parse_args()
    if a.child:
        child(a.child, a.n_users, a.cache, a.chunk_users)
        return
    figures: dict = {"synthetic": {}}
    with tempfile.TemporaryDirectory(prefix="foundv2-bench-") as tmp:
        ml_cache = str(Path(tmp) / "ml")
        first = measure("movielens-1m", 0, ml_cache)
        cached = measure("movielens-1m", 0, ml_cache)
        for p in (Path(ml_cache) / "prepared").glob("*"):
            shutil.rmtree(p)  # keep only the text cache: the MiniLM encodings are reused
        text_cached = measure("movielens-1m", 0, ml_cache)
        figures.update({"ml1m_prepare_s": first["seconds"], "ml1m_prepare_cached_s": cached["seconds"],
                        "ml1m_prepare_text_cached_s": text_cached["seconds"],
                        "ml1m_peak_rss_mb": first["peak_rss_mb"], "ml1m_events": first["events"]})
        for n in [int(s) for s in a.sizes.split(",")]:
            r = measure("synthetic", n, str(Path(tmp) / f"syn{n}"))
            figures["synthetic"][str(n)] = {"seconds": r["seconds"], "peak_rss_mb": r["peak_rss_mb"],
                                            "events": r["events"], "users_per_s": n / r["seconds"]}
            shutil.rmtree(Path(tmp) / f"syn{n}", ignore_errors=True)
    write_results("data", figures, {"ml1m": "events windows of 8 moments, minilm", "synthetic":
                                    "day windows, hashing encoder, chunks of 10k users", "sizes": a.sizes})
    write_block(ROOT / "docs" / "benchmarks.md", "bench_data", "make bench-data", docs_block(figures))


if __name__ == "__main__":
    main()
