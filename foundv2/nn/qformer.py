"""The causal Q-Former of stage 1 (U2QT) and its per-source reconstruction head.

Every user has W windows and S sources. For every (window w, source s) view, ``Q`` learnable
queries (one set per source, shared by all windows, plus a learned window-position embedding)
produce that view's vector. All ``T = W * S * Q`` query tokens of a user are processed in one
batched pass of pre-norm transformer blocks (self-attention, cross-attention, MLP) with masks:

- **cross-attention (early fusion, causal)**: a query of window w attends to the encoded events
  of *all* sources whose window is ≤ w (``ev_mask`` respected), to optional always-visible
  context tokens (the tabular profile, which has no time), and to one learned *null* slot. The
  null slot means a query of a window with no visible event at all (possible when
  ``max_events`` keeps only the latest events, or for a user with no events) still has a key
  to attend to: no all-masked row, no NaN.
- **self-attention (block causal)**: a query of (w, s) sees every query of windows < w. Within
  its own window the order is set by ``within_window``: ``"all"`` (default) — every query of
  every source of window w is visible (the window is one time step, and cross-attention already
  sees all its events, so nothing leaks); ``"source"`` — source-causal, queries of (w, s')
  visible for s' ≤ s only (sources in index order), the queries of one view always see each
  other.

So the output for window w depends on events of windows ≤ w only — exactly, since masked keys
get zero weight — whatever the later windows hold. ``views`` is the mean of the Q query outputs
of each view (after a final LayerNorm); ``present`` says which (w, s) had ≥ 1 event. Views of
absent slices are still defined (the source's view of the user's state at that window); views
of padded windows (``win_mask`` False) are zeroed.

Why not ``transformers``' ``Blip2QFormerModel``: its layers *can* take a 4-D per-query mask
(in transformers 5 ``create_bidirectional_mask`` passes a prepared 4-D mask through), but it is
a post-norm BERT with its own embedding LayerNorm and text/query splitting, its mask handling
differs between the 4.x versions our floor allows and 5.x (``get_extended_attention_mask`` vs
``masking_utils``), and an all-masked cross-attention row gives NaN under SDPA. A small
pre-norm module over ``torch.nn.functional.scaled_dot_product_attention`` is ~80 lines, is
version-independent, and has the null slot built in.

Cost per layer: self-attention O(T²) and cross-attention O(T · E) per user (E = events of the
user in the batch, capped by ``max_events`` in the data module).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from foundv2.nn.slices import slice_presence
from foundv2.options import Options


@dataclass(frozen=True)
class TransformerConfig(Options):
    """The transformer blocks' settings that the Q-Former (stage 1) and the token-sequence
    encoder (stage 3) share; each net's own config adds its own."""

    dim: int = 64
    """Model width: of the tokens the blocks read (stage 1: the event encodings and the queries;
    stage 3: the token embeddings) and of the states they output."""
    num_layers: int = 2
    """Transformer blocks."""
    num_heads: int = 4
    """Attention heads (must divide ``dim``)."""
    mlp_ratio: int = 4
    """Hidden width of the block MLP, as a multiple of ``dim``."""
    dropout: float = 0.0
    """Dropout on attention weights and in the MLP."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.dim % self.num_heads:
            raise ValueError(f"{self.GROUP}: dim {self.dim} is not a multiple of num_heads {self.num_heads}")


@dataclass(frozen=True)
class QFormerConfig(TransformerConfig):
    """The causal Q-Former's settings (stage 1's ``--model.qformer.*``)."""

    GROUP: ClassVar[str] = "qformer"

    num_queries: int = 2
    """Q, learnable queries per (window, source) view: a user is ``windows x sources x Q`` query
    tokens."""
    within_window: Literal["all", "source"] = "all"
    """Visibility among the queries of one window: ``all`` (every source of the window) or
    ``source`` (source-causal, in source-index order)."""


class QFormerOutput(NamedTuple):
    """Output of :class:`CausalQFormer`: ``views`` [B, W, S, dim], ``present`` [B, W, S] bool."""

    views: torch.Tensor
    present: torch.Tensor


class QFormerCache(NamedTuple):
    """What :meth:`CausalQFormer.forward_window` needs of a user's earlier windows, per layer:
    the self-attention keys/values of their query tokens and the cross-attention keys/values of
    the memory (the null slot, the context tokens and every encoded event so far). Stage 1 is
    causal, so these never change when a window is appended: a new window costs its own tokens.

    Per user the real entries come first, padding after (``*_len`` say how many are real); the
    tensors are ``self.kv`` / ``cross_attn.kv`` outputs of each block, before the head split:

    - ``self_kv`` [B, L, P, 2·dim] and ``self_len`` [B]: the query tokens of windows
      0..n_windows-1 (order w, s, q as in :meth:`CausalQFormer.token_index`);
    - ``mem_kv`` [B, L, M, 2·dim] and ``mem_len`` [B]: the memory tokens (always visible to a
      later window's queries, since every one of them belongs to an earlier window or none);
    - ``n_windows`` [B]: windows encoded so far (the next window's position).
    """

    self_kv: torch.Tensor
    self_len: torch.Tensor
    mem_kv: torch.Tensor
    mem_len: torch.Tensor
    n_windows: torch.Tensor

    def users(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per user ``(self_kv [L, self_len, 2·dim], mem_kv [L, mem_len, 2·dim], n_windows)``."""
        return [(self.self_kv[i, :, : int(self.self_len[i])], self.mem_kv[i, :, : int(self.mem_len[i])],
                 int(self.n_windows[i])) for i in range(self.self_kv.shape[0])]

    @staticmethod
    def stack(users: list[tuple[torch.Tensor, torch.Tensor, int]]) -> QFormerCache:
        """The inverse of :meth:`users`: per-user entries → one padded batch cache."""
        n_layers, _, width = users[0][1].shape
        ref = users[0][1]
        p = max(u[0].shape[1] for u in users)
        m = max(u[1].shape[1] for u in users)
        self_kv = ref.new_zeros(len(users), n_layers, p, width)
        mem_kv = ref.new_zeros(len(users), n_layers, m, width)
        for i, (skv, mkv, _) in enumerate(users):
            self_kv[i, :, : skv.shape[1]] = skv
            mem_kv[i, :, : mkv.shape[1]] = mkv
        lens = [torch.tensor([u[k].shape[1] for u in users], device=ref.device) for k in (0, 1)]
        return QFormerCache(self_kv, lens[0], mem_kv, lens[1],
                            torch.tensor([u[2] for u in users], device=ref.device))


def _append_rows(old: torch.Tensor, old_len: torch.Tensor, new: torch.Tensor, new_len: torch.Tensor) -> torch.Tensor:
    """Per user, its ``old_len`` real rows of ``old`` [B, L, P, C] then its ``new_len`` real rows
    of ``new`` [B, L, T, C] (real rows first in both): [B, L, max(old_len + new_len), C]. One copy
    of ``old`` and a scatter of the new rows; rows past a user's length are padding (masked by the
    lengths wherever the cache is read)."""
    b, n_layers, p, c = old.shape
    t = new.shape[2]
    out = torch.cat([old, old.new_zeros(b, n_layers, t, c)], dim=2)
    pos = old_len[:, None] + torch.arange(t, device=old.device)[None, :]  # distinct per user, < p + t
    out.scatter_(2, pos[:, None, :, None].expand(b, n_layers, t, c), new)
    width = int((old_len + new_len).max()) if b else 0
    return out[:, :, :width]


def block_mlp(dim: int, mlp_ratio: int, dropout: float) -> nn.Sequential:
    """The MLP of a transformer block (Q-Former and stage 3): dim → ratio·dim → dim, GELU."""
    return nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(mlp_ratio * dim, dim))


class _Attention(nn.Module):
    """Multi-head attention with a boolean mask (True = may attend)."""

    def __init__(self, dim: int, num_heads: int, dropout: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of num_heads {num_heads}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, mem: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.attend(x, self.kv(mem), mask)

    def attend(self, x: torch.Tensor, kv: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Attention of ``x`` [B, T, dim] over keys/values already projected, ``kv = self.kv(mem)``
        [B, M, 2·dim] (what :class:`QFormerCache` keeps), with ``mask`` [B, T, M]."""
        b, t, d = x.shape
        m = kv.shape[1]
        h = self.num_heads
        q = self.q(x).view(b, t, h, d // h).transpose(1, 2)
        k, v = kv.view(kv.shape[0], m, 2, h, d // h).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask.unsqueeze(1), dropout_p=self.dropout if self.training else 0.0
        )
        return self.out(o.transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    """Pre-norm block: causal self-attention among queries, cross-attention to events, MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim)
        self.self_attn = _Attention(dim, num_heads, dropout)
        self.norm_ca = nn.LayerNorm(dim)
        self.norm_mem = nn.LayerNorm(dim)
        self.cross_attn = _Attention(dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = block_mlp(dim, mlp_ratio, dropout)

    def forward(
        self, x: torch.Tensor, mem: torch.Tensor, self_mask: torch.Tensor, cross_mask: torch.Tensor
    ) -> torch.Tensor:
        h = self.norm_sa(x)
        x = x + self.self_attn(h, h, self_mask)
        x = x + self.cross_attn(self.norm_ca(x), self.norm_mem(mem), cross_mask)
        return x + self.mlp(self.norm_mlp(x))

    def memory_kv(self, mem: torch.Tensor) -> torch.Tensor:
        """[B, M, dim] memory tokens → this block's cross-attention keys/values [B, M, 2·dim]."""
        return self.cross_attn.kv(self.norm_mem(mem))

    def forward_cached(
        self, x: torch.Tensor, past_kv: torch.Tensor, self_mask: torch.Tensor, mem_kv: torch.Tensor,
        cross_mask: torch.Tensor, in_place: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on new query tokens ``x`` [B, T, dim] whose self-attention also sees the
        earlier tokens' cached keys/values ``past_kv`` [B, P, 2·dim] (``self_mask`` [B, T, P + T])
        and whose cross-attention reads ``mem_kv`` [B, M, 2·dim] (:meth:`memory_kv`). With
        ``in_place``, ``past_kv`` is [B, P + T, 2·dim] with its last T rows free: the new keys/values
        are written there instead of concatenated (no copy of the past). Returns (the block's
        output, the new tokens' self-attention keys/values [B, T, 2·dim])."""
        h = self.norm_sa(x)
        new_kv = self.self_attn.kv(h)
        if in_place:
            past_kv[:, past_kv.shape[1] - new_kv.shape[1]:] = new_kv
            keys = past_kv
        else:
            keys = torch.cat([past_kv, new_kv], dim=1)
        x = x + self.self_attn.attend(h, keys, self_mask)
        x = x + self.cross_attn.attend(self.norm_ca(x), mem_kv, cross_mask)
        return x + self.mlp(self.norm_mlp(x)), new_kv


class CausalQFormer(nn.Module):
    """Causal Q-Former: Q learnable queries per source view, early fusion over all sources,
    causal over windows (see the module docstring for the exact masks).

    Args:
        num_sources: S, the number of event sources (one view per source and window).
        max_windows: the most windows a user may have (size of the window-position table).
        config: the Q-Former's own settings (:class:`QFormerConfig`: width, queries, blocks,
            visibility within a window).
    """

    def __init__(self, num_sources: int, max_windows: int = 64, config: QFormerConfig = QFormerConfig()) -> None:
        super().__init__()
        self.config = config
        dim, num_queries = config.dim, config.num_queries
        self.num_sources = num_sources
        self.dim = dim
        self.num_queries = num_queries
        self.max_windows = max_windows
        self.within_window = config.within_window
        # Small init as in BERT / BLIP-2 query tokens.
        self.queries = nn.Parameter(torch.randn(num_sources, num_queries, dim) * 0.02)
        self.window_pos = nn.Embedding(max_windows, dim)
        nn.init.normal_(self.window_pos.weight, std=0.02)
        self.null_kv = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
        self.blocks = nn.ModuleList(_Block(dim, config.num_heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(dim)

    def token_index(
        self, num_windows: int, device: torch.device | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Window and source of each of the ``W * S * Q`` query tokens (order: w, then s, then q)."""
        s, q = self.num_sources, self.num_queries
        tok = torch.arange(num_windows * s * q, device=device)
        return tok // (s * q), (tok // q) % s

    def query_rows(self, src_tok: torch.Tensor) -> torch.Tensor:
        """[T, D] each query token's learned query (tokens in :meth:`token_index` order), read as an
        embedding lookup: the backward of ``queries[src, q]`` is an accumulating ``index_put_``,
        which on a CPU with several threads adds in no fixed order (two fits of one config differed
        in the last bits); the embedding backward adds in a fixed one."""
        q = self.num_queries
        flat = src_tok * q + torch.arange(len(src_tok), device=src_tok.device) % q
        return F.embedding(flat, self.queries.reshape(-1, self.dim))

    def self_attention_mask(self, num_windows: int, device: torch.device | None = None) -> torch.Tensor:
        """[T, T] bool, True where query token i may attend to token j (block causal)."""
        win, src = self.token_index(num_windows, device)
        earlier = win[None, :] < win[:, None]
        same = win[None, :] == win[:, None]
        if self.within_window == "all":
            return earlier | same
        return earlier | (same & (src[None, :] <= src[:, None]))

    def forward(
        self,
        events: torch.Tensor,
        ev_window: torch.Tensor,
        ev_source: torch.Tensor,
        ev_mask: torch.Tensor,
        win_mask: torch.Tensor,
        context: torch.Tensor | None = None,
    ) -> QFormerOutput:
        """Fuse a batch of users' encoded events into one vector per (window, source) view.

        Args:
            events: [B, E, dim] encoded events (:class:`~foundv2.nn.encoders.EventEncoder`).
            ev_window: [B, E] window ordinal of each event.
            ev_source: [B, E] source index of each event.
            ev_mask: [B, E] True on real events.
            win_mask: [B, W] True on the user's real windows; W ≤ ``max_windows``.
            context: optional [B, M, dim] tokens every query may always see (e.g. the tabular
                profile from :class:`~foundv2.nn.encoders.TabularEncoder`, unsqueezed).

        Returns:
            :class:`QFormerOutput` with ``views`` [B, W, S, dim] and ``present`` [B, W, S].
        """
        b, w_count = win_mask.shape
        if w_count > self.max_windows:
            raise ValueError(
                f"the batch has {w_count} windows but the Q-Former was built with max_windows="
                f"{self.max_windows}; raise max_windows or cap the windows per user in the data module"
            )
        s, q, d = self.num_sources, self.num_queries, self.dim
        device = events.device
        win_tok, src_tok = self.token_index(w_count, device)
        x = self.query_rows(src_tok) + self.window_pos(win_tok)
        x = x.unsqueeze(0).expand(b, -1, -1)

        # Memory: null slot, context tokens, events. Cross mask [B, T, 1 + M + E].
        parts = [self.null_kv.expand(b, -1, -1).to(events.dtype)]
        always = [torch.ones(b, 1, dtype=torch.bool, device=device)]
        if context is not None:
            parts.append(context.to(events.dtype))
            always.append(torch.ones(b, context.shape[1], dtype=torch.bool, device=device))
        mem = torch.cat([*parts, events], dim=1)
        visible_win = ev_mask[:, None, :] & (
            ev_window[:, None, :] <= torch.arange(w_count, device=device)[None, :, None]
        )
        cross_win = torch.cat([torch.cat(always, 1)[:, None, :].expand(-1, w_count, -1), visible_win], dim=2)
        cross_mask = cross_win[:, win_tok]  # [B, T, 1 + M + E]
        self_mask = self.self_attention_mask(w_count, device)[None]

        for block in self.blocks:
            x = block(x, mem, self_mask, cross_mask)
        views = self.norm_out(x).view(b, w_count, s, q, d).mean(dim=3)
        views = views * win_mask[:, :, None, None]
        present = (slice_presence(ev_window, ev_source, ev_mask, w_count, s) > 0) & win_mask[:, :, None]
        return QFormerOutput(views, present)

    # ------------------------------------------------------------------ one window at a time
    def empty_cache(self, batch_size: int, context: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> QFormerCache:
        """The cache of users with no window yet: the memory holds the null slot and the context
        tokens (``context`` [B, M, dim], e.g. the profile), no query token."""
        parts = [self.null_kv.expand(batch_size, -1, -1).to(dtype=dtype, device=device)]
        if context is not None:
            parts.append(context.to(dtype))
        mem = torch.cat(parts, dim=1)
        mem_kv = torch.stack([block.memory_kv(mem) for block in self.blocks], dim=1)
        zeros = torch.zeros(batch_size, dtype=torch.long, device=mem.device)
        return QFormerCache(mem_kv.new_zeros(batch_size, len(self.blocks), 0, mem_kv.shape[-1]), zeros, mem_kv,
                            torch.full_like(zeros, mem.shape[1]), zeros)

    def forward_window(
        self,
        events: torch.Tensor,
        ev_window: torch.Tensor,
        ev_source: torch.Tensor,
        ev_mask: torch.Tensor,
        win_mask: torch.Tensor,
        cache: QFormerCache | None = None,
        context: torch.Tensor | None = None,
        delta: bool = False,
        in_place: bool = False,
    ) -> tuple[QFormerOutput, QFormerCache]:
        """The views of windows appended after the cached ones, without re-encoding the past.

        Equal (to float rounding) to :meth:`forward` over the whole history for the new windows:
        a new window's queries attend to the cached keys/values of every earlier query and
        memory token, to the new memory tokens of windows ≤ theirs and to each other with the
        same block-causal mask. The cost is the new tokens' own (plus reading the cache).

        Args:
            events: [B, E, dim] the new memory tokens (encoded events of the new windows; any
                encoder's tokens, e.g. :class:`~foundv2.nn.encoders.EventEncoder`'s).
            ev_window: [B, E] window of each new token, counted from the first new window (0).
            ev_source: [B, E] source index of each new token (for ``present``).
            ev_mask: [B, E] True on real tokens.
            win_mask: [B, W'] True on each user's real new windows (a prefix per user).
            cache: the users' cache (:meth:`empty_cache` when None: no earlier window).
            context: always-visible tokens [B, M, dim]; only with ``cache=None`` (they are in the
                cache afterwards).
            delta: return only what this call adds to the cache (``self_kv``/``mem_kv`` hold the
                new rows, real first, ``*_len`` their counts; ``n_windows`` the updated count)
                instead of the whole updated cache: what a store that keeps the earlier rows
                needs, without copying them.
            in_place: ``cache`` has spare rows past every user's real ones, at least the new
                query tokens' (W'·S·Q) in ``self_kv`` and the new memory tokens' (E) in ``mem_kv``:
                each layer's new keys/values are written there (the cache is changed) and attended
                to without copying the cached rows. The same numbers as without it.

        Returns:
            ``(QFormerOutput(views [B, W', S, dim], present [B, W', S]), the updated cache)``
            (its delta with ``delta=True``).
        """
        b, w_count = win_mask.shape
        s, q, d = self.num_sources, self.num_queries, self.dim
        device = events.device
        if cache is None:
            cache = self.empty_cache(b, context, events.dtype, device)
        elif context is not None:
            raise ValueError("context tokens go in the first call only (cache=None); the cache holds them after")
        n_new = win_mask.sum(1)
        too_many = cache.n_windows + n_new > self.max_windows
        if bool(too_many.any()):
            raise ValueError(f"{int((cache.n_windows + n_new).max())} windows exceed the Q-Former's max_windows="
                             f"{self.max_windows} (its window-position table)")
        win_tok, src_tok = self.token_index(w_count, device)
        pos = (cache.n_windows[:, None] + win_tok[None]).clamp_max(self.max_windows - 1)
        x = self.query_rows(src_tok) + self.window_pos(pos)

        n_tok, n_ev = len(win_tok), events.shape[1]
        if in_place:  # the cached rows in use; the new ones go right after them
            past = int(cache.self_len.max()) if b else 0
            past_mem = int(cache.mem_len.max()) if b else 0
            if cache.self_kv.shape[2] < past + n_tok or cache.mem_kv.shape[2] < past_mem + n_ev:
                raise ValueError(f"in_place needs {n_tok} spare self rows and {n_ev} spare memory rows past the "
                                 f"cached ones; the cache has {cache.self_kv.shape[2] - past} and "
                                 f"{cache.mem_kv.shape[2] - past_mem}")
        else:
            past, past_mem = cache.self_kv.shape[2], cache.mem_kv.shape[2]
        old_self = torch.arange(past, device=device)[None, :] < cache.self_len[:, None]
        self_mask = torch.cat([old_self[:, None, :].expand(-1, len(win_tok), -1),
                               self.self_attention_mask(w_count, device)[None].expand(b, -1, -1)], dim=2)
        old_mem = torch.arange(past_mem, device=device)[None, :] < cache.mem_len[:, None]
        new_mem = ev_mask[:, None, :] & (ev_window[:, None, :] <= win_tok[None, :, None])
        cross_mask = torch.cat([old_mem[:, None, :].expand(-1, len(win_tok), -1), new_mem], dim=2)

        # the new memory tokens, real ones first per user (the cache keeps them compact)
        order = torch.sort((~ev_mask).to(torch.int8), dim=1, stable=True).indices
        events_c = torch.gather(events, 1, order[..., None].expand(-1, -1, d))
        cross_mask = torch.cat([cross_mask[:, :, : old_mem.shape[1]],
                                torch.gather(new_mem, 2, order[:, None, :].expand(-1, len(win_tok), -1))], dim=2)
        new_mem_kv, new_self_kv = [], []
        for layer, block in enumerate(self.blocks):
            mem_kv = block.memory_kv(events_c)
            new_mem_kv.append(mem_kv)
            if in_place:
                cache.mem_kv[:, layer, past_mem:past_mem + n_ev] = mem_kv
                x, kv = block.forward_cached(x, cache.self_kv[:, layer, :past + n_tok], self_mask,
                                             cache.mem_kv[:, layer, :past_mem + n_ev], cross_mask, in_place=True)
            else:
                x, kv = block.forward_cached(x, cache.self_kv[:, layer], self_mask,
                                             torch.cat([cache.mem_kv[:, layer], mem_kv], dim=1), cross_mask)
            new_self_kv.append(kv)
        views = self.norm_out(x).view(b, w_count, s, q, d).mean(dim=3)
        views = views * win_mask[:, :, None, None]
        present = (slice_presence(ev_window, ev_source, ev_mask, w_count, s) > 0) & win_mask[:, :, None]
        new_tokens = n_new * s * q
        n_events = ev_mask.sum(1)
        if delta:
            return QFormerOutput(views, present), QFormerCache(
                torch.stack(new_self_kv, 1), new_tokens, torch.stack(new_mem_kv, 1), n_events,
                cache.n_windows + n_new)
        updated = QFormerCache(
            _append_rows(cache.self_kv, cache.self_len, torch.stack(new_self_kv, 1), new_tokens),
            cache.self_len + new_tokens,
            _append_rows(cache.mem_kv, cache.mem_len, torch.stack(new_mem_kv, 1), n_events),
            cache.mem_len + n_events,
            cache.n_windows + n_new,
        )
        return QFormerOutput(views, present), updated


class ReconstructionHead(nn.Module):
    """Per-source linear head from views [B, W, S, dim] to each source's pooled input
    features [B, W, S, target_dim] (see :func:`foundv2.objectives.pooled_slice_targets`).

    Args:
        num_sources: S.
        dim: width of the views.
        target_dim: width of the pooled targets (text-embedding width + 1).
    """

    def __init__(self, num_sources: int, dim: int, target_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_sources, dim, target_dim))
        self.bias = nn.Parameter(torch.zeros(num_sources, target_dim))
        bound = dim**-0.5  # the default nn.Linear init range
        nn.init.uniform_(self.weight, -bound, bound)

    def forward(self, views: torch.Tensor) -> torch.Tensor:
        """[B, W, S, dim] → [B, W, S, target_dim], source s through its own weights."""
        return torch.einsum("bwsd,sdp->bwsp", views, self.weight) + self.bias
