"""How time and memory grow with users: every step of the synthetic pipeline at 10k / 100k / 1M users,
own files at 1M users, and preparation on 1 and 2 ranks.

Run:  make bench-scale                     (writes bench-results/scale.json, bench-results/scale.png
                                            and docs/scale.md)
      python benchmarks/bench_scale.py --only files,ranks       (the data parts only)
      python benchmarks/bench_scale.py --sizes 10000 --only synthetic

Every step runs in its own process (the real CLI), started by a small measuring process of this
script (``--measure``), so its wall seconds and peak resident memory (the largest of the step's
processes, torchrun's workers included) are that step's alone:

- ``synthetic.<n>.<step>``: ``prepare`` (``foundv2 data``), then the steps of
  ``experiments/synthetic/scale-pipeline.yaml`` one at a time (each stage fits on the declared
  sample of training users and predicts every user), then ``append`` (one new day window for every
  user with room for it, ``foundv2 tokenize --append`` from the append cache built beforehand, ``append_cache``);
  each with ``seconds``, ``peak_rss_mb`` and ``users_per_s``; the predict steps add their predict
  throughput and FLOP utilisation (:func:`foundv2.throughput.predict_throughput` on a sample).
- ``files_1000000``: 1M synthetic users written as a folder of 12 Parquet files (every user's events
  spread over every file), prepared through the ``files`` loader.
- ``ranks.{1,2}``: a 200k-user folder prepared by one process and by two torchrun ranks;
  ``ranks.same_cache`` is true when both wrote identical shards.

The checks of the scale targets (peak RSS at 1M <= 1.5 x at 10k and <= 4 GB; seconds per user at 1M
<= 1.3 x at 100k) are computed and printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_results  # noqa: E402

PIPELINE = ROOT / "experiments" / "synthetic" / "scale-pipeline.yaml"
DATA = ROOT / "experiments" / "synthetic" / "data.yaml"
RANK_USERS = (200_000, 1_000_000)  # preparation on 1 and 2 ranks at these sizes
FILES_USERS = 1_000_000
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------- measuring
def measure_child(cmd: list[str]) -> None:
    """``--measure``: run ``cmd``; print its wall seconds, exit code and peak RSS (MB) as JSON."""
    t0 = time.perf_counter()
    rc = subprocess.call(cmd, env={**os.environ, **CHILD_ENV}, cwd=ROOT)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"seconds": time.perf_counter() - t0, "peak_rss_mb": peak, "rc": rc}))


def measure(cmd: list[str], log: Path) -> dict:
    """Run ``cmd`` in a fresh measuring process; its output goes to ``log``. Fails loudly."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        res = subprocess.run([sys.executable, __file__, "--measure", *cmd], stdout=subprocess.PIPE, stderr=f,
                             text=True, cwd=ROOT)
    lines = [line for line in res.stdout.splitlines() if line.startswith("{")]
    fig = json.loads(lines[-1]) if lines else {"rc": res.returncode}
    with open(log, "a") as f:
        f.write("\n".join(line for line in res.stdout.splitlines() if not line.startswith('{"seconds"')))
    if fig.get("rc") != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {fig.get('rc')}); see {log}:\n{log.read_text()[-3000:]}")
    return fig


def foundv2(*args: str) -> list[str]:
    return [sys.executable, "-m", "foundv2", *args]


def per_user(fig: dict, users: int) -> dict:
    return {"seconds": fig["seconds"], "peak_rss_mb": fig["peak_rss_mb"], "users_per_s": users / fig["seconds"]}


# ------------------------------------------------------------------------------------- data parts
def same_files(a: Path, b: Path) -> bool:
    """Two prepared folders hold the same bytes in every file but meta.json (timings, rank count)."""
    names = sorted(p.name for p in a.iterdir() if p.name != "meta.json")
    return names == sorted(p.name for p in b.iterdir() if p.name != "meta.json") and all(
        (a / n).read_bytes() == (b / n).read_bytes() for n in names)


