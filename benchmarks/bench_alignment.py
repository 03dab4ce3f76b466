"""Stage 3 (AlignmentStage) against what it reads, on synthetic data and MovieLens-1M.

Run:  make bench-alignment        (writes bench-results/alignment.json)
      python benchmarks/bench_alignment.py --only synthetic|movielens-1m|append
      python benchmarks/bench_alignment.py --docs          (rewrite its docs/benchmarks.md tables from that file)

Every run writes its tables into docs/benchmarks.md, each under the command that measured it.

For each data set it runs `foundv2 pipeline --config experiments/<data>/alignment-bench.yaml`
(stage 1 → tokenizer → stage 3, and stage 3 with each objective switched off in turn → the bench)
in its own run folder, resuming whatever is complete, and records:

- ``metrics``: each task's main metric for aligned_tokens, tokens_bag, tokens_sum, the stage-1
  features (qformer) and the best baseline of the run;
- ``vs``: the paired 95 % interval of aligned_tokens minus each of them (the bench's ``pairs``),
  and the verdict word (beats: interval above 0; tie: it includes 0; loses);
- ``ablation``: aligned_tokens minus stage 3 with each objective off (a positive interval means
  the objective helps);
- ``append``: for ``--append-users`` (10,000) synthetic users, the seconds ``foundv2 tokenize
  --append`` takes to add one day window to every user from the cache, against the seconds to
  re-tokenize their whole history (stage-1 predict + tokenizer over base + new), the ratio, the
  mean windows per user, and the fixed start-up (the same append for one user only) measured
  separately; the target is ``append <= retokenize / mean windows + start-up``. Every time is a
  whole CLI process's wall time (what a deployment pays); the append's own report splits it.
  Stage 1 and the tokenizer are small and briefly trained (quality does not change the timing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, previous_figures, write_results  # noqa: E402

from foundv2.bench.report import write_block  # noqa: E402

DOC = ROOT / "docs" / "benchmarks.md"

DATASETS = ("synthetic", "movielens-1m")
APPEND_MODEL = {"dim": 32, "num_queries": 2, "num_layers": 2, "num_heads": 4}  # QFormerConfig
MAIN = {"binary": "auc", "multiclass": "accuracy", "multilabel": "macro_auc", "ranking": "ndcg@10"}
ROWS = ("aligned_tokens", "tokens_bag", "tokens_sum", "qformer")
BASELINES = ("tfidf", "ease", "itemknn", "sasrec", "tfidf_svd64_int8")


def word(c: dict) -> str:
    return "beats" if c["lo"] > 0 else "loses" if c["hi"] < 0 else "tie"


def figures(bench: dict) -> dict:
    res, out = bench["results"], {"metrics": {}, "vs": {}, "ablation": {}}
    for task, kind in bench["tasks"].items():
        key = MAIN[kind]
        have = {n: r[task][key] for n, r in res.items() if isinstance(r.get(task), dict) and key in r[task]}
        base = {n: v for n, v in have.items() if n in BASELINES}
        best = max(base, key=base.get) if base else None
        out["metrics"][task] = {"metric": key, **{n: have[n] for n in ROWS if n in have},
                                **({"best_baseline": best, best: have[best]} if best else {})}
        for c in bench.get("pairs", {}).get(task, []):
            entry = {k: c[k] for k in ("delta", "lo", "hi")} | {"verdict": word(c)}
            if c["b"].startswith("aligned_no_"):
                out["ablation"].setdefault(task, {})[c["b"].removeprefix("aligned_")] = entry
            elif c["b"] in ROWS or c["b"] == best:
                out["vs"].setdefault(task, {})[c["b"] + (" (best baseline)" if c["b"] == best else "")] = entry
    return out


def run(dataset: str) -> dict:
    config = f"experiments/{dataset}/alignment-bench.yaml"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "foundv2", "pipeline", "--config", config,
                    "--pipeline.on_change", "restart"], cwd=ROOT, check=True)
    run_dir = ROOT / "runs" / dataset / "alignment-bench"
    bench = json.loads((run_dir / "bench" / "bench.json").read_text())
    return {**figures(bench), "timings": json.loads((run_dir / "timings.json").read_text()),
            "wall_s": time.perf_counter() - t0, "config": config}


def _timed(*args: str) -> tuple[float, str]:
    """(wall seconds, stdout) of one ``python -m foundv2`` process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "foundv2", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode:
        raise SystemExit(f"foundv2 {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}")
    return wall, res.stdout


