"""The bench's outputs: report.md (tables + verdicts with paired intervals), PNG plots of each task's
metric against bytes per user with the Pareto front, TensorBoard scalars, and bench.json (last).

Verdict rule: per task, the best token row (or, without tokens, the best learned representation)
is compared with every other row of equal or larger size (bytes per user; rows over the full
history count as larger) by a paired bootstrap over the test users
(:func:`foundv2.bench.probes.paired_bootstrap`, 1000 resamples): it *beats* a row when the 95 %
interval of the difference lies above 0, *loses* when it lies below, and it is a *tie* otherwise.
A task is flagged as *too small to tell* when it has fewer than :data:`MIN_TEST_USERS` test users
or an interval wider than :data:`MAX_CI_WIDTH` (in the metric's units).
"""

from __future__ import annotations

import argparse
import json
import sys
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
MIN_TEST_USERS = 100
MAX_CI_WIDTH = 0.10
N_BOOT = 1000
TOKENS = ("tokens_bag", "tokens_sum")


def _kind(name: str, row: dict) -> str:
    """A row's kind (bench.json rows carry it; older ones are told by name)."""
    if "kind" in row:
        return row["kind"]
    return "tokens" if name in TOKENS else "representation" if name == "pooled" else "baseline"


def _word(lo: float, hi: float) -> str:
    return "beats" if lo > 0 else "loses" if hi < 0 else "tie"


def _fmt_interval(c: dict) -> str:
    return f"{c['delta']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def _compare(kind: str, key: str, a, b, y) -> dict | None:
    """``a − b`` on ``key`` over the same test users with its paired 95 % interval and verdict;
    None when either score set is missing or they cover different users."""
    from foundv2.bench.probes import paired_bootstrap

    if a is None or b is None or len(a) != len(b):
        return None
    ci = paired_bootstrap(kind, a, b, y, metric=key, n_boot=N_BOOT)
    return {"delta": ci["delta"], "lo": ci["lo"], "hi": ci["hi"], "verdict": _word(ci["lo"], ci["hi"])}


def verdicts(bench: dict, scores, labels: dict) -> dict[str, dict]:
    """Per task: the best token row against every row of equal or larger size, with paired intervals.

    Args:
        bench: the bench dict (``results``, ``tasks``).
        scores: ``(row, task) → test scores`` (None when missing): classification scores, or
            per-user values of the ranking metric.
        labels: ``task → test labels`` (classification tasks).
    """
    res = bench["results"]
    n_test = bench["split_sizes"]["test"]
    out = {}
    for task, kind in bench["tasks"].items():
        key = MAIN[kind]
        have = {n: r for n, r in res.items() if isinstance(r.get(task), dict) and key in r[task]}
        kinds = {n: _kind(n, r) for n, r in have.items()}
        pool = [n for n in have if kinds[n] == "tokens"] or [n for n in have if kinds[n] == "representation"]
        if not pool:
            continue
        best = max(pool, key=lambda n: have[n][task][key])
        size = have[best].get("bytes_per_user")
        a = scores(best, task)
        comparisons = []
        for n, r in have.items():
            if n == best or kinds[n] == kinds[best]:
                continue
            b_size = r.get("bytes_per_user")
            if size is not None and b_size is not None and b_size < size:
                continue
            c = _compare(kind, key, a, scores(n, task), labels.get(task))
            if c is not None:
                comparisons.append({"baseline": n, "bytes_per_user": b_size, "value": r[task][key], **c})
        comparisons.sort(key=lambda c: -c["value"])
        warn = []
        n_eval = len(a) if a is not None else n_test
        if n_eval < MIN_TEST_USERS:
            warn.append(f"only {n_eval} test users (< {MIN_TEST_USERS}): differences of a few points cannot be "
                        f"told apart")
        widths = [c["hi"] - c["lo"] for c in comparisons if np.isfinite(c["hi"] - c["lo"])]
        if widths and max(widths) > MAX_CI_WIDTH:
            warn.append(f"paired intervals up to {max(widths):.3f} wide (> {MAX_CI_WIDTH}): the test split is too "
                        f"small to tell these representations apart")
        count = {w: sum(c["verdict"] == w for c in comparisons) for w in ("beats", "tie", "loses")}
        out[task] = {"metric": key, "best": best, "value": have[best][task][key], "bytes_per_user": size,
                     "test_users": int(n_eval), "comparisons": comparisons, "count": count, "warnings": warn}
    return out