def files_config(folder: Path, cache: Path, out: Path) -> Path:
    from data_modules.sources.synthetic import synthetic_spec

    spec = synthetic_spec()
    labels = [{"name": lab.name, "kind": lab.kind, "num_classes": lab.num_classes} for lab in spec.labels]
    out.write_text(yaml.safe_dump({"data": {
        "dataset": "files", "loader_args": {"events": str(folder / "events"), "users": str(folder / "users.parquet"),
                                            "sources": spec.sources, "tabular_inputs": spec.tabular_inputs,
                                            "labels": labels},
        "window_mode": "day", "text_encoder": "hashing", "cache_dir": str(cache), "progress": False}}))
    return out


def prepared_folder(cache: Path) -> Path:
    return next(p for p in (cache / "prepared").iterdir() if ".tmp-" not in p.name)


def write_files(n: int, folder: Path) -> float:
    from data_modules.sources.synthetic import write_synthetic_files

    if (folder / "users.parquet").exists():
        return 0.0
    shutil.rmtree(folder, ignore_errors=True)
    t0 = time.perf_counter()
    write_synthetic_files(folder, n)
    return time.perf_counter() - t0


def run_files(work: Path, n: int = FILES_USERS) -> dict:
    folder = work / f"files{n}"
    gen = write_files(n, folder)
    cache = work / f"files{n}-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cfg = files_config(folder, cache, work / f"files{n}.yaml")
    fig = measure(foundv2("data", "--config", str(cfg)), work / "logs" / f"files{n}.log")
    meta = json.loads((prepared_folder(cache) / "meta.json").read_text())
    shutil.rmtree(cache, ignore_errors=True)
    return {**per_user(fig, n), "events": meta["history_events"] + meta["future_events"], "buckets": meta["buckets"],
            "input_mb": sum(f.stat().st_size for f in folder.rglob("*.parquet")) / 2**20, "write_files_s": gen,
            "phase_seconds": meta["phase_seconds"]}


def run_ranks(work: Path, n: int) -> dict:
    """``foundv2 data`` on one process, then under ``torchrun --nproc_per_node 2``, on a folder of
    ``n`` users' Parquet files: wall time, the preparation inside it and its phases, and whether
    the two caches are the same bytes."""
    folder = work / f"files{n}"
    write_files(n, folder)
    out, caches = {}, {}
    for r in (1, 2):
        caches[r] = work / f"ranks{r}-cache"
        shutil.rmtree(caches[r], ignore_errors=True)
        cfg = files_config(folder, caches[r], work / f"ranks{r}.yaml")
        cmd = foundv2("data", "--config", str(cfg)) if r == 1 else [
            sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(r), "-m", "foundv2", "data",
            "--config", str(cfg)]
        fig = measure(cmd, work / "logs" / f"ranks{r}-{n}.log")
        meta = json.loads((prepared_folder(caches[r]) / "meta.json").read_text())
        out[str(r)] = {**per_user(fig, n), "prepare_seconds": meta["prepare_seconds"],
                       "phase_seconds": meta["phase_seconds"]}
    out["same_cache"] = same_files(prepared_folder(caches[1]), prepared_folder(caches[2]))
    out["ratio"] = out["2"]["seconds"] / out["1"]["seconds"]
    out["prepare_ratio"] = out["2"]["prepare_seconds"] / out["1"]["prepare_seconds"]
    for c in caches.values():
        shutil.rmtree(c, ignore_errors=True)
    return out


# ------------------------------------------------------------------------------------- the pipeline
#: the pipeline steps whose predict throughput is measured: step → its output's batch kind flag
PREDICT_STEPS = {"stage1": [], "tokenizer": ["features_dir"], "alignment": ["tokens_dir"]}
THROUGHPUT_USERS = 4096  # users predicted (whole batches) for the throughput and FLOP figures


def size_config(n: int, work: Path, cache: Path) -> Path:
    """The layer that sets the size (and where the prepared data go) over the pipeline's data YAMLs."""
    base = yaml.safe_load(DATA.read_text())["data"]["loader_args"]
    out = work / "size.yaml"
    out.write_text(yaml.safe_dump({"data": {"loader_args": {**base, "n_users": n}, "cache_dir": str(cache),
                                            "progress": False}}))
    return out


