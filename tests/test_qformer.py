"""Causal Q-Former and event encoders: causality, empty windows, masks, shapes."""

from __future__ import annotations

import pytest
import torch

from foundv2.nn.encoders import EventEncoder, TabularEncoder, gap_since_previous, time_features
from foundv2.nn.qformer import CausalQFormer, QFormerConfig, ReconstructionHead
from foundv2.nn.slices import pooled_slice_targets, slice_target_dim
from tests.helpers import empty_event_batch

DAY = 86400
S, ITEMS, TEXT_D, DIM, CATS = 2, 30, 8, 16, 3


def make_batch(
    b: int = 3, w: int = 6, per_window: int = 2, pad: int = 4, seed: int = 0
) -> dict[str, torch.Tensor]:
    """An event batch (data_modules/batch.py): user i has ``w - i`` day windows with
    ``per_window`` events each (sorted by time), plus ``pad`` padding slots per user."""
    g = torch.Generator().manual_seed(seed)
    e = w * per_window + pad
    batch = empty_event_batch(b, e, w, TEXT_D, torch.randn(b, 2, generator=g))
    for u in range(b):
        n_win = max(w - u, 1)
        batch["win_mask"][u, :n_win] = True
        batch["win_key"][u, :n_win] = torch.arange(100, 100 + n_win)
        for k in range(n_win * per_window):
            win = k // per_window
            batch["ev_source"][u, k] = k % S
            batch["ev_item"][u, k] = int(torch.randint(1, ITEMS + 1, (1,), generator=g))
            batch["ev_text"][u, k] = k
            batch["ev_text_emb"][u, k] = torch.randn(TEXT_D, generator=g)
            batch["ev_value"][u, k] = float(torch.randn(1, generator=g)) * 50
            batch["ev_time"][u, k] = (100 + win) * DAY + 3600 * (1 + 5 * (k % per_window))
            batch["ev_category"][u, k] = k % (CATS + 1) - 1
            batch["ev_window"][u, k] = win
            batch["ev_mask"][u, k] = True
    return batch


def build(
    within_window: str = "all", max_windows: int = 8
) -> tuple[EventEncoder, TabularEncoder, CausalQFormer]:
    torch.manual_seed(0)
    enc = EventEncoder(S, ITEMS, TEXT_D, DIM, num_categories=CATS)
    tab = TabularEncoder(2, DIM)
    qf = CausalQFormer(S, max_windows, QFormerConfig(dim=DIM, num_queries=2, num_layers=2, num_heads=2,
                                                     within_window=within_window))
    for m in (enc, tab, qf):
        m.eval()
    return enc, tab, qf


def run(models, batch):
    enc, tab, qf = models
    with torch.no_grad():
        ctx = tab(batch["tabular"])
        return qf(
            enc(batch),
            batch["ev_window"],
            batch["ev_source"],
            batch["ev_mask"],
            batch["win_mask"],
            context=ctx[:, None],
        )


def clone(batch):
    return {k: v.clone() for k, v in batch.items()}


def test_shapes_and_present():
    batch = make_batch()
    views, present = run(build(), batch)
    assert views.shape == (3, 6, S, DIM) and present.shape == (3, 6, S)
    assert torch.isfinite(views).all()
    # user 2 has 4 windows, each with one event of each source
    assert present[2, :4].all() and not present[2, 4:].any()
    assert (views[2, 4:] == 0).all()  # padded windows are zeroed
    targets, present_t = pooled_slice_targets(batch, S)
    assert targets.shape == (3, 6, S, slice_target_dim(TEXT_D))
    assert torch.equal(present, present_t)
    head = ReconstructionHead(S, DIM, slice_target_dim(TEXT_D))
    assert head(views).shape == targets.shape


@pytest.mark.parametrize("within_window", ["all", "source"])
def test_causality_alter_and_add_events(within_window):
    models = build(within_window)
    batch = make_batch()
    base = run(models, batch).views
    w = 2  # change window w + 1 of every user
    nxt = w + 1

    altered = clone(batch)
    sel = altered["ev_window"].eq(nxt) & altered["ev_mask"]
    altered["ev_item"][sel] = (altered["ev_item"][sel] % ITEMS) + 1
    altered["ev_text_emb"][sel] += 1.0
    altered["ev_value"][sel] *= -3
    out = run(models, altered).views
    assert torch.allclose(out[:, : w + 1], base[:, : w + 1], atol=1e-6)
    assert not torch.allclose(out[:, nxt], base[:, nxt], atol=1e-4)

    added = clone(batch)
    for u in range(3):
        slot = int(added["ev_mask"][u].sum())  # first padding slot
        added["ev_mask"][u, slot] = True
        added["ev_window"][u, slot] = nxt
        added["ev_source"][u, slot] = 1
        added["ev_item"][u, slot] = 7
        added["ev_time"][u, slot] = (100 + nxt) * DAY + 20 * 3600
    out = run(models, added).views
    assert torch.allclose(out[:, : w + 1], base[:, : w + 1], atol=1e-6)
    assert not torch.allclose(out[:, nxt], base[:, nxt], atol=1e-4)