def row_verdicts(bench: dict, scores, labels: dict) -> dict[str, dict]:
    """Every learned row (a representation or token row) per task against two baselines: the best
    baseline of at most its size (``by_size``; for an unbounded row, any) and the best baseline of
    any size (``best``), each with its paired interval on the task's main metric (the metric the
    tables show). ``row → task → {"by_size": c, "best": c}``, ``c`` as in :func:`verdicts`."""
    res = bench["results"]
    out: dict[str, dict] = {}
    for task, kind in bench["tasks"].items():
        key = MAIN[kind]
        have = {n: r for n, r in res.items() if isinstance(r.get(task), dict) and key in r[task]}
        base = sorted((n for n in have if _kind(n, have[n]) == "baseline"), key=lambda n: -have[n][task][key])
        for n, r in have.items():
            if _kind(n, r) == "baseline":
                continue
            size = r.get("bytes_per_user")
            fits = [b for b in base if size is None or (have[b].get("bytes_per_user") is not None
                                                         and have[b]["bytes_per_user"] <= size)]
            a = scores(n, task)
            pair = {}
            for which, b in (("by_size", fits[0] if fits else None), ("best", base[0] if base else None)):
                c = _compare(kind, key, a, scores(b, task), labels.get(task)) if b is not None else None
                if c is not None:
                    pair[which] = {"baseline": b, "bytes_per_user": have[b].get("bytes_per_user"),
                                   "value": have[b][task][key], **c}
            if pair:
                out.setdefault(n, {})[task] = {"metric": key, "value": r[task][key], **pair}
    return out


def pair_lines(pairs: dict) -> list[str]:
    """One line per ``--bench.compare`` pair and task: a − b with its paired interval."""
    return [f"{p['a']} vs {p['b']} {task} ({p.get('metric', '')}): {_word(p['lo'], p['hi'])} {_fmt_interval(p)}"
            for task, rows in pairs.items() for p in rows]


def row_verdict_lines(rows: dict) -> list[str]:
    """One line per learned row and task: against the best baseline of at most its size, and the best of any size."""
    lines = []
    for n, tasks in rows.items():
        for task, v in tasks.items():
            parts = []
            for which, what in (("by_size", "best of its size"), ("best", "best of any size")):
                c = v.get(which)
                if c and not (which == "best" and v.get("by_size", {}).get("baseline") == c["baseline"]):
                    parts.append(f"{c['verdict']} {c['baseline']} ({what}, {_size(c['bytes_per_user'])} B) "
                                 f"{_fmt_interval(c)}")
            lines.append(f"{n} {task} ({v['metric']} {v['value']:.4f}): " + "; ".join(parts))
    return lines


#: the storage-matched baselines (foundv2.bench.baselines): what a token row must match at its budget
STORAGE_MATCHED = ("tfidf_svd", "top_items")


def budget_verdicts(bench: dict, scores, labels: dict, budgets) -> dict[str, dict]:
    """Per budget ``B`` (bytes per user): each token row of at most ``B`` bytes against every
    storage-matched baseline (``tfidf_svd<k>_int8``, ``top_items<b>``) of exactly ``B`` bytes, on
    every task, with paired intervals. A row *meets* the budget when on every task against every
    such baseline the interval of the difference is not below 0 (tie or beats) and it beats each
    of them on at least two tasks. ``best`` is the row that meets it, else the one with the fewest
    losses and then the most wins.
    """
    res, tasks = bench["results"], bench["tasks"]
    out = {}
    for budget in sorted({int(b) for b in budgets}):
        refs = [n for n, r in res.items() if n.startswith(STORAGE_MATCHED) and r.get("bytes_per_user") == budget]
        rows = [n for n, r in res.items() if _kind(n, r) == "tokens" and r.get("bytes_per_user") is not None
                and r["bytes_per_user"] <= budget]
        if not refs or not rows:
            continue
        per_row = {}
        for n in rows:
            cells, ok, wins = [], True, {b: 0 for b in refs}
            for task, kind in tasks.items():
                key = MAIN[kind]
                a = scores(n, task)
                for b in refs:
                    c = _compare(kind, key, a, scores(b, task), labels.get(task))
                    if c is None:
                        ok = False
                        continue
                    ok &= c["verdict"] != "loses"
                    wins[b] += c["verdict"] == "beats"
                    cells.append({"task": task, "metric": key, "baseline": b, **c})
            losses = sum(c["verdict"] == "loses" for c in cells)
            per_row[n] = {"bytes_per_user": res[n]["bytes_per_user"], "meets": ok and min(wins.values()) >= 2,
                          "losses": losses, "wins": sum(wins.values()), "comparisons": cells}
        best = max(per_row, key=lambda n: (per_row[n]["meets"], -per_row[n]["losses"], per_row[n]["wins"]))
        out[str(budget)] = {"baselines": refs, "best": best, "meets": per_row[best]["meets"], "rows": per_row}
    return out