def pipeline_prefix(cfg: dict, k: int, data: list[str], run: Path, out: Path) -> Path:
    """The scale pipeline with its first ``k`` steps, the size's data layers and run folder: run
    after the first ``k - 1`` steps are complete, it runs step ``k`` alone."""
    out.write_text(yaml.safe_dump({"pipeline": {**cfg, "data": data, "run_dir": str(run), "steps": cfg["steps"][:k]}}))
    return out


def next_day_events(prepared: Path, out: Path, max_windows: int, per_user: int = 2, seed: int = 0) -> int:
    """A new day for every user with history and room for one more window (fewer than
    ``max_windows``, the stage-1 window table; a full user is re-tokenized, not appended): copies
    of ``per_user`` of the user's history events (same source, item, text, value, category) at the
    same hour one day after the data set's last day, as an events Parquet file for ``foundv2
    tokenize --append``; read and written one shard at a time. Returns the number of users."""
    import datasets
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = json.loads((prepared / "meta.json").read_text())
    spec = meta["spec"]
    texts = np.asarray(pa.ipc.open_stream(pa.memory_map(str(prepared / "texts.arrow"))).read_all()["text"]
                       .to_pylist() + [""], dtype=object)
    items = pa.ipc.open_stream(pa.memory_map(str(prepared / "items.arrow"))).read_all()
    raw_item = np.concatenate([[-1], np.asarray(items["item_id"])])
    sources = np.asarray(spec["sources"], dtype=object)
    cats = np.asarray(list(spec["categories"]) + [""], dtype=object)
    rng = np.random.default_rng(seed)
    writer, users = None, 0
    cols = ["user_id", "n_windows", "n_hist", "h_source", "h_item", "h_text", "h_value", "h_time", "h_category", "f_time"]
    try:
        for shard in meta["shards"]:
            t = datasets.Dataset.from_file(str(prepared / shard)).select_columns(cols).with_format("numpy")
            for start in range(0, len(t), 20_000):
                part = t[start:start + 20_000]
                n = np.asarray(part["n_hist"], np.int64)
                has = (n > 0) & (np.asarray(part["n_windows"], np.int64) < max_windows)
                off = np.concatenate([[0], np.cumsum(n)])[:-1]
                pick = (off[has, None] + (rng.random((int(has.sum()), per_user)) * n[has, None]).astype(np.int64))
                flat = {c: np.concatenate(part[c]) if len(part[c]) else np.zeros(0) for c in cols[3:9]}
                last = [max(int(h[-1]) if len(h) else 0, int(f[-1]) if len(f) else 0)
                        for h, f in zip(part["h_time"][has], part["f_time"][has], strict=True)]
                end_day = (max(last, default=0) // 86_400) + 1
                idx = pick.reshape(-1)
                ts = flat["h_time"][idx]
                iid = raw_item[flat["h_item"][idx].astype(np.int64)]
                table = pa.table({
                    "user_id": np.repeat(np.asarray(part["user_id"])[has], per_user),
                    "source": sources[flat["h_source"][idx].astype(np.int64)],
                    "timestamp": (max(end_day, meta["calendar"]["end_day"] + 1) * 86_400 + ts % 86_400).astype(np.int64),
                    "item_id": pa.array(iid, pa.int64(), mask=iid < 0),
                    "text": texts[flat["h_text"][idx].astype(np.int64)],
                    "value": flat["h_value"][idx].astype(np.float32),
                    "category": cats[flat["h_category"][idx].astype(np.int64)],
                })
                writer = writer or pq.ParquetWriter(out, table.schema)
                writer.write_table(table)
                users += int(has.sum())
    finally:
        if writer is not None:
            writer.close()
    return users


def throughput(args: list[str], ckpt: Path | None, log: Path) -> dict:
    """Predict throughput and FLOP utilisation of a stage on the first users (its own process)."""
    code = ("import json, sys; from foundv2.throughput import from_config, predict_throughput; "
            "stage, dm = from_config(sys.argv[2:]); "
            f"r = predict_throughput(stage, dm, ckpt_path=sys.argv[1] or None, max_users={THROUGHPUT_USERS}); "
            "print('THROUGHPUT ' + json.dumps({k: v for k, v in r.items()}, default=float))")
    res = subprocess.run([sys.executable, "-c", code, str(ckpt or ""), *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, **CHILD_ENV})
    log.write_text(res.stdout + res.stderr)
    line = next((x for x in res.stdout.splitlines() if x.startswith("THROUGHPUT ")), None)
    if line is None:
        raise SystemExit(f"throughput of {args} failed; see {log}:\n{res.stderr[-3000:]}")
    return json.loads(line[len("THROUGHPUT "):])


def run_synthetic(n: int, root: Path, resume: bool = True, cache_dtype: str = "float16") -> dict:
    """Every step at ``n`` users (see the module docstring), in ``root / str(n)``; with ``resume``, the
    steps already measured there (``figures.json``) are kept and the run goes on from the next one."""
    from foundv2.launch import best_or_last_checkpoint

    work = root / str(n)
    done = work / "figures.json"  # the steps measured so far: a killed run goes on from the next one
    out: dict = json.loads(done.read_text()) if resume and done.exists() else {}
    if not out:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)

    def keep(name: str, fig: dict) -> None:
        out[name] = fig
        done.write_text(json.dumps(out, indent=1))

    cfg = yaml.safe_load(PIPELINE.read_text())["pipeline"]
    data = [*cfg["data"], str(size_config(n, work, work / "cache"))]
    data_args = [a for d in data for a in ("--config", d)]
    logs = work / "logs"
    if "prepare" not in out:
        keep("prepare", per_user(measure(foundv2("data", *data_args), logs / "prepare.log"), n))
    print(f"{n} users: prepare {out['prepare']['seconds']:.0f} s", flush=True)
    run = work / "run"
    for k, step in enumerate(cfg["steps"], 1):
        if step["name"] in out:
            continue
        prefix = pipeline_prefix(cfg, k, data, run, work / f"pipeline-{k}.yaml")
        fig = per_user(measure(foundv2("pipeline", "--config", str(prefix)), logs / f"{step['name']}.log"), n)
        if step["name"] in PREDICT_STEPS:
            from foundv2.pipeline import parse_config, step_args

            pc = parse_config(["--config", str(prefix)])
            args = step_args(pc, pc.steps[-1], run)
            fig["predict"] = throughput(args, best_or_last_checkpoint(run / step["name"]),
                                        logs / f"{step['name']}-throughput.log")
        keep(step["name"], fig)
        print(f"{n} users: {step['name']} {fig['seconds']:.0f} s, peak {fig['peak_rss_mb']:.0f} MB", flush=True)
    # append one day window to every user: the cache first (once), then the measured append
    prepared = prepared_folder(work / "cache")
    events = work / "next-day.parquet"
    if "append" not in out:
        max_windows = int(yaml.safe_load(DATA.read_text())["data"]["max_windows"])
        keep("append_users", next_day_events(prepared, events, max_windows))
    app = ["tokenize", "--append", *data_args, "--tokenizer", str(run / "tokenizer" / "export"),
           "--qformer", str(best_or_last_checkpoint(run / "stage1"))]
    if "append_cache" not in out:
        keep("append_cache", per_user(measure(foundv2(*app, "--tokens", str(run / "tokenizer" / "tokens"), "--output",
                                                      str(work / "tokens-v0"), "--cache_dtype", cache_dtype),
                                              logs / "append_cache.log"), n))
    if "append" not in out:
        keep("append", per_user(measure(foundv2(*app, "--tokens", str(work / "tokens-v0"), "--events", str(events),
                                                "--output", str(work / "tokens-v1")), logs / "append.log"),
                                out["append_users"]))
    print(f"{n} users: append {out['append']['seconds']:.0f} s", flush=True)
    out["disk_mb"] = {s["name"]: sum(f.stat().st_size for f in (run / s["name"] / s["output"]).rglob("*")
                                     if f.is_file()) / 2**20 for s in cfg["steps"] if s.get("output")}
    out["disk_mb"]["prepare"] = sum(f.stat().st_size for f in prepared.iterdir()) / 2**20
    out["disk_mb"]["append_cache"] = sum(f.stat().st_size for f in (work / "tokens-v0" / "append_cache").iterdir()) / 2**20
    st = json.loads((run / "tokenizer" / "tokens" / "report.json").read_text())["storage"]
    user = json.loads((run / "user_tokens" / "tokens" / "meta.json").read_text())
    out["token_storage"] = {**{k: st[k] for k in ("bytes_per_user", "fp32_bytes_per_user", "ratio_fp32")},
                            "user_bytes_per_user": user["bytes_per_user"]}
    return out