def test_padding_content_is_ignored():
    models = build()
    batch = make_batch()
    base = run(models, batch).views
    junk = clone(batch)
    pad = ~junk["ev_mask"]
    junk["ev_item"][pad] = 5
    junk["ev_text_emb"][pad] = 9.0
    junk["ev_value"][pad] = 1e6
    junk["ev_time"][pad] = 10**9
    junk["ev_window"][pad] = 0
    assert torch.allclose(run(models, junk).views, base, atol=1e-6)


def test_empty_windows_and_users_are_finite():
    models = build()
    batch = make_batch()
    # user 0: no events in windows 0..2 (as when max_events keeps only the latest events);
    # user 1: no events at all.
    batch["ev_mask"][0] &= batch["ev_window"][0] >= 3
    batch["ev_mask"][1] = False
    views, present = run(models, batch)
    assert torch.isfinite(views).all()
    assert not present[0, :3].any() and present[0, 3:].all()
    assert not present[1].any()
    # also with no context tokens: only the null slot is visible for those queries
    enc, _, qf = models
    with torch.no_grad():
        v2 = qf(enc(batch), batch["ev_window"], batch["ev_source"], batch["ev_mask"], batch["win_mask"]).views
    assert torch.isfinite(v2).all()


def test_gradients_finite_with_empty_windows():
    enc, tab, qf = build()
    for m in (enc, tab, qf):
        m.train()
    batch = make_batch()
    batch["ev_mask"][1] = False
    views, _ = qf(enc(batch), batch["ev_window"], batch["ev_source"], batch["ev_mask"], batch["win_mask"])
    views.pow(2).sum().backward()
    for p in list(qf.parameters()) + list(enc.parameters()):
        assert p.grad is None or torch.isfinite(p.grad).all()


def test_self_attention_masks():
    _, _, qf_all = build("all")
    _, _, qf_src = build("source")
    m_all, m_src = qf_all.self_attention_mask(3), qf_src.self_attention_mask(3)
    win, src = qf_all.token_index(3)
    for i in range(len(win)):
        for j in range(len(win)):
            assert bool(m_all[i, j]) == bool(win[j] <= win[i])
            assert bool(m_src[i, j]) == bool(win[j] < win[i] or (win[j] == win[i] and src[j] <= src[i]))


def test_too_many_windows_raises():
    models = build(max_windows=4)
    with pytest.raises(ValueError, match="max_windows"):
        run(models, make_batch(w=6))


def test_encoder_features():
    batch = make_batch(b=1, w=2, per_window=2, pad=1)
    gap = gap_since_previous(batch["ev_time"], batch["ev_mask"])
    assert gap[0, 0] == 0 and gap[0, 1] == 5 * 3600 and gap[0, 4] == 0
    # order of events in the batch does not matter
    perm = torch.tensor([[3, 0, 4, 2, 1]])
    gap_p = gap_since_previous(batch["ev_time"].gather(1, perm), batch["ev_mask"].gather(1, perm))
    assert torch.equal(gap_p, gap.gather(1, perm))
    tf = time_features(torch.tensor([[0, 4 * DAY + 6 * 3600]]), torch.tensor([[True, True]]))
    assert tf.shape == (1, 2, 5)
    assert torch.allclose(tf[0, 1, :2], torch.tensor([1.0, 0.0]), atol=1e-6)  # 06:00 → quarter day
    enc = EventEncoder(S, ITEMS, TEXT_D, DIM, num_categories=CATS, per_source_proj=True)
    h = enc(batch)
    assert h.shape == (1, 5, DIM) and (h[0, 4] == 0).all() and torch.isfinite(h).all()
    assert TabularEncoder(0, DIM)(torch.zeros(3, 0)) is None
    assert TabularEncoder(2, DIM)(batch["tabular"]).shape == (1, DIM)
