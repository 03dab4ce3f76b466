"""Tokens appended one window at a time (``foundv2 tokenize --append``).

- the Q-Former's cached window pass (:meth:`CausalQFormer.forward_window`) equals the full pass;
- on a toy synthetic world built through the real CLI (stage 1 fit + predict, tokenizer fit +
  tokenize): appending new days gives bit-identical earlier codes, the new windows' codes equal a
  full re-tokenize of the whole history, a second append reuses the cache, and stage 3's states of
  the earlier windows do not change;
- bad input (unknown users, events older than the last window, another tokenizer or stage 1, too
  many windows, a bad events file) is a one-paragraph DataError, exit 2, nothing written.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from data_modules.sources.synthetic import EPOCH
from data_modules.store import read_stage_output
from foundv2.append_world import (
    DAY,
    QFORMER,
    data_config,
    stage_config,
    tokenizer_model,
    write_split_events,
)
from foundv2.nn.qformer import CausalQFormer, QFormerCache
from tests.helpers import run_cli
from tests.test_qformer import build, make_batch


# ------------------------------------------------------------------------------ the nn level
def _run_window(qf: CausalQFormer, ev, batch, lo: int, hi: int, cache=None, ctx=None):
    """forward_window on windows lo..hi-1 of ``batch`` (events of other windows masked out)."""
    mask = batch["ev_mask"] & (batch["ev_window"] >= lo) & (batch["ev_window"] < hi)
    return qf.forward_window(ev, (batch["ev_window"] - lo).clamp_min(0), batch["ev_source"], mask,
                             batch["win_mask"][:, lo:hi], cache=cache, context=ctx)


@pytest.mark.parametrize("within_window", ["all", "source"])
def test_cached_window_equals_the_full_pass(within_window, one_thread):
    enc, tab, qf = build(within_window)
    batch = make_batch(b=3, w=6)  # users with 6, 5 and 4 windows: padded windows and events in the batch
    with torch.no_grad():
        ev, ctx = enc(batch), tab(batch["tabular"])[:, None]
        full = qf(ev, batch["ev_window"], batch["ev_source"], batch["ev_mask"], batch["win_mask"], context=ctx)
        whole, _ = _run_window(qf, ev, batch, 0, 6, ctx=ctx)
        torch.testing.assert_close(whole.views, full.views, rtol=0, atol=1e-5)
        # windows 0..2 first, then 3, then 4..5 (two at once) from the cache
        out, cache = _run_window(qf, ev, batch, 0, 3, ctx=ctx)
        views = [out.views]
        for lo, hi in ((3, 4), (4, 6)):
            cache = QFormerCache.stack(cache.users())  # the per-user round trip the stored cache makes
            out, cache = _run_window(qf, ev, batch, lo, hi, cache=cache)
            torch.testing.assert_close(out.present, full.present[:, lo:hi])
            views.append(out.views)
        torch.testing.assert_close(torch.cat(views, 1), full.views, rtol=0, atol=1e-5)
    assert cache.n_windows.tolist() == [6, 5, 4]
    assert cache.self_len.tolist() == [6 * 2 * 2, 5 * 2 * 2, 4 * 2 * 2]  # windows x sources x queries
    assert cache.mem_len.tolist() == (batch["ev_mask"].sum(1) + 2).tolist()  # + null slot + profile


def test_delta_is_the_rows_the_update_adds(one_thread):
    """``delta=True`` returns exactly the rows the full update appends (what the store writes)."""
    enc, tab, qf = build("all")
    batch = make_batch(b=3, w=6)
    with torch.no_grad():
        ev, ctx = enc(batch), tab(batch["tabular"])[:, None]
        _, cache = _run_window(qf, ev, batch, 0, 4, ctx=ctx)
        out_full, updated = _run_window(qf, ev, batch, 4, 6, cache=cache)
        mask = batch["ev_mask"] & (batch["ev_window"] >= 4)
        out_delta, delta = qf.forward_window(ev, (batch["ev_window"] - 4).clamp_min(0), batch["ev_source"], mask,
                                             batch["win_mask"][:, 4:6], cache=cache, delta=True)
    torch.testing.assert_close(out_delta.views, out_full.views, rtol=0, atol=0)
    assert delta.n_windows.tolist() == updated.n_windows.tolist()
    assert (cache.self_len + delta.self_len).tolist() == updated.self_len.tolist()
    assert (cache.mem_len + delta.mem_len).tolist() == updated.mem_len.tolist()
    for (skv, mkv, _), (old_s, old_m, _), i in zip(updated.users(), cache.users(), range(3), strict=True):
        assert skv.shape[0] == len(qf.blocks) - 1 and mkv.shape[0] == 1  # blocks 1.. only; memory once
        assert torch.equal(skv[:, old_s.shape[1]:], delta.self_h[i, :, : int(delta.self_len[i])])
        assert torch.equal(mkv[:, old_m.shape[1]:], delta.mem[i, :, : int(delta.mem_len[i])])


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_stored_parts_give_back_the_padded_cache(tmp_path, one_thread, dtype):
    """Two kv parts written as the append writes them (a first encoding, one delta) read back
    into the padded batch cache with each user's rows in order, users missing from a part
    included; a float16 cache holds the float32 rows rounded to float16, an int8 one each row
    within half a step of its scale (max |x| / 127)."""
    from foundv2.append import KVParts, _kv_batch, _KVWriter

    enc, tab, qf = build("all")
    batch = make_batch(b=3, w=6)
    uids = np.array([7, 3, 9])
    with torch.no_grad():
        ev, ctx = enc(batch), tab(batch["tabular"])[:, None]
        _, first = _run_window(qf, ev, batch, 0, 4, ctx=ctx)
        mask = batch["ev_mask"] & (batch["ev_window"] >= 4)
        _, updated = _run_window(qf, ev, batch, 4, 6, cache=first)
        _, delta = qf.forward_window(ev, (batch["ev_window"] - 4).clamp_min(0), batch["ev_source"], mask,
                                     batch["win_mask"][:, 4:6], cache=first, delta=True)
    for name, cache, users in (("kv-00000.arrow", first, [0, 1, 2]), ("kv-00001.arrow", delta, [0, 2])):
        w = _KVWriter(tmp_path / name, np.dtype(dtype))
        for u in users:  # one record batch per user: users spread over batches
            part = QFormerCache(*(t[u:u + 1] for t in cache))
            w.write_batch(_kv_batch(uids[[u]], part, np.dtype(dtype)))
        w.close()
    got = KVParts(tmp_path, ["kv-00000.arrow", "kv-00001.arrow"], len(qf.blocks) - 1, qf.dim).cache(
        uids[[2, 0, 1]], np.array([6, 6, 4]))
    want = [updated.users()[2], updated.users()[0], first.users()[1]]
    assert got.n_windows.tolist() == [6, 6, 4]
    assert got.self_h.dtype == (torch.float32 if dtype == "int8" else getattr(torch, dtype))

    def same(stored, rows):
        if dtype != "int8":
            return torch.equal(stored, rows.to(stored.dtype))
        half_step = rows.abs().amax(-1, keepdim=True) / 127 / 2
        return bool(((stored - rows).abs() <= half_step * 1.01 + 1e-6).all())

    for i, (sh, mem, _) in enumerate(want):
        assert int(got.self_len[i]) == sh.shape[1] and int(got.mem_len[i]) == mem.shape[1]
        assert same(got.self_h[i, :, : sh.shape[1]], sh) and same(got.mem[i, :, : mem.shape[1]], mem)
    with torch.no_grad():  # the next window from the stored cache: float16 storage moves the views a little
        out, _ = _run_window(qf, ev, batch, 5, 6, cache=KVParts(tmp_path, ["kv-00000.arrow"], len(qf.blocks) - 1,
                                                                 qf.dim).cache(uids, np.array([4, 4, 4])))
        ref, _ = _run_window(qf, ev, batch, 5, 6, cache=first)
    torch.testing.assert_close(out.views, ref.views, rtol=0, atol={"float32": 1e-5, "float16": 5e-3, "int8": 3e-2}[dtype])


def test_window_past_the_position_table_is_refused():
    enc, tab, qf = build(max_windows=4)
    batch = make_batch(b=1, w=6)
    with torch.no_grad():
        ev = enc(batch)
        _, cache = _run_window(qf, ev, batch, 0, 4)
        with pytest.raises(ValueError, match="max_windows"):
            _run_window(qf, ev, batch, 4, 5, cache=cache)


# ------------------------------------------------------------------------------ a toy world through the CLI
def build_world(tmp: Path, n_users: int = 48, days: int = 14, new_days: int = 2, new_share: float = 0.6,
                qformer: dict = QFORMER) -> dict:
    """Stage 1 and the tokenizer trained on the base history; its tokens, and the full re-tokenize
    of base + new with the same models (the reference an append must equal)."""
    ev = write_split_events(tmp / "events", n_users, days, new_days, new_share)
    cache = tmp / "cache"
    base = data_config(tmp / "base.yaml", ev["base"], ev["users"], cache)
    full = data_config(tmp / "full.yaml", ev["full"], ev["users"], cache)
    qcfg = stage_config(tmp / "qformer.yaml", tmp / "s1", qformer)
    run_cli("fit", "--config", str(base), "--config", str(qcfg))
    ckpt = next((tmp / "s1").rglob("*.ckpt"))
    for cfg, out in ((base, "features"), (full, "features_full")):
        run_cli("predict", "--config", str(cfg), "--config", str(qcfg), "--ckpt_path", str(ckpt),
                "--model.predict_dir", str(tmp / out))
    export = tmp / "tokenizer"
    tcfg = stage_config(tmp / "tokenizer.yaml", tmp / "s2", tokenizer_model(export), max_epochs=2)
    run_cli("fit", "--config", str(base), "--config", str(tcfg), "--data.features_dir", str(tmp / "features"))
    for cfg, feats, out in ((base, "features", "tokens"), (full, "features_full", "tokens_full")):
        run_cli("tokenize", "--config", str(cfg), "--data.features_dir", str(tmp / feats), "--tokenizer", str(export),
                "--output", str(tmp / out), "--accelerator", "cpu", "--devices", "1")
    return {"tmp": tmp, "events": ev, "base": base, "full": full, "ckpt": ckpt, "tokenizer": export,
            "tokens": tmp / "tokens", "tokens_full": tmp / "tokens_full", "qformer_cfg": qcfg}


def append_args(world: dict, output: Path, events: Path | None = None, tokens: Path | None = None, **over) -> list:
    args = {"--config": world["base"], "--tokens": tokens or world["tokens"], "--qformer": world["ckpt"],
            "--tokenizer": world["tokenizer"], "--output": output, **over}
    out = ["tokenize", "--append"]
    for k, v in args.items():
        out += [k, str(v)]
    if events is not None:
        out += ["--events", str(events)]
    return out


def per_user(folder: Path) -> dict[int, dict[str, np.ndarray]]:
    ds, _ = read_stage_output(folder)
    ds = ds.with_format("numpy")
    cols = ("slice_window", "slice_source", "slice_key", "codes", "token_ids")
    out = {}
    for row in ds:
        out[int(row["user_id"])] = {c: np.stack(row[c]) if row[c].dtype == object else np.asarray(row[c])
                                    for c in cols}
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("append"))


@pytest.mark.slow
def test_append_keeps_earlier_codes_and_equals_a_full_retokenize(world):
    tmp = world["tmp"]
    new = pd.read_csv(world["events"]["new"])
    day1 = new[new["timestamp"] < new["timestamp"].min() // DAY * DAY + DAY]  # the first new day only
    (tmp / "day1.csv").write_text(day1.to_csv(index=False))
    (tmp / "day2.csv").write_text(new.drop(day1.index).to_csv(index=False))
    res = run_cli(*append_args(world, tmp / "v1", tmp / "day1.csv"))
    first = json.loads(res.stdout[res.stdout.index("{"):])
    assert first["first_encoding"]["not_reproduced"] == 0 and first["appended_windows"] == day1["user_id"].nunique()
    res = run_cli(*append_args(world, tmp / "v2", tmp / "day2.csv", tokens=tmp / "v1"))
    second = json.loads(res.stdout[res.stdout.index("{"):])
    assert "first_encoding" not in second  # the cache beside v1 was used: no re-encoding of the past

    before, v1, v2, full = (per_user(p) for p in (world["tokens"], tmp / "v1", tmp / "v2", world["tokens_full"]))
    assert before.keys() == v2.keys() == full.keys()
    appended = set(new["user_id"].tolist())
    for u, old in before.items():
        n = len(old["codes"])
        for c in old:  # every earlier slice bit-identical, in every version
            assert np.array_equal(v1[u][c][:n], old[c]) and np.array_equal(v2[u][c][:n], old[c]), (u, c)
        assert (len(v2[u]["codes"]) > n) == (u in appended)
        for c in old:  # the appended windows are what a full re-tokenize of the whole history gives
            assert np.array_equal(v2[u][c], full[u][c]), (u, c)
    # the cache parts of v1 are hard links in v2 (an append writes only its own delta)
    cache1, cache2 = tmp / "v1" / "append_cache", tmp / "v2" / "append_cache"
    assert (cache1 / "kv-00000.arrow").stat().st_ino == (cache2 / "kv-00000.arrow").stat().st_ino
    assert json.loads((cache2 / "cache.json").read_text())["parts"] == ["kv-00000.arrow", "kv-00001.arrow",
                                                                        "kv-00002.arrow"]
    meta = json.loads((tmp / "v2" / "meta.json").read_text())
    assert meta["kind"] == "tokens" and len(meta["append"]["history"]) == 2
    assert (tmp / "v2" / "report.json").exists()


@pytest.mark.slow
def test_append_with_view_items_equals_a_full_retokenize(tmp_path):
    # stage 1 writes each window's item mean beside its view: the append path must build it the same way
    world = build_world(tmp_path, qformer={**QFORMER, "init_args": {**QFORMER["init_args"], "view_items": True}})
    run_cli(*append_args(world, tmp_path / "v1", world["events"]["new"]))
    before, v1, full = (per_user(p) for p in (world["tokens"], tmp_path / "v1", world["tokens_full"]))
    grew = 0
    for u, old in before.items():
        n = len(old["codes"])
        grew += len(v1[u]["codes"]) > n
        for c in old:
            assert np.array_equal(v1[u][c][:n], old[c]), (u, c)
            assert np.array_equal(v1[u][c], full[u][c]), (u, c)
    assert grew > 0


@pytest.mark.slow
def test_stage3_states_of_earlier_windows_do_not_change(world):
    tmp = world["tmp"]
    out = tmp / "v_all"
    run_cli(*append_args(world, out, world["events"]["new"]))
    model = {"class_path": "foundv2.stages.alignment.AlignmentStage",
             "init_args": {"sequence": {"dim": 16, "num_layers": 2, "num_heads": 2},
                           "tokenizer_dir": str(world["tokenizer"])}}
    acfg = stage_config(tmp / "alignment.yaml", tmp / "s3", model)
    run_cli("fit", "--config", str(world["base"]), "--config", str(acfg), "--data.tokens_dir", str(world["tokens"]))
    ckpt = next((tmp / "s3").rglob("*.ckpt"))
    states = {}
    for name, tokens in (("before", world["tokens"]), ("after", out)):
        run_cli("predict", "--config", str(world["base"]), "--config", str(acfg), "--data.tokens_dir", str(tokens),
                "--ckpt_path", str(ckpt), "--model.predict_dir", str(tmp / f"emb_{name}"))
        ds, _ = read_stage_output(tmp / f"emb_{name}")
        states[name] = {int(u): (np.asarray(s, np.float32).reshape(len(k), -1), np.asarray(k))
                        for u, s, k in zip(ds["user_id"], ds["window_states"], ds["window_key"], strict=True)}
    grew = 0
    for u, (s0, k0) in states["before"].items():
        s1, k1 = states["after"][u]
        assert np.array_equal(k1[: len(k0)], k0)
        np.testing.assert_allclose(s1[: len(s0)], s0, rtol=0, atol=1e-5)
        grew += len(k1) > len(k0)
    assert grew > 0


# ------------------------------------------------------------------------------ bad input
def _fails(args: list, *needles: str) -> str:
    res = run_cli(*args, check=False)
    assert res.returncode == 2, res.stderr[-3000:]
    err = res.stderr
    assert "Traceback" not in err, err
    line = [x for x in err.splitlines() if x.startswith("foundv2: error:")]
    assert len(line) == 1 and err.rstrip().endswith(line[0]), err  # one paragraph, the last thing said
    for n in needles:
        assert n in line[0], err
    return line[0]


@pytest.mark.slow
def test_bad_input_is_a_clear_error_and_writes_nothing(world, tmp_path):
    new = pd.read_csv(world["events"]["new"])
    out = tmp_path / "out"
    # an unknown user
    unknown = new.head(3).assign(user_id=10**6)
    unknown.to_csv(tmp_path / "unknown.csv", index=False)
    _fails(append_args(world, out, tmp_path / "unknown.csv"), "1000000", "does not hold")
    # an event older than the user's last window (the first new day is before the day the old one ends)
    old = new.head(2).assign(timestamp=EPOCH + 3 * DAY)
    old.to_csv(tmp_path / "old.csv", index=False)
    _fails(append_args(world, out, tmp_path / "old.csv"), "not later than", "last")
    # a bad events file: a source the data set does not have
    new.head(2).assign(source="nowhere").to_csv(tmp_path / "src.csv", index=False)
    _fails(append_args(world, out, tmp_path / "src.csv"), "nowhere")
    # another tokenizer: same shape, other weights (its codes do not reproduce the stored ones)
    other = world["tmp"] / "tokenizer_other"
    if not other.exists():
        tcfg = stage_config(world["tmp"] / "tok_other.yaml", world["tmp"] / "s2o", tokenizer_model(other), seed=7)
        run_cli("fit", "--config", str(world["base"]), "--config", str(tcfg), "--data.features_dir",
                str(world["tmp"] / "features"))
    _fails(append_args(world, out, world["events"]["new"], **{"--tokenizer": other}),
           "not the one that made")
    # another stage 1 (a different checkpoint of the same shape) on a version that has a cache
    v = world["tmp"] / "with_cache"
    if not v.exists():
        run_cli(*append_args(world, v))  # no --events: only the cache is built
    ckpt2 = world["tmp"] / "other.ckpt"
    state = torch.load(world["ckpt"], map_location="cpu", weights_only=False)
    state["state_dict"] = {k: v_ + 0.01 if v_.is_floating_point() else v_ for k, v_ in state["state_dict"].items()}
    torch.save(state, ckpt2)  # written without a checksum record: used only when allowed
    _fails(append_args(world, out, world["events"]["new"], tokens=v, **{"--qformer": ckpt2}), str(ckpt2),
           "no checksum record")
    _fails([*append_args(world, out, world["events"]["new"], tokens=v, **{"--qformer": ckpt2}), "--allow_no_checksum"],
           "--qformer", "not the one that made")
    # too many windows for the Q-Former's window table
    many = pd.concat([new.head(1).assign(timestamp=EPOCH + (100 + k) * DAY) for k in range(40)])
    many.to_csv(tmp_path / "many.csv", index=False)
    _fails(append_args(world, out, tmp_path / "many.csv"), "max_windows")
    # appending over the input itself
    _fails(append_args(world, world["tokens"], world["events"]["new"]), "new version")
    assert not out.exists() and not list(tmp_path.glob("out*"))  # nothing written, no leftovers
