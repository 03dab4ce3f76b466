"""Stage 3's token Transformer: block-causal over windows, exact under appends and padding."""

import pytest
import torch

from foundv2.nn.sequence import SequenceConfig, TokenSequenceEncoder

V, C, LEVELS, SOURCES = 40, 8, 2, 3


def make_model(**kw):
    torch.manual_seed(0)
    return TokenSequenceEncoder(torch.randn(V, C), LEVELS, SOURCES, 8,
                                SequenceConfig(dim=16, num_layers=2, num_heads=2, **kw)).eval()


def user_tokens(n_windows: int, seed: int = 0):
    """One user: every window has 1-2 slices of LEVELS tokens each."""
    g = torch.Generator().manual_seed(seed)
    ids, lev, src, win = [], [], [], []
    for w in range(n_windows):
        for s in range(1 + w % 2):
            for lv in range(LEVELS):
                ids.append(int(torch.randint(V, (1,), generator=g)))
                lev.append(lv)
                src.append(s)
                win.append(w)
    return [torch.tensor(x) for x in (ids, lev, src, win)]


def batch(users, pad_to: int | None = None):
    T = pad_to or max(len(u[0]) for u in users)
    out = [torch.full((len(users), T), -1, dtype=torch.long) for _ in range(4)]
    mask = torch.zeros(len(users), T, dtype=torch.bool)
    for i, u in enumerate(users):
        n = len(u[0])
        for o, x in zip(out, u, strict=True):
            o[i, :n] = x
        mask[i, :n] = True
    out[3] = out[3].clamp_min(0)
    return (*out, mask)


def test_later_windows_never_change_earlier_states():
    model = make_model()
    ids, lev, src, win = user_tokens(5)
    base = model(*batch([(ids, lev, src, win)]), num_windows=5)
    changed = ids.clone()
    changed[win >= 3] = (changed[win >= 3] + 7) % V  # other tokens in windows 3 and 4
    after = model(*batch([(changed, lev, src, win)]), num_windows=5)
    assert torch.equal(base.windows[0, :3], after.windows[0, :3])
    assert not torch.allclose(base.windows[0, 3:], after.windows[0, 3:])


def test_appending_a_window_leaves_earlier_states_equal():
    model = make_model()
    ids, lev, src, win = user_tokens(5)
    keep = win < 4
    short = model(*batch([(ids[keep], lev[keep], src[keep], win[keep])]), num_windows=4)
    full = model(*batch([(ids, lev, src, win)]), num_windows=5)
    torch.testing.assert_close(short.windows[0], full.windows[0, :4], rtol=0, atol=1e-6)


def test_padding_and_batch_neighbours_do_not_change_a_user():
    model = make_model()
    a, b = user_tokens(3, seed=1), user_tokens(6, seed=2)
    alone = model(*batch([a]), num_windows=3)
    together = model(*batch([a, b]), num_windows=6)
    torch.testing.assert_close(alone.windows[0], together.windows[0, :3], rtol=0, atol=1e-6)
    assert torch.all(together.windows[0, 3:] == 0)  # padded windows are zero
    assert torch.isfinite(together.tokens).all()


def test_token_table_starts_at_the_code_vectors_and_learns_unless_frozen():
    codes = torch.randn(V, C)
    m = TokenSequenceEncoder(codes, LEVELS, SOURCES, 8, SequenceConfig(dim=16, num_heads=2))
    assert torch.equal(m.token_table.weight.detach(), codes)
    out = m(*batch([user_tokens(3)]), num_windows=3)
    out.windows.sum().backward()
    assert m.token_table.weight.grad.abs().sum() > 0
    frozen = TokenSequenceEncoder(codes, LEVELS, SOURCES, 8, SequenceConfig(dim=16, num_heads=2, freeze_codes=True))
    assert not frozen.token_table.weight.requires_grad


def test_window_targets_are_the_mean_code_vector_of_each_window():
    model = make_model()
    ids, lev, src, win = user_tokens(3)
    tid, tl, ts, tw, mask = batch([(ids, lev, src, win)], pad_to=len(ids) + 3)
    t = model.window_targets(tid, tw, mask, 3)
    for w in range(3):
        expect = model.target_table[ids[win == w]].mean(0)
        torch.testing.assert_close(t[0, w], expect)


def test_too_many_windows_is_a_clear_error():
    model = make_model()
    with pytest.raises(ValueError, match="max_windows"):
        model(*batch([user_tokens(9)]), num_windows=9)