def targets(synthetic: dict) -> dict:
    """The scale targets, computed from the figures: per step, peak RSS at the largest size against
    the smallest (<= 1.5x, and <= 4 GB) and seconds per user at the largest against the middle size
    (<= 1.3x)."""
    sizes = sorted(int(k) for k in synthetic)
    if len(sizes) < 2:
        return {}
    lo, hi = str(sizes[0]), str(sizes[-1])
    mid = str(sizes[-2])
    out = {}
    for step, fig in synthetic[hi].items():
        if not isinstance(fig, dict) or "peak_rss_mb" not in fig or step not in synthetic[lo]:
            continue
        rss = fig["peak_rss_mb"] / synthetic[lo][step]["peak_rss_mb"]
        spu = (fig["seconds"] / int(hi)) / (synthetic[mid][step]["seconds"] / int(mid))
        out[step] = {"rss_ratio": rss, "rss_ok": rss <= 1.5 and fig["peak_rss_mb"] <= 4096,
                     "s_per_user_ratio": spu, "s_per_user_ok": spu <= 1.3}
    return out


# ------------------------------------------------------------------------------------- the report
H100_BF16_PEAK = 989e12  # dense bf16 FLOP/s of an H100 SXM (NVIDIA's datasheet)
TARGET_USERS = 100_000_000
STEP_NAMES = {"prepare": "prepare (`foundv2 data`)", "stage1": "stage 1 (Q-Former)", "tokenizer": "tokenizer",
              "user_tokens": "user tokens", "alignment": "stage 3 (alignment)", "bench": "bench",
              "append_cache": "append cache (once)", "append": "append one day window"}