def _report(stdout: str) -> dict:
    return json.loads(stdout[stdout.index("{"):])


def run_append(n_users: int, days: int, work: Path, reuse: bool = False) -> dict:
    """The append figures (see the module docstring), in ``work``: rebuilt from scratch, or with
    ``reuse`` the models, base tokens and first encoding (``v0``) of an earlier run of the same
    size are kept and only the timed commands run again."""
    import pandas as pd

    from foundv2.append_world import QFORMER, data_config, stage_config, tokenizer_model, write_split_events

    reuse = reuse and (work / "v0" / "meta.json").exists() and \
        json.loads((work / "v0" / "meta.json").read_text())["append"]["history"][-1]["users"] == n_users
    if reuse:
        for old in ("v1", "v_one", "features_full", "tokens_full"):
            shutil.rmtree(work / old, ignore_errors=True)
        ev = {name: work / "events" / f"{name}.csv" for name in ("base", "new", "full", "users")}
    else:
        shutil.rmtree(work, ignore_errors=True)
        ev = write_split_events(work / "events", n_users, days, new_days=1, new_share=1.0)
    new = pd.read_csv(ev["new"])
    one = new[new["user_id"] == new["user_id"].iloc[0]]
    one.to_csv(work / "one_user.csv", index=False)
    kw = {"batch_size": 64, "max_windows": 64}
    base = data_config(work / "base.yaml", ev["base"], ev["users"], work / "cache", **kw)
    full = data_config(work / "full.yaml", ev["full"], ev["users"], work / "cache", **kw)
    qcfg = stage_config(work / "qformer.yaml", work / "s1", {**QFORMER, "init_args": {"qformer": APPEND_MODEL}},
                        limit_train_batches=20)
    tcfg = stage_config(work / "tokenizer.yaml", work / "s2", tokenizer_model(work / "tokenizer"), max_epochs=1,
                        limit_train_batches=20)
    app = ["tokenize", "--append", "--config", str(base), "--tokenizer", str(work / "tokenizer")]
    tok = ["--tokenizer", str(work / "tokenizer"), "--accelerator", "cpu", "--devices", "1"]
    t = {}
    if reuse:
        ckpt = next((work / "s1").rglob("*.ckpt"))
        first = json.loads((work / "v0" / "meta.json").read_text())["append"]["history"][-1]
        t["first_encoding_wall_s"] = None
    else:
        ckpt, first = _build_append_world(work, base, full, qcfg, tcfg, tok, app, t)
    app += ["--qformer", str(ckpt)]
    return _time_append(work, ev, base, full, qcfg, ckpt, tok, app, t, first, n_users, days)


def _build_append_world(work, base, full, qcfg, tcfg, tok, app, t) -> tuple[Path, dict]:
    """Prepare both data sets, fit stage 1 and the tokenizer, tokenize the base, first encoding."""
    for name, cfg in (("base", base), ("full", full)):
        t[f"prepare_{name}_s"], _ = _timed("data", "--config", str(cfg))
    t["fit_stage1_s"], _ = _timed("fit", "--config", str(base), "--config", str(qcfg))
    ckpt = next((work / "s1").rglob("*.ckpt"))
    t["predict_stage1_base_s"], _ = _timed("predict", "--config", str(base), "--config", str(qcfg), "--ckpt_path",
                                           str(ckpt), "--model.predict_dir", str(work / "features"))
    t["fit_tokenizer_s"], _ = _timed("fit", "--config", str(base), "--config", str(tcfg), "--data.features_dir",
                                     str(work / "features"))
    t["tokenize_base_s"], _ = _timed("tokenize", "--config", str(base), "--data.features_dir", str(work / "features"),
                                     "--output", str(work / "tokens"), *tok)
    # the one-time first encoding (builds the cache beside a tokenizer's own output)
    t["first_encoding_wall_s"], out = _timed(*app, "--qformer", str(ckpt), "--tokens", str(work / "tokens"),
                                             "--output", str(work / "v0"))
    return ckpt, _report(out)