def budget_line(budget: str, v: dict) -> str:
    """One line per budget: the best token row, met or not, and its shortfalls."""
    row = v["rows"][v["best"]]
    short = [f"{c['task']} vs {c['baseline']} {_fmt_interval(c)}" for c in row["comparisons"] if c["verdict"] == "loses"]
    return (f"≤ {budget} B/user: {v['best']} ({_size(row['bytes_per_user'])} B) "
            f"{'meets' if v['meets'] else 'misses'} the budget against {', '.join(v['baselines'])}: "
            f"{row['wins']} wins, {row['losses']} losses" + (f" ({'; '.join(short)})" if short else ""))


def users_line(users: dict) -> str:
    """Which users the probes and baselines learned from, chose on and were scored on."""
    tr, va, te = users["train"], users["val"], users["test"]
    of = lambda part: "all" if part["read"] == part["users"] else f"a seeded sample of {part['read']:,} of the"  # noqa: E731
    return (f"Probes and baselines fitted on {of(tr)} {tr['users']:,} train users, chosen on {of(va)} "
            f"{va['users']:,} validation users; every metric on all {te['users']:,} test users.")


def not_run_lines(bench: dict, markdown: bool = False) -> list[str]:
    """The rows not run at this size, each with why (none: no lines)."""
    rows = bench.get("not_run") or {}
    if not rows:
        return []
    if markdown:
        return ["## Not run at this size", "", *[f"- **{n}**: {why}." for n, why in rows.items()], ""]
    return ["", "not run at this size:", *[f"{n}: {why}" for n, why in rows.items()]]


def _size(b) -> str:
    return "unbounded" if b is None else f"{b:,.0f}"


def verdict_line(task: str, v: dict) -> str:
    """One line: the best row's record against rows of its size or larger, with the strongest one's interval."""
    c = v["count"]
    head = (f"{task} ({v['metric']}): {v['best']} at {_size(v['bytes_per_user'])} B/user "
            f"beats {c['beats']}, ties {c['tie']}, loses {c['loses']} of {len(v['comparisons'])} rows of its size or larger")
    if v["comparisons"]:
        top = v["comparisons"][0]
        head += f"; vs the strongest ({top['baseline']}): {_fmt_interval(top)} {top['verdict']}"
    if v["warnings"]:
        head += " [too small to tell]"
    return head


