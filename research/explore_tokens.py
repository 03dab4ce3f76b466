"""Tokens worth their bytes: which user representation of at most 64 bytes wins.

Run:  python research/explore_tokens.py [--only NAME ...] [--fresh]
      (PYTHONPATH at the worktree; ~ a few minutes per representation on 2 busy cores)

On the protocol split of MovieLens-1M (``experiments/movielens-1m/data.yaml``, users 80/10/10,
last 20 % of each user's events = the future) it builds storage-matched baselines and candidate
token representations, probes every one with the bench's probes (logistic regression, C on
val; linear softmax next-item probe, weight decay and early stopping on val), and reports each
candidate against each baseline of equal or larger size with paired-bootstrap 95 % intervals
over the test users. Everything a representation learns (IDF, SVD, codebooks, item factors) is
fitted on the train users' histories only; test users are only ever encoded.

Figures go to ``bench-results/explore_tokens.json``; per-representation test scores are cached
under ``runs/explore_tokens/`` so a rerun only probes what is new (``--fresh`` drops the cache).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import RESULTS, ROOT, machine  # noqa: E402

from data_modules.store import atomic_write_json  # noqa: E402
from foundv2.bench import baselines as B  # noqa: E402
from foundv2.bench import probes as P  # noqa: E402
from foundv2.bench.run import BenchData, load_bench_data  # noqa: E402
from foundv2.nn.user_codes import UserCodesConfig, UserCodeTokenizer  # noqa: E402

CACHE = ROOT / "runs" / "explore_tokens"
TASK_METRIC = {"gender": "auc", "age": "accuracy", "occupation": "accuracy", "future_genres": "macro_auc",
               "next_items": "ndcg@10"}
K = 10  # NDCG cut-off of the headline next-item metric


# ------------------------------------------------------------------------------------ data
def load() -> BenchData:
    from data_modules.datamodule import UserDataModule

    dm = UserDataModule(dataset="movielens-1m", window_mode="events", window_size=8, text_encoder="minilm",
                        batch_size=64, max_windows=64, progress=False)
    dm.prepare_data()
    return load_bench_data(dm)


# ---------------------------------------------------------------------------------- probing
def next_item_user_ndcg(X, data: BenchData, epochs: int = 30, batch_size: int = 256) -> tuple[dict, np.ndarray]:
    """The bench's next-item probe (``fit_next_item_probe``) with per-test-user NDCG@10 kept for
    the paired bootstrap (NaN for a user with no future item outside the history)."""
    out: dict = {}
    m = P.fit_next_item_probe(X, data.history, data.future, data.split, epochs=epochs, batch_size=batch_size,
                              scores_out=out)
    test = P.split_indices(data.split)[2]
    nd = np.full(len(test), np.nan)
    nd[np.isin(test, P._users_with_targets(test, data.history, data.future))] = out["test"][f"ndcg@{K}"]
    return {"ndcg@10": m["ndcg@10"], "wd": m["weight_decay"], "val_ndcg@20": m["val_ndcg@20"]}, nd


def probe(name: str, make: Callable[[], object] | None, nbytes: float, data: BenchData,
          tasks: list[str] | None = None, fresh: bool = False) -> dict:
    """Each task's test metric and test scores; every (representation, task) is cached on its own,
    so a screening run on a few tasks is completed later without redoing them."""
    CACHE.mkdir(parents=True, exist_ok=True)
    res = {"bytes": float(nbytes), "metrics": {}, "scores": {}, "seconds": {}}
    X = None
    for task in data.tasks:
        path = CACHE / f"{name}.{task.name}.npz"
        if path.exists() and not fresh:
            z = np.load(path, allow_pickle=True)["res"].item()
        elif (tasks is None or task.name in tasks) and make is not None:
            X = make() if X is None else X
            t0 = time.perf_counter()
            if task.kind == "ranking":
                m, scores = next_item_user_ndcg(X, data)
                metric = m["ndcg@10"]
            else:
                out: dict = {}
                m = P.fit_label_probe(X, task.y, data.split, task.kind, scores_out=out)
                metric, scores = m[TASK_METRIC[task.name]], out["test"]
            z = {"bytes": float(nbytes), "metric": metric, "scores": scores, "seconds": time.perf_counter() - t0}
            np.savez(path, res=np.asarray(z, dtype=object))
            print(f"  {name} {task.name}={metric:.4f} ({z['seconds']:.0f}s)", flush=True)
        else:
            continue
        res["bytes"] = z["bytes"]
        res["metrics"][task.name] = z["metric"]
        res["scores"][task.name] = z["scores"]
        res["seconds"][task.name] = z["seconds"]
    return res


def compare(a: dict, b: dict, data: BenchData, n_boot: int = 1000) -> dict:
    """Per task: a - b with a paired-bootstrap 95 % interval over the test users."""
    test = P.split_indices(data.split)[2]
    out = {}
    for task in data.tasks:
        if task.name not in a["scores"] or task.name not in b["scores"]:
            continue
        sa, sb = a["scores"][task.name], b["scores"][task.name]
        if task.kind == "ranking":
            ok = ~np.isnan(sa)
            d = sa[ok] - sb[ok]
            rng = np.random.default_rng(0)
            boots = np.array([d[rng.integers(0, d.size, d.size)].mean() for _ in range(n_boot)])
            out[task.name] = {"delta": float(d.mean()), "lo": float(np.quantile(boots, 0.025)),
                              "hi": float(np.quantile(boots, 0.975))}
        else:
            r = P.paired_bootstrap(task.kind, sa, sb, task.y[test], metric=TASK_METRIC[task.name], n_boot=n_boot)
            out[task.name] = {k: r[k] for k in ("delta", "lo", "hi")}
    return out


# --------------------------------------------------------------------------- representations
def tfidf(data: BenchData) -> sp.csr_matrix:
    return tfidf_of(data.history, data)


def tfidf_of(bag: sp.csr_matrix, data: BenchData) -> sp.csr_matrix:
    """TF-IDF of a user × item bag, IDF from the train users (the bench's ``tfidf_features``)."""
    from foundv2.bench.baselines import tfidf_features

    return tfidf_features(bag, data.split)


def svd(X: sp.csr_matrix, data: BenchData, k: int, seed: int = 0) -> np.ndarray:
    """Truncated SVD fitted on the train users, applied to every user: ``[U, k]``."""
    from sklearn.decomposition import TruncatedSVD

    train = P.split_indices(data.split)[0]
    model = TruncatedSVD(k, algorithm="randomized", n_iter=7, random_state=seed).fit(X[train])
    return model.transform(X).astype(np.float32)


def recent_bag(data: BenchData, n: int) -> sp.csr_matrix:
    """0/1 bag of each user's ``n`` most recent history items."""
    rows = np.repeat(np.arange(len(data.sequences)), [len(s[-n:]) for s in data.sequences])
    cols = np.concatenate([s[-n:] for s in data.sequences])
    return sp.csr_matrix((np.ones(rows.size, np.float32), (rows, cols)), shape=data.history.shape)


def future_aligned(Z: np.ndarray, data: BenchData, k: int, lam: float = 10.0) -> np.ndarray:
    """Reduced-rank ridge regression from user vectors ``Z`` to the train users' future items:
    ``W = (ZᵀZ + λI)⁻¹ Zᵀ F`` on the train users, then the top-``k`` right singular directions of
    the fitted ``Z W``; returns ``Z W V_k`` ``[U, k]`` (the ``k``-d code of the predicted future).
    Only train users' futures are read."""
    train = P.split_indices(data.split)[0]
    Zt = Z[train].astype(np.float64)
    F = (data.future[train] != 0).astype(np.float64)
    W = np.linalg.solve(Zt.T @ Zt + lam * np.eye(Z.shape[1]), np.asarray((F.T @ Zt).T))
    R = np.linalg.qr(Zt, mode="r")  # Zt W = Q (R W): the same right singular vectors, a small SVD
    _, _, Vt = np.linalg.svd(R @ W, full_matrices=False)
    return (Z @ (W @ Vt[:k].T)).astype(np.float32)


def int8(V: np.ndarray, data: BenchData) -> np.ndarray:
    """The bench's per-dimension int8 (scales from the train users), dequantised."""
    from foundv2.bench.baselines import dequantise_int8, quantise_int8

    return dequantise_int8(*quantise_int8(V, P.split_indices(data.split)[0]))


def residual_codes(V: np.ndarray, data: BenchData, levels: int, codes: int = 256, iters: int = 20,
                   seed: int = 0) -> tuple[np.ndarray, np.ndarray, torch.nn.Module]:
    """Residual k-means codes of user vectors ``V`` with the project's quantizer
    (``ResidualGroupQuantizer``: k-means init from the train users' vectors, level by level on
    the residuals); returns (codes [U, L], decoded vectors [U, d], the quantizer)."""
    from foundv2.nn.quantizer import QuantizerConfig, ResidualGroupQuantizer

    train = P.split_indices(data.split)[0]
    q = ResidualGroupQuantizer(V.shape[1], ["user"], QuantizerConfig(
        n_shared_levels=levels, n_specific_levels=0, shared_codes=codes, kmeans_buffer=len(train),
        kmeans_iters=iters, respawn=False, data_init=False, seed=seed))
    z = torch.from_numpy(np.ascontiguousarray(V, dtype=np.float32))
    src = torch.zeros(len(z), dtype=torch.long)
    q.train()
    with torch.no_grad():
        q(z[train], src[train])  # fills the k-means buffer and initialises every level
        q.eval()
        out = q(z, src)
    return out.codes.numpy(), out.quantized.detach().numpy(), q


def product_codes(V: np.ndarray, data: BenchData, groups: int, codes: int = 256, iters: int = 20,
                  seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Product quantisation: ``V``'s dimensions cut into ``groups`` contiguous blocks, each block
    k-means coded (the quantizer's ``kmeans``) on the train users; (codes [U, G], decoded [U, d])."""
    from foundv2.nn.quantizer import _nearest, kmeans

    train = P.split_indices(data.split)[0]
    z = torch.from_numpy(np.ascontiguousarray(V, dtype=np.float32))
    gen = torch.Generator().manual_seed(seed)
    out_codes, out_dec = [], []
    for block in torch.tensor_split(z, groups, dim=1):
        c = kmeans(block[train].contiguous(), codes, iters, gen)
        idx = _nearest(block, c)
        out_codes.append(idx.numpy())
        out_dec.append(c[idx].numpy())
    return np.stack(out_codes, 1), np.concatenate(out_dec, 1)


def code_bag(codes: np.ndarray, n_codes: int, prefix_levels: int = 0) -> sp.csr_matrix:
    """One-hot of each level's code (level-namespaced), plus one-hot of the code prefixes
    (levels 0..1, 0..2, ... up to ``prefix_levels``), each prefix namespaced by its length."""
    U, L = codes.shape
    cols = [codes[:, li] + li * n_codes for li in range(L)]
    offset = L * n_codes
    for p in range(2, prefix_levels + 1):
        key = np.zeros(U, np.int64)
        for li in range(p):
            key = key * n_codes + codes[:, li]
        _, inv = np.unique(key, return_inverse=True)
        cols.append(inv + offset)
        offset += inv.max() + 1
    c = np.stack(cols, 1)
    r = np.repeat(np.arange(U), c.shape[1])
    return sp.csr_matrix((np.ones(r.size, np.float32), (r, c.ravel())), shape=(U, offset))


# ------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", nargs="*", default=None, help="representation names (prefix match)")
    ap.add_argument("--tasks", nargs="*", default=None, help="probe only these tasks (a screening run)")
    ap.add_argument("--fresh", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    logging.basicConfig(level=logging.WARNING)
    data = load()
    X = tfidf(data)
    cache: dict[str, np.ndarray] = {}

    def svd_k(k: int) -> np.ndarray:
        if k not in cache:
            cache[k] = svd(X, data, k)
        return cache[k]

    reps: dict[str, tuple[Callable[[], object], float]] = {}
    for k in (8, 16, 32, 64):
        # the bench's official storage-matched baselines (foundv2.bench.baselines)
        reps[f"tfidf_svd{k}_int8"] = (lambda k=k: B.dequantise_int8(*B.tfidf_svd_int8(data.history, data.split, k)), k)
        reps[f"top_items{k}"] = (lambda k=k: B.top_items(data.history, k), k)
    for d in (64, 128):
        for L in (8, 16, 32, 64):
            def rq(d=d, L=L):
                c, dec, _ = residual_codes(svd_k(d), data, L)
                return c, dec
            reps[f"rq_svd{d}_L{L}_dec"] = (lambda rq=rq: rq()[1], L)
            reps[f"rq_svd{d}_L{L}_bag"] = (lambda rq=rq: code_bag(rq()[0], 256), L)
            reps[f"rq_svd{d}_L{L}_bagdec"] = (
                lambda rq=rq: sp.hstack([code_bag(rq()[0], 256), sp.csr_matrix(rq()[1] / np.abs(rq()[1]).max())],
                                        format="csr"), L)
    Xr = tfidf_of(recent_bag(data, 30), data)
    cache["r128"] = None

    def recent_k(k: int) -> np.ndarray:
        if ("r", k) not in cache:
            cache[("r", k)] = svd(Xr, data, k)
        return cache[("r", k)]

    def both(k: int) -> np.ndarray:
        return np.concatenate([svd_k(k), recent_k(k)], 1)

    def fa(k: int) -> np.ndarray:
        if ("fa", k) not in cache:
            cache[("fa", k)] = future_aligned(np.concatenate([svd_k(128), recent_k(128)], 1), data, k)
        return cache[("fa", k)]

    for k in (16, 64):
        reps[f"svd{k}_recent{k}_float"] = (lambda k=k: both(k), 8 * k)
        reps[f"fa{k}_float"] = (lambda k=k: fa(k), 4 * k)
        reps[f"fa{k}_int8"] = (lambda k=k: int8(fa(k), data), k)
    train = P.split_indices(data.split)[0]

    def unit(V: np.ndarray) -> np.ndarray:  # mean squared row norm 1 over the train users
        return V / np.sqrt((V[train] ** 2).sum(1).mean())

    def svdfa(k: int) -> np.ndarray:
        return np.concatenate([unit(svd_k(k)), unit(fa(k))], 1)

    for k in (16, 32):
        reps[f"rq_svdfa{k}_L{k}_dec"] = (lambda k=k: residual_codes(svdfa(k), data, k)[1], k)
        reps[f"svdfa{k // 2}_int8"] = (lambda k=k: int8(svdfa(k // 2), data), k)
    for src, fn in (("both64", lambda: both(64)), ("fa64", lambda: fa(64)), ("fa128", lambda: fa(128))):
        for L in (8, 16, 64):
            reps[f"rq_{src}_L{L}_dec"] = (lambda fn=fn, L=L: residual_codes(fn(), data, L)[1], L)
            reps[f"pq_{src}_G{L}_dec"] = (lambda fn=fn, L=L: product_codes(fn(), data, L)[1], L)
    for d, G in ((64, 16), (64, 8), (128, 64), (64, 64)):
        reps[f"pq_svd{d}_G{G}_dec"] = (lambda d=d, G=G: product_codes(svd_k(d), data, G)[1], G)
        reps[f"pq_svd{d}_G{G}_bag"] = (lambda d=d, G=G: code_bag(product_codes(svd_k(d), data, G)[0], 256), G)
    for k in (16, 64, 128):
        reps[f"svd{k}_float"] = (lambda k=k: svd_k(k), 4 * k)
    # the shipped user-level tokenizer (foundv2.nn.user_codes), fitted on the train users only:
    # ut_h<history>_f<future>_L<levels> (residual codes) and ..._pq (one code per block of dims)
    futures = [data.future[u].indices for u in range(data.future.shape[0])]

    def user_vectors(h: int, f: int, fd: int = 128, r: int = 30) -> tuple[np.ndarray, object]:
        key = ("ut", h, f, fd, r)
        if key not in cache:
            cfg = UserCodesConfig(factor_dim=fd, history_dim=h, future_dim=f, recent_items=r, levels=1, codes=2)
            tok = UserCodeTokenizer(data.history.shape[1], cfg)
            tok.fit([data.sequences[u] for u in train], [futures[u] for u in train])
            cache[key] = tok.vectors(data.sequences).numpy()
        return cache[key]

    for h, f, L in ((16, 16, 16), (32, 32, 64), (64, 64, 64), (96, 32, 64), (48, 16, 64), (112, 16, 64),
                    (64, 32, 64), (80, 48, 64)):
        reps[f"ut_h{h}_f{f}_L{L}"] = (lambda h=h, f=f, L=L: residual_codes(user_vectors(h, f), data, L)[1], L)
        reps[f"ut_h{h}_f{f}_L{L}_pq"] = (lambda h=h, f=f, L=L: product_codes(user_vectors(h, f), data, L)[1], L)
        reps[f"ut_h{h}_f{f}_int8"] = (lambda h=h, f=f: int8(user_vectors(h, f), data), h + f)
    wanted = [n for n in reps if args.only is None or any(n.startswith(o) for o in args.only)]
    results = {}
    for name in wanted:
        make, nbytes = reps[name]
        results[name] = probe(name, make, nbytes, data, args.tasks, args.fresh)
    # every cached representation takes part in the comparison
    for path in sorted(CACHE.glob("*.npz")):
        stem = path.name.split(".")[0]
        if stem not in results:
            results[stem] = probe(stem, None, 0, data)
    baselines = [n for n in results if n.startswith(("tfidf_svd", "top_items"))]
    table, verdicts = {}, {}
    for name, r in sorted(results.items(), key=lambda kv: (kv[1]["bytes"], kv[0])):
        table[name] = {"bytes": r["bytes"], **r["metrics"]}
        print(f"{name:34s} {r['bytes']:6.0f} B  " + "  ".join(f"{k}={v:.4f}" for k, v in r["metrics"].items()))
    for name, r in results.items():
        if name in baselines:
            continue
        verdicts[name] = {}
        for b in baselines:
            if results[b]["bytes"] < r["bytes"]:
                continue
            verdicts[name][b] = compare(r, results[b], data)
    for name, vs in verdicts.items():
        for b, c in vs.items():
            cells = [f"{t}:{v['delta']:+.4f}[{v['lo']:+.4f},{v['hi']:+.4f}]" for t, v in c.items()]
            n_up = sum(v["lo"] > 0 for v in c.values())
            n_down = sum(v["hi"] < 0 for v in c.values())
            print(f"{name} vs {b}: above {n_up}, below {n_down}  " + " ".join(cells))
    RESULTS.mkdir(exist_ok=True)
    atomic_write_json(RESULTS / "explore_tokens.json",
                      {"benchmark": "explore_tokens", "machine": machine(), "table": table, "verdicts": verdicts,
                       "config": {"data": "experiments/movielens-1m/data.yaml", "split_seed": 0}}, default=float)


if __name__ == "__main__":
    main()
