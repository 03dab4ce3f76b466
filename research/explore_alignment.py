"""Stage 3: what limits a readout of the per-window tokens?

Run:  python research/explore_alignment.py [--data synthetic|movielens-1m] [--decoded] [--stage1-mean]
          [--supervised] [--no-widened] [--tasks T ...] [--run-dir DIR] [NAME=STEP/FOLDER ...]
      (after ``python benchmarks/bench_alignment.py --only <data>``, whose run folder
      ``runs/<data>/alignment-bench`` holds stage 1's features, the tokens and the tokenizer;
      ~2.5 min per representation on 2 cores for synthetic, ~6 min for MovieLens-1M)

It reads the alignment bench's tokens and builds, from the tokens alone:

- ``tokens_sum``: the bench's per-source sum of decoded code vectors;
- ``sum+decay0.8``: that, and beside it the same sum with each window weighted 0.8 ** (window
  keys before the user's last window: days for day windows, windows for event windows);
- ``sum+last``: that, and beside it the sum over the user's last window only;
- with ``--decoded``, ``decoded_mean``: every slice's code vector through the tokenizer's own
  decoder, back into stage 1's feature space, averaged over the user's slices (what the tokens
  say of stage 1's mean window state, through the one nonlinear map the tokenizer learned);
- with ``--stage1-mean``, ``stage1_mean``: stage 1's own mean window state (the first ``dim``
  columns of its ``user_emb``), unquantised: what the tokens quantise, as the reference;

and any embeddings of the run folder given as ``NAME=STEP/FOLDER`` (e.g. a stage-3 step fitted
with ``--model.init_args.user_pool sum``). Every row goes through the bench's probes (the
explore_tokens helpers: logistic probes with C on val, the linear next-item probe) and is compared
with ``tokens_sum`` by paired bootstrap over the test users.

``--supervised`` adds a ceiling for the label tasks: an MLP trained *on each task's labels*
(train users; early stopping on the validation users) from the tokens ([log1p of the bag of
token ids | tokens_sum]), against the linear probe on ``tokens_sum``. Stage 3 never sees a label,
so where a supervised learned function of the tokens does not beat the linear probe, no stage-3
readout of these tokens is expected to. The same MLP on stage 1's features checks that the MLP
itself is not what falls short.

Test scores are cached under ``runs/explore_alignment/<data>/``. Prints the figures; writes
nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import explore_tokens as E  # noqa: E402
from common import ROOT  # noqa: E402

from foundv2.bench import probes as P  # noqa: E402

DECAY = 0.8  # per window key of the recency readout
TASK_METRICS = {
    "synthetic": {"segment": "accuracy", "churn": "auc", "spender": "auc", "future_categories": "macro_auc",
                  "next_items": "ndcg@10"},
    "movielens-1m": {"gender": "auc", "age": "accuracy", "occupation": "accuracy", "future_genres": "macro_auc",
                     "next_items": "ndcg@10"},
}


def token_readouts(run: Path, n_rows: int, decoded: bool) -> dict[str, np.ndarray]:
    """The readouts of the module docstring."""
    from data_modules.store import read_stage_output
    from foundv2.nn.mrqvae import MultiViewRQVAE

    ds, meta = read_stage_output(run / "tokenizer" / "tokens")
    ds = ds.with_format("numpy")
    model = MultiViewRQVAE.from_pretrained(run / "tokenizer" / "export").eval()
    S = len(meta["sources"])
    total = decayed = last = dec_sum = None
    n_slices = np.zeros(n_rows, np.float32)
    for start in range(0, len(ds), 2048):
        part = ds[start : start + 2048]
        for r, codes, src, key in zip(part["row"], part["codes"], part["slice_source"], part["slice_key"], strict=True):
            if len(src) == 0:
                continue
            codes = np.stack(codes) if codes.dtype == object else codes
            s = torch.as_tensor(src, dtype=torch.long)
            with torch.no_grad():
                qt = model.quantizer.decode_codes(torch.as_tensor(codes, dtype=torch.long), s)
                x = model.decode(qt, s).numpy() if decoded else None
            q = qt.numpy()
            if total is None:
                total, decayed, last = (np.zeros((n_rows, S, q.shape[1]), np.float32) for _ in range(3))
                dec_sum = np.zeros((n_rows, x.shape[1]), np.float32) if decoded else None
            src = src.astype(np.int64)
            age = np.asarray(key, np.float64).max() - np.asarray(key, np.float64)
            np.add.at(total[r], src, q)
            np.add.at(decayed[r], src, q * (DECAY ** age)[:, None])
            np.add.at(last[r], src[age == 0], q[age == 0])
            if decoded:
                dec_sum[r] += x.sum(0)
            n_slices[r] += len(src)
    flat = lambda a: a.reshape(n_rows, -1)  # noqa: E731
    reps = {"tokens_sum": flat(total), f"sum+decay{DECAY}": np.concatenate([flat(total), flat(decayed)], 1),
            "sum+last": np.concatenate([flat(total), flat(last)], 1)}
    if decoded:
        reps["decoded_mean"] = dec_sum / np.maximum(n_slices, 1)[:, None]
    return reps


def embeddings(folder: Path, n_rows: int) -> tuple[np.ndarray, dict]:
    from data_modules.store import read_stage_output

    ds, meta = read_stage_output(folder)
    ds = ds.with_format("numpy")
    X = np.zeros((n_rows, len(ds[0]["user_emb"])), np.float32)
    X[ds["row"]] = np.stack(ds["user_emb"])
    return X, meta


def supervised_mlp(X: np.ndarray, task, split: np.ndarray, seed: int = 0, hidden: int = 256,
                   max_epochs: int = 200, patience: int = 15) -> np.ndarray:
    """Test scores (in :func:`~foundv2.bench.probes.score_predictions` layout) of an MLP trained on
    the task's labels of the train users (inputs standardised with their statistics; input dropout
    0.2, hidden dropout 0.5, AdamW 1e-3, weight decay 1e-3), keeping the epoch with the best
    validation AUC (macro AUC for several classes)."""
    torch.manual_seed(seed)
    tr, va, te = P.split_indices(split)
    X = torch.as_tensor(X, dtype=torch.float32)
    X = (X - X[tr].mean(0)) / (X[tr].std(0) + 1e-6)
    F = torch.nn.functional
    if task.kind == "multiclass":
        out, y, lossf = int(task.y.max()) + 1, torch.as_tensor(task.y, dtype=torch.long), F.cross_entropy
        scores = lambda s: torch.softmax(s, 1).numpy()  # noqa: E731
    else:
        y = torch.as_tensor(task.y, dtype=torch.float32)
        y = y[:, None] if y.ndim == 1 else y
        out, lossf = y.shape[1], F.binary_cross_entropy_with_logits
        scores = lambda s: torch.sigmoid(s[:, 0] if task.kind == "binary" else s).numpy()  # noqa: E731
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(X.shape[1], hidden), torch.nn.GELU(),
                              torch.nn.Dropout(0.5), torch.nn.Linear(hidden, out))
    opt = torch.optim.AdamW(net.parameters(), 1e-3, weight_decay=1e-3)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, waited = -np.inf, None, 0
    for _ in range(max_epochs):
        net.train()
        order = torch.as_tensor(tr)[torch.randperm(len(tr), generator=gen)]
        for i in range(0, len(order), 128):
            b = order[i : i + 128]
            opt.zero_grad()
            lossf(net(X[b]), y[b]).backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            m = P.score_predictions(task.kind, scores(net(X[va])), task.y[va])
        val = m.get("auc", m.get("macro_auc"))
        if val > best:
            best, best_state, waited = val, {k: t.clone() for k, t in net.state_dict().items()}, 0
        elif (waited := waited + 1) > patience:
            break
    net.load_state_dict(best_state)
    net.eval()
    with torch.no_grad():
        return scores(net(X[te]))


def main() -> None:
    from data_modules.datamodule import UserDataModule
    from foundv2.bench.run import load_bench_data, token_representations

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", choices=sorted(TASK_METRICS), default="synthetic")
    ap.add_argument("--decoded", action="store_true", help="add decoded_mean (see the module docstring)")
    ap.add_argument("--stage1-mean", action="store_true", help="add stage 1's mean window state")
    ap.add_argument("--supervised", action="store_true", help="add the supervised MLP ceiling of the label tasks")
    ap.add_argument("--no-widened", action="store_true", help="leave out sum+decay and sum+last")
    ap.add_argument("--tasks", nargs="*", help="only these tasks (default: all)")
    ap.add_argument("--run-dir", help="the alignment bench's run folder (default: runs/<data>/alignment-bench)")
    ap.add_argument("embeddings", nargs="*", metavar="NAME=STEP/FOLDER")
    args = ap.parse_args()
    run = Path(args.run_dir) if args.run_dir else ROOT / "runs" / args.data / "alignment-bench"
    E.CACHE = ROOT / "runs" / "explore_alignment" / args.data / run.name
    E.TASK_METRIC = TASK_METRICS[args.data]

    data_cfg = yaml.safe_load((ROOT / "experiments" / args.data / "data.yaml").read_text())["data"]
    dm = UserDataModule(**data_cfg, progress=False)  # the data config the alignment bench ran on
    dm.prepare_data()
    data = load_bench_data(dm)
    n = len(data.split)
    reps = token_readouts(run, n, args.decoded)
    if args.no_widened:
        reps = {k: v for k, v in reps.items() if k in ("tokens_sum", "decoded_mean")}
    stage1, stage1_meta = embeddings(run / "stage1" / "features", n)
    if args.stage1_mean:
        reps["stage1_mean"] = stage1[:, : int(stage1_meta["dim"])]
    for arg in args.embeddings:
        name, _, rel = arg.partition("=")
        reps[name] = embeddings(run / rel, n)[0]
    res = {}
    for name, X in reps.items():
        t0 = time.time()
        res[name] = E.probe(name, lambda X=X: X, 0, data, tasks=args.tasks)
        print(name, {k: round(v, 4) for k, v in res[name]["metrics"].items()}, f"{time.time() - t0:.0f} s", flush=True)
    for name in reps:
        if name != "tokens_sum":
            vs = E.compare(res[name], res["tokens_sum"], data)
            print(f"{name} - tokens_sum", json.dumps({t: {k: round(v, 4) for k, v in c.items()} for t, c in vs.items()}))
    if not args.supervised:
        return
    test = P.split_indices(data.split)[2]
    bag = token_representations(run / "tokenizer" / "tokens", None, n)["tokens_bag"][0]  # the bench's bag of ids
    inputs = {"mlp_tokens": np.concatenate([np.log1p(bag.toarray()), reps["tokens_sum"]], 1), "mlp_stage1": stage1}
    for task in data.tasks:
        if task.kind == "ranking" or (args.tasks and task.name not in args.tasks):
            continue
        metric = E.TASK_METRIC[task.name]
        for name, X in inputs.items():
            s = supervised_mlp(X, task, data.split)
            m = P.score_predictions(task.kind, s, task.y[test])[metric]
            d = P.paired_bootstrap(task.kind, s, res["tokens_sum"]["scores"][task.name], task.y[test], metric=metric)
            print(f"{name} {task.name}={m:.4f}; - tokens_sum (linear probe) "
                  f"{d['delta']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]", flush=True)


if __name__ == "__main__":
    main()