def _time_append(work, ev, base, full, qcfg, ckpt, tok, app, t, first, n_users, days) -> dict:
    """The timed commands: the append, the one-user append (start-up), the full re-tokenize."""
    # the measured append: one new day window for every user
    append_wall, out = _timed(*app, "--tokens", str(work / "v0"), "--events", str(ev["new"]), "--output",
                              str(work / "v1"))
    append = _report(out)
    # the fixed start-up: the same command for one user's one window
    startup_wall, out = _timed(*app, "--tokens", str(work / "v0"), "--events", str(work / "one_user.csv"),
                               "--output", str(work / "v_one"))
    one_report = _report(out)
    # re-tokenizing the whole history (base + the new day) with the same models
    p_wall, _ = _timed("predict", "--config", str(full), "--config", str(qcfg), "--ckpt_path", str(ckpt),
                       "--model.predict_dir", str(work / "features_full"))
    k_wall, _ = _timed("tokenize", "--config", str(full), "--data.features_dir", str(work / "features_full"),
                       "--output", str(work / "tokens_full"), *tok)
    retok = p_wall + k_wall
    import pyarrow as pa

    users = pa.ipc.open_file(str(work / "v1" / "append_cache" / "users.arrow")).read_all()
    windows = float(users.column("n_windows").to_numpy().mean())  # the whole history's, the new window included
    cache_bytes = sum(f.stat().st_size for f in (work / "v1" / "append_cache").glob("kv-*.arrow"))
    delta_bytes = (work / "v1" / "append_cache" / "kv-00001.arrow").stat().st_size
    cache_dtype = json.loads((work / "v1" / "append_cache" / "cache.json").read_text())["dtype"]
    bound = retok / windows + startup_wall
    return {
        "users": n_users, "appended_users": append["appended_users"], "appended_windows": append["appended_windows"],
        "mean_windows_per_user": windows,
        "append_s": append_wall, "retokenize_s": retok, "ratio": retok / append_wall,
        "startup_s": startup_wall,
        "target_s": bound, "meets_target": append_wall <= bound,
        "append_report": {k: v for k, v in append.items() if k.endswith("_s")},
        "startup_report": {k: v for k, v in one_report.items() if k.endswith("_s")},
        "retokenize_split_s": {"stage1_predict": p_wall, "tokenize": k_wall},
        "first_encoding_s": t["first_encoding_wall_s"], "first_encoding": first.get("first_encoding"),
        "cache_bytes_per_user": cache_bytes / n_users, "append_delta_bytes_per_user": delta_bytes / n_users,
        "cache_dtype": cache_dtype,
        "setup_s": t, "model": APPEND_MODEL, "days": days,
        "load": os.getloadavg(),
    }


def _cell(c: dict, with_word: bool = True) -> str:
    return f"{c['delta']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]" + (f" {c['verdict']}" if with_word else "")


def append_markdown(a: dict) -> list[str]:
    """The docs/benchmarks.md table of the append timing (``alignment.json`` ``append``)."""
    split = a.get("retokenize_split_s", {})
    rep = a.get("append_report", {})
    return [
        f"`python benchmarks/bench_alignment.py --only append`: {a['users']:,} synthetic users, "
        f"{a['mean_windows_per_user']:.1f} windows each on average, one new day for {a['appended_users']:,} of them.",
        "", "| | seconds |", "|---|---|",
        f"| append one window (whole process) | {a['append_s']:.1f} |",
        f"| re-tokenize the whole history | {a['retokenize_s']:.1f} (stage-1 predict {split.get('stage1_predict', 0):.1f} "
        f"+ tokenize {split.get('tokenize', 0):.1f}) |",
        f"| fixed start-up (the same append for one user) | {a['startup_s']:.1f} |",
        f"| target: re-tokenize / mean windows + start-up | {a['target_s']:.2f} "
        f"({'met' if a['meets_target'] else 'missed'}, by {abs(a['target_s'] - a['append_s']):.1f} s) |",
        "",
        f"The append is {a['ratio']:.1f} times faster than re-tokenizing; inside the command it reads the cache in "
        f"{rep.get('read_cache_s', 0):.2f} s and encodes the new windows (the cached rows projected into every "
        f"block's keys and values included) in {rep.get('encode_s', 0):.2f} s. The cache: "
        f"{a['cache_bytes_per_user'] / 1024:.1f} KB a user ({a.get('cache_dtype', 'float16')}), "
        f"{a['append_delta_bytes_per_user']:.0f} bytes a "
        "user added by the day.", ""]