def storage(run_fig: dict) -> dict:
    """Bytes per user of the token outputs and of the stage-1 features, from the largest size's run."""
    return run_fig.get("storage", {})


def plot(figures: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    syn = figures.get("synthetic", {})
    sizes = sorted(int(k) for k in syn)
    if not sizes:
        return
    steps = [s for s in STEP_NAMES if all(s in syn[str(n)] for n in sizes)]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for step in steps:
        a.plot(sizes, [syn[str(n)][step]["seconds"] / n * 1e3 for n in sizes], marker="o", label=step)
        b.plot(sizes, [syn[str(n)][step]["peak_rss_mb"] for n in sizes], marker="o", label=step)
    for ax, what in ((a, "milliseconds per user"), (b, "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_xlabel("users")
        ax.set_ylabel(what)
        ax.grid(alpha=0.3)
    a.set_yscale("log")
    b.legend(fontsize=8)
    fig.suptitle("foundv2 synthetic pipeline: cost per user and memory as users grow (2 CPU cores)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def markdown(figures: dict, gpu_utilisation: float, machine: dict) -> str:
    """docs/scale.md: the measured table and what 100 M users would cost, from the per-user figures."""
    syn = figures.get("synthetic", {})
    sizes = sorted(int(k) for k in syn)
    lines = ["# Scale: what a million users cost, and what 100 million would", "",
             "Written by `make bench-scale` (`python benchmarks/bench_scale.py`); every figure below is from its "
             f"last run, on {machine.get('cores')} CPU cores ({machine.get('platform', '')}), no GPU.", ""]
    if sizes:
        lines += ["## Every step of the synthetic pipeline", "",
                  "Each stage fits on a seeded sample of training users (`experiments/synthetic/scale-data.yaml`) "
                  "and predicts every user; each step is its own process "
                  "(`experiments/synthetic/scale-pipeline.yaml`, one step at a time).", "",
                  "| step | " + " | ".join(f"{n:,} users: s / users/s / peak MB" for n in sizes) + " |",
                  "|---|" + "---|" * len(sizes)]
        for step, name in STEP_NAMES.items():
            if all(step in syn[str(n)] for n in sizes):
                cells = [f"{syn[str(n)][step]['seconds']:,.0f} / {syn[str(n)][step]['users_per_s']:,.0f} / "
                         f"{syn[str(n)][step]['peak_rss_mb']:,.0f}" for n in sizes]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        total = {n: sum(v["seconds"] for k, v in syn[str(n)].items() if k in STEP_NAMES) for n in sizes}
        lines += ["| **all steps** | " + " | ".join(f"{total[n]:,.0f} s ({total[n] / 3600:.2f} h)" for n in sizes) + " |",
                  ""]
        tg = figures.get("targets", {})
        if tg:
            lines += [f"Targets ({sizes[-1]:,} against {sizes[0]:,} users for memory, against {sizes[-2]:,} for time "
                      "per user): peak RSS <= 1.5x and <= 4 GB; seconds per user <= 1.3x.", "",
                      "| step | peak RSS ratio | met | seconds-per-user ratio | met |", "|---|---|---|---|---|"]
            for step, t in tg.items():
                lines.append(f"| {STEP_NAMES.get(step, step)} | {t['rss_ratio']:.2f} | {'yes' if t['rss_ok'] else 'no'} | "
                             f"{t['s_per_user_ratio']:.2f} | {'yes' if t['s_per_user_ok'] else 'no'} |")
            lines.append("")
        big = syn[str(sizes[-1])]
        pred = {k: v["predict"] for k, v in big.items() if isinstance(v, dict) and "predict" in v}
        if pred:
            lines += ["## Predict throughput and FLOP utilisation", "",
                      f"Measured on {THROUGHPUT_USERS:,} users of the {sizes[-1]:,}-user run "
                      "(`foundv2.throughput.predict_throughput`: matmul-class FLOPs counted by torch's FlopCounterMode, "
                      "against this machine's measured fp32 matmul peak).", "",
                      "| stage | users/s | GFLOP per user | utilisation of the matmul peak | data / model / write s |",
                      "|---|---|---|---|---|"]
            for step, r in pred.items():
                bd = r.get("breakdown", {})
                lines.append(f"| {STEP_NAMES[step]} | {r['users_per_s']:,.0f} | {r['flops_per_user'] / 1e9:.3f} | "
                             f"{r['utilisation']:.1%} | {bd.get('data', 0):.1f} / {bd.get('model', 0):.1f} / "
                             f"{bd.get('write', 0):.1f} |")
            lines.append("")
        lines += plan_100m(figures, sizes[-1], gpu_utilisation)
    for key, title in ((f"files_{FILES_USERS}", f"Own files: {FILES_USERS:,} users as a folder of Parquet files"),):
        f = figures.get(key)
        if f:
            lines += [f"## {title}", "",
                      f"{f['events']:,} events in {f['input_mb']:,.0f} MB of Parquet (every user's events spread over "
                      f"every file), prepared through the `files` loader in {f['buckets']} buckets: "
                      f"**{f['seconds']:,.0f} s** ({f['users_per_s']:,.0f} users/s), **peak RSS {f['peak_rss_mb']:,.0f} MB**. "
                      "Phases (s): " + ", ".join(f"{k} {v:.0f}" for k, v in f["phase_seconds"].items()) + ".", ""]
    by_size = figures.get("ranks") or {}
    if by_size:
        lines += ["## Preparation on 1 and 2 ranks (a folder of Parquet files, `torchrun --nproc_per_node 2`)", "",
                  "| users | ranks | wall s (whole command) | preparation s (inside) | partition s | buckets s "
                  "| peak RSS MB per process |", "|---|---|---|---|---|---|---|"]
        for n, r in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            for k in ("1", "2"):
                ph = r[k]["phase_seconds"]
                lines.append(f"| {int(n):,} | {k} | {r[k]['seconds']:.1f} | {r[k]['prepare_seconds']:.1f} | "
                             f"{ph['partition']:.1f} | {ph['buckets']:.1f} | {r[k]['peak_rss_mb']:,.0f} |")
        lines.append("")
        for n, r in sorted(by_size.items(), key=lambda kv: int(kv[0])):
            lines.append(f"- {int(n):,} users, 2 ranks / 1 rank: **{r['ratio']:.2f}** of the wall time "
                         f"({r['prepare_ratio']:.2f} of the preparation itself); identical shards: "
                         f"{'yes' if r['same_cache'] else 'NO'}.")
        lines.append("")
    return "\n".join(lines) + "\n"


def plan_100m(figures: dict, n: int, gpu_utilisation: float) -> list[str]:
    """The 100 M-user plan from the per-user figures at ``n`` users."""
    big = figures["synthetic"][str(n)]
    cores = figures.get("machine_cores") or os.cpu_count() or 1
    scale = TARGET_USERS / n
    lines = [f"## What {TARGET_USERS // 10**6} million users would cost", "",
             f"From the per-user figures at {n:,} users, times {scale:,.0f}. CPU hours are this machine's "
             f"({cores} cores) wall hours times its cores; stages that fit on a sample pay the fit once, so their "
             "per-user cost at 100 M is at most this. GPU hours assume an H100 running the counted matmuls at "
             f"{gpu_utilisation:.0%} of its dense bf16 peak ({H100_BF16_PEAK / 1e12:.0f} TFLOP/s): an assumption, "
             "not a measurement (no GPU was available to measure it). Our matrices are small (model width 64-128), so a "
             "GPU runs them far below its peak and the data side (reading rows, collating batches, writing Arrow) "
             "stays on the CPU; read the GPU column as a lower bound of the model's share.", "",
             "| step | FLOPs per user | CPU core-hours | H100 GPU-hours (model only) | output per user | output at 100 M |",
             "|---|---|---|---|---|---|"]
    for step, name in STEP_NAMES.items():
        fig = big.get(step)
        if not isinstance(fig, dict) or "seconds" not in fig:
            continue
        core_h = fig["seconds"] * scale * cores / 3600
        flops = fig.get("predict", {}).get("flops_per_user")
        gpu_h = flops * TARGET_USERS / (H100_BF16_PEAK * gpu_utilisation) / 3600 if flops else None
        disk = big.get("disk_mb", {}).get(step)
        per_user_b = disk * 2**20 / n if disk else None
        lines.append(f"| {name} | {f'{flops / 1e6:,.1f} M' if flops else '-'} | {core_h:,.0f} | "
                     f"{f'{gpu_h:,.2g}' if gpu_h is not None else '-'} | "
                     f"{f'{per_user_b / 1024:,.1f} KB' if per_user_b else '-'} | "
                     f"{f'{per_user_b * TARGET_USERS / 2**40:,.2f} TB' if per_user_b else '-'} |")
    tok = big.get("token_storage")
    if tok:
        lines += ["", f"Tokens as stored: {tok['bytes_per_user']:.1f} bytes per user of per-window codes "
                  f"({tok['bytes_per_user'] * TARGET_USERS / 2**30:,.1f} GiB at 100 M users) against "
                  f"{tok['fp32_bytes_per_user']:,.0f} bytes of the fp32 features they quantise "
                  f"({tok['fp32_bytes_per_user'] * TARGET_USERS / 2**40:,.2f} TiB): {tok['ratio_fp32']:.0f}x smaller. "
                  f"User-level tokens: {tok.get('user_bytes_per_user', 0):.0f} bytes per user."]
    app = big.get("append")
    if app:
        lines += ["", f"Appending one day for everyone: {app['seconds'] / n * 1e3:.2f} ms per user here, "
                  f"{app['seconds'] * scale * cores / 3600:,.0f} core-hours a day at 100 M users."]
        cache_mb = big.get("disk_mb", {}).get("append_cache")
        if cache_mb:
            lines[-1] += (f" The append cache it reads (stage 1's state of every user's past windows, "
                          f"`foundv2/append.py`): {cache_mb * 2**20 / n / 1024:,.1f} KB per user, "
                          f"{cache_mb * 2**20 / n * TARGET_USERS / 2**40:,.1f} TB at 100 M users.")
    lines += ["", "On N nodes the same configs run under a launcher; only trainer flags change:", "", "```",
              "sbatch experiments/slurm/data.sbatch                       # preparation: every task its share of files and buckets",
              "srun foundv2 fit --config DATA --config STAGE --data.fit_users 1000000 \\",
              "     --trainer.num_nodes N --trainer.devices 8 --trainer.strategy ddp --trainer.precision bf16-mixed",
              "srun foundv2 predict --config DATA --config STAGE --ckpt_path BEST --model.predict_dir OUT \\",
              "     --trainer.num_nodes N --trainer.devices 8 --trainer.strategy ddp   # one Arrow part per rank",
              "```", ""]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--only", default="synthetic,files,ranks",
                    help="the parts to measure (synthetic, files, ranks); 'docs' measures nothing and writes "
                         "docs/scale.md and the plot from bench-results/scale.json")
    ap.add_argument("--work", default=str(ROOT / "runs" / "scale"), help="run folder (gitignored)")
    ap.add_argument("--gpu-utilisation", type=float, default=0.1,
                    help="share of an H100's dense bf16 peak assumed for the 100M-user GPU-hours (not measured)")
    ap.add_argument("--cache-dtype", default="float16", choices=("float16", "float32", "int8"),
                    help="the append cache's dtype (int8 at 1M users on a small disk: ~25 KB a user)")
    ap.add_argument("--docs", action="store_true",
                    help="rewrite docs/scale.md and the plot from bench-results/scale.json, measuring nothing")
    ap.add_argument("--fresh", action="store_true", help="measure every step again (default: a size's run goes on "
                    "from the last step it measured, so a killed run loses one step)")
    a = ap.parse_args()
    if a.measure:
        measure_child(a.measure)
        return
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    only = set(a.only.split(","))
    old = json.loads((RESULTS / "scale.json").read_text()) if (RESULTS / "scale.json").exists() else {}
    figures = {k: old[k] for k in ("synthetic", f"files_{FILES_USERS}", "ranks") if k in old}
    if a.docs:
        only = set()
    if "synthetic" in only:
        figures.setdefault("synthetic", {})
        for n in [int(x) for x in a.sizes.split(",")]:
            figures["synthetic"][str(n)] = run_synthetic(n, work / "synthetic", resume=not a.fresh,
                                                         cache_dtype=a.cache_dtype)
            write_results("scale", figures, {"sizes": a.sizes})  # keep what is done
    if figures.get("synthetic"):
        figures["targets"] = targets(figures["synthetic"])
    if "files" in only:
        figures[f"files_{FILES_USERS}"] = run_files(work)
        print(json.dumps(figures[f"files_{FILES_USERS}"], indent=1))
    if "ranks" in only:
        figures["ranks"] = {str(n): run_ranks(work, n) for n in RANK_USERS}
        print(json.dumps(figures["ranks"], indent=1))
    figures["machine_cores"] = os.cpu_count() if only else old.get("machine_cores", os.cpu_count())
    if only:
        write_results("scale", figures, {"sizes": a.sizes, "pipeline": str(PIPELINE.relative_to(ROOT)),
                                         "files_users": FILES_USERS, "rank_users": RANK_USERS,
                                         "gpu_utilisation_assumed": a.gpu_utilisation})
    from common import machine

    plot(figures, RESULTS / "scale.png")
    (ROOT / "docs" / "scale.md").write_text(markdown(figures, a.gpu_utilisation, machine()))
    print(f"wrote {RESULTS / 'scale.png'} and {ROOT / 'docs' / 'scale.md'}")


if __name__ == "__main__":
    main()
