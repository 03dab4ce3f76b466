"""Multi-scale alignment objectives: InfoNCE, false-negative masks, pairs, switches, and
that each term's loss falls when stage-1 modules are optimised on a planted weekly pattern."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from foundv2.nn.encoders import EventEncoder, TabularEncoder
from foundv2.nn.qformer import CausalQFormer, QFormerConfig, ReconstructionHead
from foundv2.nn.slices import pooled_slice_targets, slice_target_dim
from foundv2.objectives import (
    FineGrainedObjective,
    MultiScaleObjectives,
    ReconstructionObjective,
    SemanticObjective,
    WindowObjective,
    info_nce,
    last_valid,
)
from tests.helpers import empty_event_batch

DAY = 86400
S, ITEMS, TEXT_D, DIM, WEEKS, PERIOD = 2, 24, 8, 16, 3, 7


def n_windows(w: int, u: int) -> int:
    return max(w - 2 * u, 1)


def weekly_batch(b: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """An event batch (data_modules/batch.py) of day windows with a planted weekly pattern:
    each user has its own item per weekday (source 0) and its own text per weekday
    (source 1, absent on weekends); the future text depends on the user's pattern. User i
    has ``max(3 weeks - 2i, 1)`` windows, so late users have fewer periodic pairs and users
    with ≤ 7 windows have none."""
    g = torch.Generator().manual_seed(seed)
    w = WEEKS * PERIOD
    items = torch.randint(1, ITEMS + 1, (b, PERIOD), generator=g)
    texts = torch.randn(b, PERIOD, TEXT_D, generator=g)
    fut_text = F.normalize(texts.mean(1) + 0.3 * torch.randn(b, TEXT_D, generator=g), dim=-1)
    e = w * S
    out = {
        "user_id": torch.arange(b) + 1000,
        "split": torch.zeros(b, dtype=torch.long),
        **empty_event_batch(b, e, w, TEXT_D, torch.randn(b, 2, generator=g)),
        "fut_text_emb": fut_text,
        "has_fut_text": torch.arange(b) % 4 != 3,  # every 4th user is "val": no future text
    }
    day0 = 19000  # a Monday-aligned day number is not needed: the key difference is what counts
    for u in range(b):
        n_win = n_windows(w, u)
        out["win_mask"][u, :n_win] = True
        out["win_key"][u, :n_win] = day0 + torch.arange(n_win)
        k = 0
        for win in range(n_win):
            wd = win % PERIOD
            out["ev_item"][u, k] = items[u, wd]
            out["ev_value"][u, k] = float(wd)
            out["ev_time"][u, k] = (day0 + win) * DAY + 9 * 3600
            out["ev_window"][u, k] = win
            out["ev_mask"][u, k] = True
            k += 1
            if wd < 5:  # source 1 is silent on the weekend
                out["ev_source"][u, k] = 1
                out["ev_text"][u, k] = u * PERIOD + wd
                out["ev_text_emb"][u, k] = texts[u, wd]
                out["ev_time"][u, k] = (day0 + win) * DAY + 18 * 3600
                out["ev_window"][u, k] = win
                out["ev_mask"][u, k] = True
                k += 1
    return out


# ------------------------------------------------------------------ info_nce


def test_info_nce_identical_pairs():
    torch.manual_seed(0)
    a = torch.randn(10, 16)
    loss, acc = info_nce(a, a.clone(), tau=0.05)
    assert acc.item() == 1.0 and loss.item() < 0.5
    loss_rand, _ = info_nce(a, torch.randn(10, 16), tau=0.05)
    assert loss_rand > loss


def test_info_nce_false_negative_mask():
    e0, e1 = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    a = torch.stack([e0, e1])
    # b[0] is a weaker positive (cos 0.8) than the negative b[1] is for a[0] (cos 1.0)
    b = torch.stack([0.8 * e0 + 0.6 * e1, e0])
    loss, acc = info_nce(a, b, tau=1.0, symmetric=False)
    masked, acc_m = info_nce(a, b, tau=1.0, symmetric=False, fn_margin=0.1)
    assert acc.item() == 0.0 and acc_m.item() == 1.0
    # row 0: b[1] (1.0 > 0.8 + 0.1) dropped; row 1: a[1]·b = [0.6, 0.0], b[0] (0.6 > 0.0 + 0.1)
    # dropped: both rows keep only their positive → loss 0.
    assert masked.item() == pytest.approx(0.0, abs=1e-6)
    wide, _ = info_nce(a, b, tau=1.0, symmetric=False, fn_margin=10.0)
    assert wide.item() == pytest.approx(loss.item(), abs=1e-6)
    expected = 0.5 * (
        F.cross_entropy(torch.tensor([[0.8, 1.0]]), torch.tensor([0]))
        + F.cross_entropy(torch.tensor([[0.6, 0.0]]), torch.tensor([1]))
    )
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_info_nce_keys_and_empty():
    torch.manual_seed(0)
    a, b = torch.randn(4, 8), torch.randn(4, 8)
    loss, acc = info_nce(a, b, keys=torch.zeros(4, dtype=torch.long))
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and acc.item() == 1.0
    x = torch.zeros(0, 8, requires_grad=True)
    loss, acc = info_nce(x, x)
    loss.backward()
    assert loss.item() == 0.0 and acc.item() == 0.0


# ------------------------------------------------------------------ single terms


def test_window_pairs_and_skip():
    batch = weekly_batch()
    obj = WindowObjective(DIM, period=PERIOD)
    pairs = obj.pairs(batch["win_mask"], batch["win_key"])
    per_user = torch.bincount(pairs[:, 0], minlength=12)
    n_win = torch.tensor([n_windows(21, u) for u in range(12)])
    assert torch.equal(per_user, (n_win - PERIOD).clamp_min(0))
    assert per_user[6] == 2 and (per_user[7:] == 0).all()  # 9 windows: (0,7), (1,8); ≤ 7: none
    u, w1, w2 = pairs.unbind(1)
    assert (batch["win_key"][u, w2] - batch["win_key"][u, w1] == PERIOD).all()
    loss, acc, n = obj(torch.randn(12, 21, DIM), batch["win_mask"], batch["win_key"], batch["user_id"])
    assert n.item() == pairs.shape[0] and torch.isfinite(loss)
    # a batch without any pair: zero loss, zero pairs, still differentiable
    wm = batch["win_mask"].clone()
    wm[:, PERIOD:] = False
    reps = torch.randn(12, 21, DIM, requires_grad=True)
    loss, _, n = obj(reps, wm, batch["win_key"])
    loss.backward()
    assert n.item() == 0 and loss.item() == 0.0


def test_semantic_uses_only_training_users():
    torch.manual_seed(0)
    batch = weekly_batch()
    obj = SemanticObjective(DIM, TEXT_D)
    rep = torch.randn(12, DIM)
    loss, _ = obj(rep, batch["fut_text_emb"], batch["has_fut_text"])
    other = batch["fut_text_emb"].clone()
    other[~batch["has_fut_text"]] = torch.randn(int((~batch["has_fut_text"]).sum()), TEXT_D)
    loss2, _ = obj(rep, other, batch["has_fut_text"])
    assert loss.item() == loss2.item()
    # duplicate texts are not each other's negatives
    same = batch["fut_text_emb"][:1].expand(12, -1)
    loss3, acc3 = SemanticObjective(DIM, TEXT_D, fn_margin=None)(rep, same, batch["has_fut_text"])
    assert loss3.item() == pytest.approx(0.0, abs=1e-6) and acc3.item() == 1.0


def test_reconstruction_objective_and_targets():
    batch = weekly_batch(b=2)
    targets, present = pooled_slice_targets(batch, S)
    assert targets.shape == (2, 21, S, slice_target_dim(TEXT_D)) and slice_target_dim(TEXT_D) == TEXT_D + 6
    # user 0, window 0: source 1 had one text event → its text; count 1 → log 2
    assert torch.allclose(targets[0, 0, 1, :TEXT_D], batch["ev_text_emb"][0, 1])
    assert targets[0, 0, 1, TEXT_D].item() == pytest.approx(torch.log(torch.tensor(2.0)).item())
    # value: source 0's event of window w has value w % 7 → signed log; source 1's value is 0
    assert targets[0, 3, 0, TEXT_D + 1].item() == pytest.approx(torch.log1p(torch.tensor(3.0)).item())
    assert targets[0, 3, 1, TEXT_D + 1].item() == 0.0
    # clock: source 0 at 09:00, source 1 at 18:00 → hour sin/cos; weekday sin/cos differ by day
    hour = lambda h: [math.sin(2 * math.pi * h / 24), math.cos(2 * math.pi * h / 24)]  # noqa: E731
    assert targets[0, 0, 0, TEXT_D + 2 : TEXT_D + 4].tolist() == pytest.approx(hour(9), abs=1e-5)
    assert targets[0, 0, 1, TEXT_D + 2 : TEXT_D + 4].tolist() == pytest.approx(hour(18), abs=1e-5)
    assert not torch.allclose(targets[0, 0, 0, TEXT_D + 4 :], targets[0, 1, 0, TEXT_D + 4 :])
    assert torch.allclose(targets[0, 0, 0, TEXT_D + 4 :], targets[0, 7, 0, TEXT_D + 4 :], atol=1e-5)
    assert not present[0, 5, 1] and present[0, 5, 0]  # weekend: source 1 silent
    assert not present[1, 19:].any() and present[1, 18, 0]  # user 1 has 19 windows
    obj = ReconstructionObjective()
    loss, per_source = obj(targets.clone(), targets, present)
    assert loss.item() == 0.0 and per_source.shape == (S,)
    noisy = targets.clone()
    noisy[~present] = 100.0  # absent slices are ignored
    assert obj(noisy, targets, present)[0].item() == 0.0


def test_fine_grained_cosine_weights():
    obj = FineGrainedObjective(4, mode="cosine", step_tau=1.0)
    obj.predictor = torch.nn.Identity()
    reps = torch.tensor([[[1.0, 0, 0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0]]])
    loss, _ = obj(reps, torch.ones(1, 3, dtype=torch.bool))
    # pairs k=0 (cos 1, weight 1) and k=1 (cos 0, weight 2): 2 * 1 / 3
    assert loss.item() == pytest.approx(2 / 3, abs=1e-6)


# ------------------------------------------------------------------ switches


def test_switching_terms_off():
    torch.manual_seed(0)
    b, w = 4, 9
    kw = {
        "seq": torch.randn(b, w, DIM),
        "seq_mask": torch.ones(b, w, dtype=torch.bool),
        "windows": torch.randn(b, w, DIM),
        "win_mask": torch.ones(b, w, dtype=torch.bool),
        "win_key": torch.arange(w).expand(b, -1),
        "user_rep": torch.randn(b, DIM),
        "fut_text_emb": torch.randn(b, TEXT_D),
        "has_fut_text": torch.ones(b, dtype=torch.bool),
        "recon": torch.randn(b, w, S, 3),
        "recon_target": torch.randn(b, w, S, 3),
        "present": torch.ones(b, w, S, dtype=torch.bool),
    }
    total, logs = MultiScaleObjectives(DIM, TEXT_D)(**kw)
    for t in ("fine", "window", "semantic", "recon"):
        assert f"loss/{t}" in logs
    assert {"acc/fine", "acc/window", "acc/semantic", "pairs/window", "loss/total"} <= set(logs)
    expected = sum(
        wt * logs[f"loss/{t}"]
        for t, wt in {"fine": 0.2, "window": 0.4, "semantic": 0.4, "recon": 1.0}.items()
    )
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)

    obj = MultiScaleObjectives(DIM, TEXT_D, weights={"fine": 0.0}, enabled={"semantic": False})
    total, logs = obj(
        **{k: v for k, v in kw.items() if k not in ("user_rep", "fut_text_emb", "has_fut_text")}
    )
    assert "loss/fine" not in logs and "acc/fine" not in logs
    assert "loss/semantic" not in logs and "acc/semantic" not in logs
    assert total.item() == pytest.approx((0.4 * logs["loss/window"] + logs["loss/recon"]).item(), rel=1e-5)

    with pytest.raises(ValueError, match="window"):
        MultiScaleObjectives(DIM, TEXT_D)(**{k: v for k, v in kw.items() if k != "win_key"})
    with pytest.raises(ValueError, match="unknown"):
        MultiScaleObjectives(DIM, TEXT_D, weights={"fien": 1.0})


# ------------------------------------------------------------------ losses fall on planted data


def stage1_losses(models, batch, objectives: MultiScaleObjectives, content_targets: bool):
    enc, tab, qf, head = models
    views, present = qf(
        enc(batch),
        batch["ev_window"],
        batch["ev_source"],
        batch["ev_mask"],
        batch["win_mask"],
        context=tab(batch["tabular"])[:, None],
    )
    windows = views.mean(dim=2)  # one user vector per window
    targets, _ = pooled_slice_targets(batch, S)
    return objectives(
        # fine: predict the next window's content (its pooled input features, all sources), or
        # by default the next window's (detached) representation
        seq=windows,
        seq_mask=batch["win_mask"],
        seq_targets=targets.flatten(2) if content_targets else None,
        windows=windows,
        win_mask=batch["win_mask"],
        win_key=batch["win_key"],
        user_keys=batch["user_id"],
        user_rep=last_valid(windows, batch["win_mask"]),
        fut_text_emb=batch["fut_text_emb"],
        has_fut_text=batch["has_fut_text"],
        recon=head(views),
        recon_target=targets,
        present=present,
    )


@pytest.mark.parametrize(("fine_mode", "content_targets"), [("infonce", False), ("cosine", True)])
def test_each_loss_falls_on_weekly_batch(fine_mode, content_targets):
    torch.manual_seed(0)
    batch = weekly_batch()
    models = (
        EventEncoder(S, ITEMS, TEXT_D, DIM),
        TabularEncoder(2, DIM),
        CausalQFormer(S, WEEKS * PERIOD, QFormerConfig(dim=DIM, num_queries=2, num_layers=2, num_heads=2)),
        ReconstructionHead(S, DIM, slice_target_dim(TEXT_D)),
    )
    objectives = MultiScaleObjectives(
        DIM,
        TEXT_D,
        weights={"fine": 1.0},
        period=PERIOD,
        tau=0.1,
        fine_mode=fine_mode,
        fine_target_dim=S * slice_target_dim(TEXT_D) if content_targets else None,
    )
    params = [p for m in (*models, objectives) for p in m.parameters()]
    opt = torch.optim.Adam(params, lr=5e-3)
    history = []
    for _ in range(25):
        total, logs = stage1_losses(models, batch, objectives, content_targets)
        opt.zero_grad()
        total.backward()
        opt.step()
        history.append(logs)
    assert logs["pairs/window"].item() == sum(max(n_windows(21, u) - PERIOD, 0) for u in range(12))
    for term in ("fine", "window", "semantic", "recon"):
        first = sum(h[f"loss/{term}"] for h in history[:3]) / 3
        last = sum(h[f"loss/{term}"] for h in history[-3:]) / 3
        assert torch.isfinite(last) and last < 0.85 * first, (term, first.item(), last.item())
    assert history[-1]["acc/window"] > history[0]["acc/window"]
    assert history[-1]["acc/semantic"] > history[0]["acc/semantic"]
