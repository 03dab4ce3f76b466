"""Predict throughput and FLOP utilisation of the shipped synthetic pipeline's stages.

Run:  .venv/bin/python research/throughput.py [--users 10000] [--fit-steps 20] [--threads N]
          [--orders rows,length] [--precisions 32-true,bf16-mixed] [--fit-users N] [--only stage1,tokenizer,alignment] [--markdown docs/throughput.md]

Prepares ``--users`` synthetic users (experiments/synthetic/data.yaml), fits each stage of
experiments/synthetic/pipeline.yaml for ``--fit-steps`` steps (a short fit: a predict's cost
does not depend on how long the weights were trained) into ``runs/throughput/<users>/``, then
measures each stage's predict over every user with :func:`foundv2.throughput.predict_throughput`,
once per ``data.predict_order`` in ``--orders`` (side by side in one process): users/s, matmul
FLOPs per user, the machine's measured fp32 matmul peak, the utilisation, and where the time goes
(reading and collating, the model, the Arrow writer). The first order's output is kept (the next
stage reads it) and a digest of its content printed, so a change that must not alter the outputs
can be checked by comparing digests before and after. Writes ``bench-results/throughput.json`` (and, with
``--markdown``, the table).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.common import write_results  # noqa: E402
from foundv2.throughput import from_config, matmul_peak_flops, predict_throughput  # noqa: E402

EXP = "experiments/synthetic"
STAGES = {
    "stage1": ([f"{EXP}/qformer.yaml"], {}),
    "tokenizer": ([f"{EXP}/tokenizer.yaml", f"{EXP}/tokenizer-on-stage1.yaml"], {"data.features_dir": "stage1"}),
    "alignment": ([f"{EXP}/alignment.yaml", f"{EXP}/alignment-distill.yaml"],
                  {"data.tokens_dir": "tokenizer", "model.tokenizer_dir": "tokenizer-export",
                   "data.teacher_dir": "stage1"}),
}


def _column_arrays(arr: pa.Array) -> list[np.ndarray]:
    """A column chunk as the arrays its content is made of, whatever its record-batch layout: list
    lengths at every nesting level, then the leaf values."""
    if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
        return [np.diff(arr.offsets.to_numpy()).astype(np.int64), *_column_arrays(arr.flatten())]
    if pa.types.is_fixed_size_list(arr.type):
        return _column_arrays(arr.flatten())
    return [np.ascontiguousarray(arr.to_numpy(zero_copy_only=False))]


def output_digest(folder: Path) -> str:
    """blake2b of a stage output's content (every column's values, lists' lengths, in part and row
    order), read a record batch at a time; equal for equal data however it was cut into record
    batches (meta.json left out: it holds paths)."""
    hashes: dict[tuple[str, int], hashlib.blake2b] = {}  # (column, nesting level): its stream of arrays
    for part in json.loads((folder / "meta.json").read_text())["parts"]:
        with pa.OSFile(str(folder / part)) as source:
            for batch in pa.ipc.open_stream(source):
                for name, col in zip(batch.schema.names, batch.columns, strict=True):
                    for level, a in enumerate(_column_arrays(col)):
                        hashes.setdefault((name, level), hashlib.blake2b(digest_size=16)).update(a.tobytes())
    total = hashlib.blake2b(digest_size=16)
    for key in sorted(hashes):
        total.update(f"{key[0]}/{key[1]}".encode() + hashes[key].digest())
    return total.hexdigest()


def output_difference(first: Path, other: Path) -> dict:
    """How far another run's float columns are from the first run's, per user (rows matched by
    ``user_id``): the relative L2 error over all of them and the smallest per-row cosine of
    ``user_emb`` (features) or of the decoded vectors; 0 / 1 for equal outputs."""
    from data_modules.store import read_stage_output

    a, _ = read_stage_output(first)
    b, _ = read_stage_output(other)
    out = {}
    for col in ("user_emb", "feat"):
        if col not in a.column_names:
            continue
        order_a = np.argsort(np.asarray(a["user_id"]))
        order_b = np.argsort(np.asarray(b["user_id"]))
        xa = [np.asarray(a[int(i)][col], np.float64).reshape(-1) for i in order_a[:2000]]
        xb = [np.asarray(b[int(i)][col], np.float64).reshape(-1) for i in order_b[:2000]]
        va, vb = np.concatenate(xa), np.concatenate(xb)
        out[f"{col}_rel_err"] = float(np.linalg.norm(va - vb) / max(np.linalg.norm(va), 1e-12))
    if "token_ids" in a.column_names:
        ta = {u: t for u, t in zip(a["user_id"], a["token_ids"], strict=True)}
        same = [ta[u] == t for u, t in zip(b["user_id"], b["token_ids"], strict=True)]
        out["users_with_equal_tokens"] = float(np.mean(same))
    return out


def stage_args(name: str, run: Path, users: int, cache: str, order: str | None = None,
               fit_users: int | None = None) -> list[str]:
    configs, reads = STAGES[name]
    args = ["--config", f"{EXP}/data.yaml", *sum((["--config", c] for c in configs), [])]
    args += ["--data.loader_args", json.dumps({"n_users": users, "seed": 0}), "--data.cache_dir", cache,
             "--data.progress", "false", "--trainer.accelerator", "cpu"]
    if order:
        args += ["--data.predict_order", order]
    if fit_users:  # fit on a sample, as a run at scale does (validation on a tenth of it)
        args += ["--data.fit_users", str(fit_users), "--data.val_users", str(max(fit_users // 10, 1))]
    for key, step in reads.items():
        where = run / "tokenizer" / "export" if step == "tokenizer-export" else run / step / "out"
        args += [f"--{key}", str(where)]
    return args


def fit(name: str, run: Path, args: list[str], steps: int) -> Path:
    from foundv2.launch import fit_stage, last_checkpoint

    folder = run / name
    if last_checkpoint(folder) is None:
        extra = ["--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
                 "--trainer.default_root_dir", str(folder), "--trainer.logger", "false",
                 "--trainer.enable_progress_bar", "false"]
        if name == "tokenizer":
            extra += ["--model.export_dir", str(folder / "export")]
        fit_stage(args + extra, folder, quiet=True)
    return last_checkpoint(folder)


def markdown(figures: dict, command: str) -> str:
    """The docs table: one row per (stage, predict order)."""
    lines = ["# Predict throughput of the synthetic pipeline's stages", "",
             f"Written by `{command}` ({figures['users']:,} synthetic users, one process, "
             f"{figures['threads']} torch threads, 2 cores shared with other work: seconds are noisy, compare rows "
             f"of one table). Peak: the best fp32 1024x1024 matmul of the run (measured before and after each "
             f"predict), {figures['peak_flops'] / 1e9:.0f} GFLOP/s. "
             "FLOPs are matmul-class FLOPs (FlopCounterMode) of predict_step, padding included; the time is the "
             "whole predict (reading and collating rows, the model, the Arrow writer).", "",
             "| stage | predict_order, precision | users/s | MFLOP/user | utilisation (of fp32 peak) | data s | model s "
             "| write s | other s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, by_order in figures["stages"].items():
        for order, r in by_order.items():
            b = r["breakdown"]
            lines.append(f"| {name} | {order} | {r['users_per_s']:,.0f} | {r['flops_per_user'] / 1e6:.1f} | "
                         f"{r['utilisation']:.1%} | {b['data']:.1f} | {b['model']:.1f} | {b['write']:.1f} | "
                         f"{b['other']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--users", type=int, default=10_000)
    ap.add_argument("--fit-steps", type=int, default=20)
    ap.add_argument("--only", default=",".join(STAGES))
    ap.add_argument("--cache", default=".cache/foundv2")
    ap.add_argument("--run-dir", default="runs/throughput")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    ap.add_argument("--orders", default="rows,length",
                    help="data.predict_order values measured side by side; the first one's output feeds the next stage")
    ap.add_argument("--precisions", default="32-true",
                    help="trainer precisions measured side by side (e.g. 32-true,bf16-mixed); the first feeds the next stage")
    ap.add_argument("--fit-users", type=int, default=None, help="data.fit_users of the fits (val_users: a tenth)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file (docs/throughput.md)")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    run = Path(a.run_dir) / str(a.users)
    peak = matmul_peak_flops()
    orders = a.orders.split(",")
    precisions = a.precisions.split(",")
    figures = {"peak_flops": peak, "users": a.users, "threads": torch.get_num_threads(), "stages": {}}
    only = a.only.split(",")
    last = max(list(STAGES).index(s) for s in only)
    for name in list(STAGES)[: last + 1]:
        ckpt = fit(name, run, stage_args(name, run, a.users, a.cache, orders[0], a.fit_users), a.fit_steps)
        if name not in only and (run / name / "out" / "meta.json").exists():
            continue  # a later stage reads this stage's output as it is
        runs = [(o, p) for o in orders for p in precisions] if name in only else [(orders[0], precisions[0])]
        for i, (order, precision) in enumerate(runs):
            stage, dm = from_config(stage_args(name, run, a.users, a.cache, order, a.fit_users))
            # the first run's output feeds the next stage; the others are compared with it
            keep = run / name / ("out" if i == 0 else f"out-{order}-{precision}")
            res = predict_throughput(stage, dm, ckpt_path=str(ckpt), keep_dir=str(keep), precision=precision)
            peak = max(peak, res["peak_flops"])
            res["digest"] = output_digest(keep)
            if i > 0:
                res["vs_first"] = output_difference(run / name / "out", keep)
                shutil.rmtree(keep)
            if name in only:
                figures["stages"].setdefault(name, {})[f"{order} {precision}"] = res
            print(name, order, precision, json.dumps(res), flush=True)
    figures["peak_flops"] = peak  # the best of every measure in the run: utilisation against it
    for by_order in figures["stages"].values():
        for r in by_order.values():
            r["peak_flops"], r["utilisation"] = peak, r["users_per_s"] * r["flops_per_user"] / peak
    write_results("throughput", figures, {"users": a.users, "fit_steps": a.fit_steps, "threads": torch.get_num_threads(),
                                          "orders": orders, "precisions": precisions, "fit_users": a.fit_users,
                                          "stages": {k: v[0] for k, v in STAGES.items()}})
    if a.markdown:
        Path(a.markdown).write_text(markdown(figures, "python research/throughput.py " + " ".join(sys.argv[1:])))
        print(f"wrote {a.markdown}")


if __name__ == "__main__":
    main()