def markdown(bench: dict, verdict: dict, pngs: list[Path]) -> str:
    res = bench["results"]
    lines = [
        f"# {bench['protocol']} on {bench['dataset']}",
        "",
        f"Users train/val/test: {bench['split_sizes']}; items: {bench['num_items']}; seed {bench['seed']}; "
        f"{bench['seconds']:.0f} s on {bench['machine']['cores']} cores.",
        "",
        *([users_line(bench["users"]), ""] if bench.get("users") else []),
        *[f"- {n}" for n in bench.get("notes", [])],
        "",
        *not_run_lines(bench, markdown=True),
        "Verdicts: the best token row (or learned representation, without tokens) against every row of equal or "
        f"larger size, by the paired bootstrap over the test users ({N_BOOT} resamples): *beats* when the 95 % "
        "interval of the difference is above 0, *loses* below, *tie* when it includes 0. A task is too small to "
        f"tell when it has < {MIN_TEST_USERS} test users or an interval wider than {MAX_CI_WIDTH}.",
        "",
        "Bytes per user: tokens as stored (the tokens' report); float32 features 4 × dim; `tfidf_svd<k>_int8` k "
        "(its k scales are shared); `top_items<b>` b (uint16 ids, padded); `tfidf` its mean sparse (id, weight) "
        "storage; `majority`/`popularity` 0; EASE, item-kNN and SASRec read the full history (unbounded). "
        "Collisions (token rows): the share of windows (of users, for user-level tokens) whose whole code tuple "
        "another one shares, from the tokens' report; a collision is information the tokens cannot carry.",
        "",
    ]
    budgets = bench.get("budgets") or {}
    if budgets:
        lines += ["## Storage budgets", "",
                  "Each token row of at most B bytes per user against the storage-matched baselines of exactly B "
                  "bytes, every task (paired 95 % intervals). It meets the budget when it loses nowhere and beats "
                  "each baseline on at least two tasks.", ""]
        for budget, v in budgets.items():
            lines += [budget_line(budget, v) + ".", "", "| row | task | vs | Δ | 95 % interval | verdict |",
                      "|---|---|---|---|---|---|"]
            for n, r in v["rows"].items():
                lines += [f"| {n} | {c['task']} ({c['metric']}) | {c['baseline']} | {c['delta']:+.4f} | "
                          f"[{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['verdict']} |" for c in r["comparisons"]]
            lines.append("")
    if bench.get("row_verdicts"):
        lines += ["## Every learned row against the baselines", "",
                  "Each learned row against the best baseline of at most its size and the best baseline of any size, "
                  "on the metric the tables show (paired 95 % intervals over the test users).", "",
                  *[f"- {line}" for line in row_verdict_lines(bench["row_verdicts"])], ""]
    if bench.get("pairs"):
        lines += ["## Pairs asked for (`--bench.compare`)", "", *[f"- {line}" for line in pair_lines(bench["pairs"])], ""]
    combined = [p for p in pngs if p.name == "metric_vs_bytes.png"]
    if combined:
        lines += [f"![metric against bytes per user]({combined[0].name})", ""]
    for task, kind in bench["tasks"].items():
        cols = METRICS[kind]
        rows = [(n, r[task]) for n, r in res.items() if isinstance(r.get(task), dict)]
        if not rows:
            continue
        lines += [
            f"## {task} ({kind})",
            "",
            "| representation | " + " | ".join(cols) + " | bytes/user | collisions |",
            "|---|" + "---|" * (len(cols) + 2),
        ]
        for n, r in sorted(rows, key=lambda nr: -nr[1].get(MAIN[kind], -1)):
            cells = " | ".join(f"{r[c]:.4f}" if c in r else "" for c in cols)
            lines.append(f"| {n} | {cells} | {_size(res[n].get('bytes_per_user'))} | {_collide(res[n])} |")
        v = verdict.get(task)
        if v:
            lines += ["", verdict_line(task, v) + ".", ""]
            if v["comparisons"]:
                lines += [f"| {v['best']} vs | bytes/user | {v['metric']} | Δ | 95 % interval | verdict |",
                          "|---|---|---|---|---|---|"]
                lines += [f"| {c['baseline']} | {_size(c['bytes_per_user'])} | {c['value']:.4f} | {c['delta']:+.4f} | "
                          f"[{c['lo']:+.4f}, {c['hi']:+.4f}] | {c['verdict']} |" for c in v["comparisons"]]
            for w in v["warnings"]:
                lines += ["", f"**Warning:** {w}."]
        lines.append("")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats with fewer or equal bytes: sorted by bytes, each strictly
    better than every smaller one (ties in bytes: the best value)."""
    front: list[tuple[float, float]] = []
    for b, v in sorted(points, key=lambda p: (p[0], -p[1])):
        if not front or v > front[-1][1]:
            front.append((b, v))
    return front


COLOURS = {"tokens": "tab:red", "representation": "tab:blue", "baseline": "tab:grey"}


def _draw(ax, bench: dict, task: str, kind: str) -> bool:
    res = bench["results"]
    key = MAIN[kind]
    have = [(n, r) for n, r in res.items() if isinstance(r.get(task), dict) and key in r[task]]
    pts = [(n, r["bytes_per_user"], r[task][key], _kind(n, r)) for n, r in have if r.get("bytes_per_user")]
    lines = [(n, r[task][key]) for n, r in have if not r.get("bytes_per_user")]
    if not pts and not lines:
        return False
    for n, b, v, k in pts:
        ax.scatter(b, v, s=30, color=COLOURS.get(k, "black"), zorder=3)
        ax.annotate(n, (b, v), textcoords="offset points", xytext=(3, 3), fontsize=6)
    front = pareto_front([(b, v) for _, b, v, _ in pts])
    if front:
        xs = [b for b, _ in front] + [max(b for _, b, _, _ in pts) * 1.5]
        ys = [v for _, v in front] + [front[-1][1]]
        ax.step(xs, ys, where="post", color="black", lw=0.8, alpha=0.6, label="Pareto front")
    for n, v in lines:
        size = res[n].get("bytes_per_user")
        ax.axhline(v, ls="--", lw=0.7, color="grey")
        ax.annotate(f"{n} ({'0 B' if size == 0 else 'full history'})", (0.01, v), xycoords=("axes fraction", "data"),
                    fontsize=6, color="grey", va="bottom")
    if pts:
        ax.set_xscale("log")
    ax.set_xlabel("bytes per user (log)")
    ax.set_ylabel(key)
    ax.set_title(task, fontsize=9)
    return True


def plots(bench: dict, out_dir: Path, usage=None) -> list[Path]:
    """One PNG per task (``<task>_vs_bytes.png``), all tasks in ``metric_vs_bytes.png``, and the code usage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    tasks = list(bench["tasks"].items())
    for task, kind in tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        if _draw(ax, bench, task, kind):
            ax.set_title(f"{bench['dataset']}: {task}")
            fig.tight_layout()
            p = out_dir / f"{task}_vs_bytes.png"
            fig.savefig(p, dpi=110)
            paths.append(p)
        plt.close(fig)
    if tasks:
        cols = min(3, len(tasks))
        nrow = -(-len(tasks) // cols)
        fig, axes = plt.subplots(nrow, cols, figsize=(5 * cols, 3.6 * nrow), squeeze=False)
        for ax, (task, kind) in zip(axes.ravel(), tasks, strict=False):
            _draw(ax, bench, task, kind)
        for ax in axes.ravel()[len(tasks):]:
            ax.axis("off")
        fig.suptitle(f"{bench['dataset']}: each task's metric against bytes per user (red: tokens, blue: learned, "
                     f"grey: baselines; line: Pareto front)", fontsize=9)
        fig.tight_layout()
        p = out_dir / "metric_vs_bytes.png"
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
    try:
        for name, r in bench["results"].items():
            for task, m in r.items():
                if isinstance(m, dict):
                    for k, v in m.items():
                        if isinstance(v, (int, float)) and k != "seconds":
                            w.add_scalar(f"bench/{task}/{k}/{name}", float(v), 0)
        import matplotlib.image as mpimg

        for p in pngs:
            img = mpimg.imread(p)[..., :3]
            w.add_image(f"plots/{p.stem}", img, 0, dataformats="HWC")
    finally:
        w.close()


def write_report(bench: dict, out_dir: Path, usage=None, labels: dict | None = None) -> None:
    """Verdicts, report.md, plots, TensorBoard, and bench.json last: it marks the bench complete."""
    from foundv2.bench.run import load_scores

    bench["verdicts"] = verdicts(bench, lambda row, task: load_scores(out_dir, row, task), labels or {})
    bench["row_verdicts"] = row_verdicts(bench, lambda row, task: load_scores(out_dir, row, task), labels or {})
    bench["budgets"] = budget_verdicts(bench, lambda row, task: load_scores(out_dir, row, task), labels or {},
                                       bench.get("storage_bytes") or ())
    pngs = plots(bench, out_dir, usage)
    atomic_write_text(out_dir / "report.md", markdown(bench, bench["verdicts"], pngs))
    tensorboard(bench, out_dir, pngs)
    atomic_write_text(out_dir / "bench.json", json.dumps(bench, indent=1, default=float))


def _collide(row: dict) -> str:
    """A token row's whole-tuple collision rate (the share of windows, or users, whose code tuple
    another one shares), as a percentage; '-' for rows that are not tokens."""
    rate = row.get("collision_rate")
    return "-" if rate is None else f"{100 * rate:.0f}%"


def table(bench: dict) -> str:
    """A compact terminal table (:func:`rows_table`), then one verdict line per task with its
    paired interval, every learned row's verdicts, the pairs asked for, the storage budgets and
    the rows not run."""
    out = [rows_table(bench)]
    verdict = bench.get("verdicts") or {}
    if verdict:
        out += ["", "verdicts (Δ [95 % paired interval]; beats/loses only when the interval excludes 0):"]
        out += [verdict_line(t, v) for t, v in verdict.items()]
    if bench.get("row_verdicts"):
        out += ["", "every learned row against the baselines (beats/loses only when the 95 % paired interval excludes 0):"]
        out += row_verdict_lines(bench["row_verdicts"])
    if bench.get("pairs"):
        out += ["", "pairs asked for (--bench.compare; a − b, paired 95 % interval):", *pair_lines(bench["pairs"])]
    if bench.get("budgets"):
        out += ["", "storage budgets (a token row of at most B bytes per user meets B when, against the storage-"
                    "matched baselines of exactly B bytes, it loses on no task and beats each on at least two):"]
        out += [budget_line(b, v) for b, v in bench["budgets"].items()]
    out += not_run_lines(bench)
    return "\n".join(out)


def main_value(row: dict, task: str, kind: str) -> float | None:
    """A row's figure on a task's main metric (:data:`MAIN`); None when the row has none."""
    r = row.get(task)
    return r[MAIN[kind]] if isinstance(r, dict) and MAIN[kind] in r else None


def _fmt_value(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def rows_table(bench: dict) -> str:
    """The rows (representations and baselines) by columns (each task's main metric, bytes per
    user and, with token rows, their collision rate): what :func:`table` starts with and the
    README shows."""
    tasks = list(bench["tasks"].items())
    collide = any("collision_rate" in r for r in bench["results"].values())
    head = ["name"] + [f"{t}:{MAIN[k]}" for t, k in tasks] + ["B/user"] + (["collide"] if collide else [])
    rows = []
    for n, r in bench["results"].items():
        cells = [n] + [_fmt_value(main_value(r, t, k)) for t, k in tasks]
        if all(c == "-" for c in cells[1:]):
            continue  # a row with no task to show (its tasks were skipped at this data set)
        cells.append(_size(r.get("bytes_per_user")))
        if collide:
            cells.append(_collide(r))
        rows.append(cells)
    widths = [max(len(x[i]) for x in [head] + rows) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join(fmt(c).rstrip() for c in [head, ["-" * w for w in widths], *rows])


def block_markers(name: str, command: str) -> tuple[str, str]:
    """The HTML comments around a block of a markdown file that ``command`` writes."""
    return f"<!-- {name}: written by `{command}`, do not edit -->", f"<!-- end of {name} -->"


def with_block(text: str, name: str, command: str, body: str, append: bool = False) -> str:
    """``text`` with its block ``name`` (between :func:`block_markers`) holding ``body``; with
    ``append``, a missing block is added at the end, else a missing block is an error."""
    begin, end = block_markers(name, command)
    if begin not in text or end not in text:
        if not append:
            raise ValueError(f"no block between {begin!r} and {end!r}")
        return f"{text.rstrip()}\n\n{begin}\n{body}\n{end}\n"
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def block(text: str, name: str, command: str) -> str:
    """What the block ``name`` of ``text`` holds (see :func:`with_block`)."""
    begin, end = block_markers(name, command)
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def write_block(path: str | Path, name: str, command: str, body: str) -> None:
    """Write ``body`` into the block ``name`` of the markdown file ``path`` (added at its end when
    the file has none yet): how a benchmark puts its table into docs/ under the command that
    measured it."""
    path = Path(path)
    atomic_write_text(path, with_block(path.read_text(), name, command, body, append=True))


def summary_table(bench: dict) -> str:
    """The README's summary of a bench, as markdown: per storage budget the best token row of at
    most that size (``budgets`` ``best``) beside each storage-matched baseline of exactly that
    size; then, with no size limit, the best learned row and the best baseline of each task."""
    res, tasks = bench["results"], bench["tasks"]
    head = "| budget | row | " + " | ".join(f"{t} {MAIN[k]}" for t, k in tasks.items()) + " |"
    lines = [head, "|---" * (len(tasks) + 2) + "|"]

    for budget, v in (bench.get("budgets") or {}).items():
        for name in [v["best"], *v["baselines"]]:
            met = "meets the budget" if v["meets"] else "misses the budget"
            label = f"`{name}` (ours, {met})" if name == v["best"] else f"`{name}`"
            lines.append(f"| {budget} B | {label} | "
                         + " | ".join(_fmt_value(main_value(res[name], t, k)) for t, k in tasks.items()) + " |")
    learned = [n for n, r in res.items() if _kind(n, r) != "baseline" and n != "pooled"]
    baselines = [n for n, r in res.items() if _kind(n, r) == "baseline"]
    for label, names in (("best of ours per task", learned), ("best baseline per task", baselines)):
        cells = []
        for task, kind in tasks.items():
            have = {n: v for n in names if (v := main_value(res[n], task, kind)) is not None}
            best = max(have, key=have.__getitem__, default=None)
            cells.append("-" if best is None else f"`{best}` {_fmt_value(have[best])}")
        lines.append(f"| unbounded | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the README block that holds ``make demo``'s table (rewritten by ``make readme``)
README_BLOCK = ("make demo's table", "make readme")
README_BEGIN, README_END = block_markers(*README_BLOCK)


def readme_with_table(readme: str, bench: dict) -> str:
    """``readme`` with its :data:`README_BLOCK` holding ``bench``'s rows table
    (:func:`rows_table`), as ``make demo`` prints it first."""
    return with_block(readme, *README_BLOCK, f"```\n{rows_table(bench)}\n```")


def readme_table(readme: str) -> str:
    """The table inside the README block (what :func:`readme_with_table` wrote)."""
    return block(readme, *README_BLOCK).strip().removeprefix("```").removesuffix("```").strip("\n")


#: the docs block that holds ``make demo``'s whole console table (rows, verdicts, budgets)
DOCS_BLOCK = ("make demo's bench", "make readme")


def main(argv: list[str]) -> int:
    """``python -m foundv2.bench.report <bench.json> [--readme README.md] [--docs docs/benchmarks.md]``:
    print the table of a finished run; with ``--readme``, also write its rows into that README's
    block, with ``--docs`` the whole table (verdicts included) into that page's block. A missing or
    unreadable file is a one-line error and exit status 2."""
    ap = argparse.ArgumentParser(prog="python -m foundv2.bench.report", description="the table of a finished bench")
    ap.add_argument("bench_json", type=Path)
    ap.add_argument("--readme", type=Path, help="also write the rows into this README's block")
    ap.add_argument("--docs", type=Path, help="also write the whole table into this docs page's block")
    try:
        args = ap.parse_args(argv)
    except SystemExit as stop:  # usage errors: argparse printed the usage and why
        return int(stop.code or 0)
    path = args.bench_json
    targets = {flag: target for flag, target in (("--readme", args.readme), ("--docs", args.docs)) if target}
    try:
        bench = json.loads(path.read_text())
        text = table(bench)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        print(f"foundv2: error: {path}: not a finished bench's bench.json ({type(err).__name__}: {err}); "
              f"pass the bench.json of a finished run (the bench writes it last).", file=sys.stderr)
        return 2
    print(text)
    writers = {"--readme": lambda doc: readme_with_table(doc, bench),
               "--docs": lambda doc: with_block(doc, *DOCS_BLOCK, f"```\n{text}\n```")}
    for flag, target in targets.items():
        try:
            atomic_write_text(target, writers[flag](target.read_text()))
        except (OSError, ValueError) as err:
            print(f"foundv2: error: {target}: {err}", file=sys.stderr)
            return 2
        print(f"wrote the table into {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
