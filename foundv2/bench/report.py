"""The bench's outputs: bench.json, report.md (tables + verdicts), PNG plots, TensorBoard scalars."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from data_modules.store import atomic_write_text

METRICS = {
    "binary": ["auc", "ks"],
    "multiclass": ["accuracy", "macro_auc"],
    "multilabel": ["macro_auc"],
    "ranking": ["recall@10", "ndcg@10", "recall@20", "ndcg@20"],
}
MAIN = {"binary": "auc", "multiclass": "accuracy", "multilabel": "macro_auc", "ranking": "ndcg@10"}
BASELINES = ("tfidf", "majority", "popularity", "ease", "itemknn", "sasrec")
TOKENS = ("tokens_bag", "tokens_sum")


def verdicts(bench: dict) -> dict[str, dict]:
    """Per task: the best token representation against the best baseline, and the storage ratio."""
    res = bench["results"]
    out = {}
    for task, kind in bench["tasks"].items():
        key = MAIN[kind]
        base = {n: r[task][key] for n, r in res.items() if n in BASELINES and task in r and key in r[task]}
        tok = {n: r[task][key] for n, r in res.items() if n in TOKENS and task in r and key in r[task]}
        if not base or not tok:
            continue
        bn, bv = max(base.items(), key=lambda kv: kv[1])
        tn, tv = max(tok.items(), key=lambda kv: kv[1])
        tok_bytes = res[tn].get("bytes_per_user")
        ref = res.get("pooled", {}).get("bytes_per_user")
        out[task] = {
            "metric": key,
            "best_tokens": tn,
            "tokens": tv,
            "best_baseline": bn,
            "baseline": bv,
            "delta": tv - bv,
            "tokens_win": tv > bv,
            "tokens_bytes_per_user": tok_bytes,
            "storage_ratio_vs_pooled_fp32": (ref / tok_bytes) if ref and tok_bytes else None,
        }
    return out


def markdown(bench: dict, verdict: dict) -> str:
    res = bench["results"]
    lines = [
        f"# {bench['protocol']} on {bench['dataset']}",
        "",
        f"Users train/val/test: {bench['split_sizes']}; items: {bench['num_items']}; seed {bench['seed']}; "
        f"{bench['seconds']:.0f} s on {bench['machine']['cores']} cores.",
        "",
    ]
    for task, kind in bench["tasks"].items():
        cols = METRICS[kind]
        rows = [(n, r[task]) for n, r in res.items() if task in r]
        if not rows:
            continue
        lines += [
            f"## {task} ({kind})",
            "",
            "| representation | " + " | ".join(cols) + " | bytes/user |",
            "|---|" + "---|" * (len(cols) + 1),
        ]
        for n, r in sorted(rows, key=lambda nr: -nr[1].get(MAIN[kind], -1)):
            b = res[n].get("bytes_per_user")
            cells = " | ".join(f"{r[c]:.4f}" if c in r else "" for c in cols)
            lines.append(f"| {n} | {cells} | {b:,.0f} |" if b else f"| {n} | {cells} | |")
        if task in verdict:
            v = verdict[task]
            word = "beat" if v["tokens_win"] else "do not beat"
            ratio = (
                f", at 1/{v['storage_ratio_vs_pooled_fp32']:.0f} of the pooled fp32 features' storage"
                if v["storage_ratio_vs_pooled_fp32"]
                else ""
            )
            lines += [
                "",
                f"Tokens ({v['best_tokens']}, {v['tokens_bytes_per_user']:.0f} B/user) {word} the best "
                f"baseline ({v['best_baseline']}) on {v['metric']}: {v['tokens']:.4f} vs {v['baseline']:.4f} "
                f"({v['delta']:+.4f}){ratio}.",
            ]
        lines.append("")
    return "\n".join(lines)


def plots(bench: dict, out_dir: Path, usage=None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = bench["results"]
    paths = []
    for task, kind in bench["tasks"].items():
        key = MAIN[kind]
        pts = [
            (n, r["bytes_per_user"], r[task][key])
            for n, r in res.items()
            if task in r and key in r[task] and r.get("bytes_per_user")
        ]
        others = [
            (n, r[task][key])
            for n, r in res.items()
            if task in r and key in r[task] and not r.get("bytes_per_user")
        ]
        if not pts and not others:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for n, b, v in pts:
            ax.scatter(b, v, s=40)
            ax.annotate(n, (b, v), textcoords="offset points", xytext=(4, 4), fontsize=8)
        for n, v in others:
            ax.axhline(v, ls="--", lw=0.8, color="grey")
            ax.annotate(n, (ax.get_xlim()[0] if pts else 0, v), fontsize=7, color="grey")
        if pts:
            ax.set_xscale("log")
        ax.set_xlabel("bytes per user (log)")
        ax.set_ylabel(key)
        ax.set_title(f"{bench['dataset']}: {task}")
        fig.tight_layout()
        p = out_dir / f"{task}_vs_bytes.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    if usage is not None:
        counts, levels = usage
        fig, ax = plt.subplots(figsize=(6, 3.5))
        c = np.sort(np.asarray(counts, float))[::-1]
        ax.plot(np.arange(len(c)), c, lw=1)
        ax.set_yscale("symlog")
        ax.set_xlabel(f"token id, by frequency ({levels} levels, all blocks)")
        ax.set_ylabel("uses")
        ax.set_title("code usage")
        fig.tight_layout()
        p = out_dir / "code_usage.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


def tensorboard(bench: dict, out_dir: Path, pngs: list[Path]) -> None:
    from torch.utils.tensorboard import SummaryWriter

    w = SummaryWriter(str(out_dir / "tb"))
    for name, r in bench["results"].items():
        for task, m in r.items():
            if isinstance(m, dict):
                for k, v in m.items():
                    if isinstance(v, (int, float)) and k != "seconds":
                        w.add_scalar(f"bench/{task}/{k}/{name}", float(v), 0)
    try:
        import matplotlib.image as mpimg

        for p in pngs:
            img = mpimg.imread(p)[..., :3]
            w.add_image(f"plots/{p.stem}", img, 0, dataformats="HWC")
    finally:
        w.close()


def write_report(bench: dict, out_dir: Path, usage=None) -> None:
    verdict = verdicts(bench)
    bench["verdicts"] = verdict
    atomic_write_text(out_dir / "bench.json", json.dumps(bench, indent=1, default=float))
    atomic_write_text(out_dir / "report.md", markdown(bench, verdict))
    pngs = plots(bench, out_dir, usage)
    tensorboard(bench, out_dir, pngs)


def table(bench: dict) -> str:
    """A compact terminal table: rows = representations/baselines, columns = each task's main metric."""
    tasks = list(bench["tasks"].items())
    head = ["name"] + [f"{t}:{MAIN[k]}" for t, k in tasks] + ["B/user"]
    rows = []
    for n, r in bench["results"].items():
        cells = [n] + [f"{r[t][MAIN[k]]:.4f}" if t in r and MAIN[k] in r[t] else "-" for t, k in tasks]
        cells.append(f"{r['bytes_per_user']:,.0f}" if r.get("bytes_per_user") else "-")
        rows.append(cells)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in rows])