def dataset_markdown(name: str, part: dict) -> str:
    """The docs/benchmarks.md tables of one data set part of ``alignment.json``: the metrics,
    aligned_tokens minus each row it is compared with, and the ablation."""
    tasks = list(part["metrics"])
    out = [f"`{command(name)}` ({part['wall_s']:,.0f} s of wall time):", "",
           "| row | " + " | ".join(f"{t} {part['metrics'][t]['metric']}" for t in tasks) + " |",
           "|---|" + "---|" * len(tasks)]
    for row in ROWS:
        out.append(f"| `{row}` | " + " | ".join(f"{part['metrics'][t].get(row, float('nan')):.4f}" for t in tasks) + " |")
    best = [part["metrics"][t].get("best_baseline") for t in tasks]
    out.append("| best baseline | " + " | ".join(
        f"`{b}` {part['metrics'][t][b]:.4f}" if b else "" for b, t in zip(best, tasks, strict=True)) + " |")
    for key, title, word_ in (("vs", "aligned_tokens −", True), ("ablation", "aligned_tokens − (objective off)", False)):
        names = sorted({n for t in tasks for n in part.get(key, {}).get(t, {})})
        if not names:
            continue
        out += ["", f"| {title} | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for n in names:
            out.append(f"| {n} | " + " | ".join(
                _cell(part[key][t][n], word_) if n in part[key].get(t, {}) else "" for t in tasks) + " |")
    return "\n".join(out)


def command(part: str) -> str:
    return f"python benchmarks/bench_alignment.py --only {part}"


def write_docs(figures: dict) -> None:
    """Each part's tables into its block of docs/benchmarks.md, under the command that measured it."""
    for name in (*DATASETS, "append"):
        if figures.get(name):
            body = "\n".join(append_markdown(figures[name])) if name == "append" else dataset_markdown(name, figures[name])
            write_block(DOC, f"bench_alignment {name}", command(name), body.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=(*DATASETS, "append"),
                    help="one data set, or the append timing (the other parts' last figures are kept)")
    ap.add_argument("--append-users", type=int, default=10_000, help="synthetic users of the append timing")
    ap.add_argument("--append-days", type=int, default=28, help="days of history of those users")
    ap.add_argument("--reuse", action="store_true",
                    help="append: keep the models and first encoding of an earlier run of the same size")
    ap.add_argument("--docs", action="store_true", help="rewrite the docs/benchmarks.md tables from the last results and stop")
    args = ap.parse_args()
    if args.docs:
        write_docs(previous_figures("alignment", (*DATASETS, "append")))
        return
    names = [args.only] if args.only else [*DATASETS, "append"]
    for name in names:
        if name == "append":
            load = os.getloadavg()
            part = {**run_append(args.append_users, args.append_days, ROOT / "runs" / "append-bench",
                                 reuse=args.reuse),
                    "load_before": load}
        else:
            part = run(name)
        # merged with the file as it is now (not as it was at the start): each part is kept as soon
        # as it is done, and two runs of different parts at once do not drop each other's figures
        out = {**previous_figures("alignment", (*DATASETS, "append")), name: part}
        write_results("alignment", out, {"parts": sorted(k for k in out if k in (*DATASETS, "append"))})
        write_docs(out)


if __name__ == "__main__":
    main()
