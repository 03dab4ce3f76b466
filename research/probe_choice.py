"""Which linear probe should the bench use for label tasks: scikit-learn's LBFGS logistic
regression or the gradient-trained ``ProbeStage``? The same features, tasks and split through
both, side by side (the stage as the bench fits it, with its settings unless flags say otherwise).

Run:  python research/probe_choice.py [--data experiments/movielens-1m/data.yaml]
                                      [--features runs/movielens-1m/pipeline/stage1/features]
      (writes bench-results/probe_choice.json, or --out's name, and prints a table)

For every label task of the data set (binary, multiclass, the future categories) and every
representation (the pooled features, the ``activity`` baseline, and any stage output given with
``--features``), both probes are fitted on the train users, choose their regularisation on the
validation users and score the test users, alternately twice (the machine's load drifts; the
faster run of each is kept). Reported per (representation, task): seconds of each, their ratio,
the test metric the bench's tables show from each and the difference (the bench's paired
bootstrap of ``stage - sklearn`` over the test users gives the interval). What the choice also
weighs, not measured here: scikit-learn holds every train user's features in memory, the stage
streams batches and runs under DDP.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import ROOT, machine, write_results  # noqa: E402

from foundv2.bench.probes import (  # noqa: E402
    LABEL_LR,
    LABEL_MIN_STEPS,
    LABEL_PATIENCE,
    LABEL_SELECTION,
    LABEL_WEIGHT_DECAYS,
)
from foundv2.bench.report import write_block  # noqa: E402

MAIN = {"binary": "auc", "multiclass": "accuracy", "multilabel": "macro_auc"}


def stage_probe(X, y, split, kind: str, args) -> tuple[np.ndarray, dict]:
    """The bench's probe (ProbeStage, :func:`foundv2.bench.probes.fit_label`); the chosen head's test scores."""
    from foundv2.bench.probes import fit_label, label_scores, probe_info, split_indices

    stage = fit_label(X, y, split, kind, args.weight_decays, args.lr, args.epochs, args.batch_size, args.patience,
                       min_steps=args.min_steps, selection=args.selection)
    return label_scores(stage, X[split_indices(split)[2]]), {**probe_info(stage), "epoch": int(stage.best_epoch)}


def sklearn_probe(X, y, split, kind: str, Cs=(0.01, 0.1, 1.0, 10.0)) -> tuple[np.ndarray, dict]:
    """scikit-learn's LBFGS logistic regression (one-vs-rest per label for multi-label), inputs
    standardised with the train users' statistics, C chosen on the validation users' selection
    metric (the bench's label probe before ProbeStage took every task); the chosen C's test scores."""
    from sklearn.linear_model import LogisticRegression

    from foundv2.bench.probes import SELECTION_METRIC, n_classes_of, score_predictions, split_indices

    train, val, test = split_indices(split)
    mean, std = X[train].mean(0), X[train].std(0)
    Z = (X - mean) / np.where(std > 1e-8, std, 1.0)
    n_classes = n_classes_of(y, kind)

    def fit(C: float):
        cols = [y[:, c] for c in range(y.shape[1])] if kind == "multilabel" else [y]
        return [LogisticRegression(C=C, max_iter=1000, random_state=0).fit(Z[train], t[train]) for t in cols]

    def scores(models, rows):
        if kind == "multilabel":
            return np.stack([m.predict_proba(Z[rows])[:, 1] for m in models], 1)
        p = models[0].predict_proba(Z[rows])
        if kind == "binary":
            return p[:, 1]
        full = np.zeros((len(rows), n_classes))
        full[:, models[0].classes_.astype(int)] = p
        return full

    key = SELECTION_METRIC[kind]
    best = max(((C, fit(C)) for C in Cs), key=lambda cm: score_predictions(kind, scores(cm[1], val), y[val])[key])
    return scores(best[1], test), {"C": best[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="experiments/movielens-1m/data.yaml")
    ap.add_argument("--features", nargs="*", default=[], help="stage outputs with a user_emb column")
    ap.add_argument("--reps", nargs="*", help="only these representations (default: all)")
    ap.add_argument("--tasks", nargs="*", help="only these tasks (default: every label task)")
    ap.add_argument("--stage-only", action="store_true",
                    help="fit only the stage, once (a search over its settings: prints its metrics, writes nothing)")
    ap.add_argument("--out", default="probe_choice", help="the name of the results file in bench-results/")
    ap.add_argument("--weight-decays", type=float, nargs="+", default=list(LABEL_WEIGHT_DECAYS))
    ap.add_argument("--lr", type=float, default=LABEL_LR)
    ap.add_argument("--patience", type=int, default=LABEL_PATIENCE)
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--selection", choices=("metric", "loss"), default=LABEL_SELECTION,
                    help="what picks the head and the epoch on validation")
    ap.add_argument("--min-steps", type=int, default=LABEL_MIN_STEPS, help="optimiser steps between validations")
    args = ap.parse_args()

    import torch

    from data_modules.datamodule import UserDataModule
    from foundv2.bench.baselines import activity_features
    from foundv2.bench.probes import paired_bootstrap, score_predictions, split_indices
    from foundv2.bench.run import embedding_representation, load_bench_data, pooled_representation

    torch.manual_seed(0)
    torch.set_num_threads(2)
    cfg = yaml.safe_load((ROOT / args.data).read_text())["data"]
    dm = UserDataModule(**cfg, progress=False)
    dm.prepare_data()
    data = load_bench_data(dm)
    reps = {"pooled": pooled_representation(dm)[0],
            "activity": activity_features(data.sources, data.times, data.values, len(data.spec.sources),
                                          data.split)[0]}
    for folder in args.features:
        reps[Path(folder).parent.name] = embedding_representation(ROOT / folder, len(data.split))[0]
    test = split_indices(data.split)[2]
    out, lines = {}, []
    for rep, X in reps.items():
        if args.reps and rep not in args.reps:
            continue
        for task in (t for t in data.tasks if t.kind in MAIN and (not args.tasks or t.name in args.tasks)):
            y = np.asarray(task.y)
            if args.stage_only:
                t0 = time.perf_counter()
                scores, info = stage_probe(X, y, data.split, task.kind, args)
                m = score_predictions(task.kind, scores, y[test])[MAIN[task.kind]]
                print(f"stage-only {rep} {task.name} {MAIN[task.kind]} {m:.4f} {time.perf_counter() - t0:.1f}s {info}",
                      flush=True)
                continue
            runs = {"sklearn": [], "stage": []}
            for mode in ("sklearn", "stage", "sklearn", "stage"):
                t0 = time.perf_counter()
                scores, info = (sklearn_probe(X, y, data.split, task.kind) if mode == "sklearn"
                                else stage_probe(X, y, data.split, task.kind, args))
                runs[mode].append((time.perf_counter() - t0, scores, info))
            (s_sk, p_sk, i_sk), (s_st, p_st, i_st) = (min(runs[m], key=lambda r: r[0]) for m in ("sklearn", "stage"))
            key = MAIN[task.kind]
            m_sk, m_st = score_predictions(task.kind, p_sk, y[test])[key], score_predictions(task.kind, p_st, y[test])[key]
            pb = paired_bootstrap(task.kind, p_st, p_sk, y[test], metric=key)
            ci = (pb["lo"], pb["hi"])
            out.setdefault(rep, {})[task.name] = {
                "kind": task.kind, "metric": key, "sklearn": m_sk, "stage": m_st, "delta": m_st - m_sk,
                "ci": [ci[0], ci[1]], "sklearn_s": s_sk, "stage_s": s_st, "speedup": s_sk / s_st,
                "sklearn_info": i_sk, "stage_info": i_st}
            lines.append(f"| {rep} | {task.name} | {key} | {m_sk:.4f} | {m_st:.4f} | {m_st - m_sk:+.4f} "
                         f"[{ci[0]:+.4f}, {ci[1]:+.4f}] | {s_sk:.1f} | {s_st:.1f} | {s_sk / s_st:.2f} |")
            print(lines[-1], flush=True)
    if args.stage_only:
        return
    head = ["| representation | task | metric | sklearn | ProbeStage | stage − sklearn [95 %] | sklearn s | "
            "stage s | sklearn s / stage s |", "|---|---|---|---|---|---|---|---|---|"]
    print("\n".join(head + lines))
    command = "python research/probe_choice.py " + " ".join(sys.argv[1:])
    m = machine()
    write_block(ROOT / "docs" / "benchmarks.md", f"probe_choice {args.out}", command,
                f"`{command}` ({m['cores']} cores, torch {m['libraries']['torch']}): {len(test)} test users; "
                f"ProbeStage with lr {args.lr:g}, patience {args.patience}, weight decays "
                f"{', '.join(f'{w:g}' for w in args.weight_decays)}, batch {args.batch_size}, selection "
                f"{args.selection}, at least {args.min_steps} steps an epoch; scikit-learn's C "
                f"from 0.01, 0.1, 1, 10. Seconds: the faster of two fits each.\n\n" + "\n".join(head + lines))
    write_results(args.out, {"results": out, "users": int(len(data.split)), "test_users": int(len(test))},
                  {"data": args.data, "stage": {"weight_decays": args.weight_decays, "lr": args.lr,
                                                "patience": args.patience, "epochs": args.epochs,
                                                "batch_size": args.batch_size, "selection": args.selection,
                                                "min_steps": args.min_steps}, "sklearn_Cs": [0.01, 0.1, 1.0, 10.0]})


if __name__ == "__main__":
    main()
