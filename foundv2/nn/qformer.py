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
    """What :meth:`CausalQFormer.forward_window` needs of a user's earlier windows. Stage 1 is
    causal, so it never changes when a window is appended: a new window costs its own tokens plus
    projecting this cache into keys and values.

    It keeps what the keys and values are computed from, not the keys and values themselves: each
    block's self-attention reads ``self_attn.kv(norm_sa(x))`` of the earlier query tokens and its
    cross-attention ``cross_attn.kv(norm_mem(m))`` of the memory tokens, so the cache holds the
    normalised self-attention inputs of blocks 1..L-1 (block 0's input is a function of a token's
    window and source alone, recomputed) and the memory tokens once for every block. Per row that
    is dim numbers instead of 2·dim per block: 4x less for a 2-block Q-Former, before any storage
    dtype.

    Per user the real rows come first, padding after (``*_len`` say how many are real):

    - ``self_h`` [B, L-1, P, dim] and ``self_len`` [B]: the query tokens of windows
      0..n_windows-1 (order w, s, q as in :meth:`CausalQFormer.token_index`), ``norm_sa`` of each
      block's input from block 1 on;
    - ``mem`` [B, 1, M, dim] and ``mem_len`` [B]: the memory tokens (the null slot, the context
      tokens and every encoded event so far; always visible to a later window's queries, since
      every one of them belongs to an earlier window or none), shared by every block;
    - ``n_windows`` [B]: windows encoded so far (the next window's position).
    """

    self_h: torch.Tensor
    self_len: torch.Tensor
    mem: torch.Tensor
    mem_len: torch.Tensor
    n_windows: torch.Tensor

    def users(self) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Per user ``(self_h [L-1, self_len, dim], mem [1, mem_len, dim], n_windows)``."""
        return [(self.self_h[i, :, : int(self.self_len[i])], self.mem[i, :, : int(self.mem_len[i])],
                 int(self.n_windows[i])) for i in range(self.self_h.shape[0])]

    @staticmethod
    def stack(users: list[tuple[torch.Tensor, torch.Tensor, int]]) -> QFormerCache:
        """The inverse of :meth:`users`: per-user entries → one padded batch cache."""
        ref = users[0][1]
        p = max(u[0].shape[1] for u in users)
        m = max(u[1].shape[1] for u in users)
        self_h = ref.new_zeros(len(users), users[0][0].shape[0], p, ref.shape[-1])
        mem = ref.new_zeros(len(users), 1, m, ref.shape[-1])
        for i, (sh, mm, _) in enumerate(users):
            self_h[i, :, : sh.shape[1]] = sh
            mem[i, :, : mm.shape[1]] = mm
        lens = [torch.tensor([u[k].shape[1] for u in users], device=ref.device) for k in (0, 1)]
        return QFormerCache(self_h, lens[0], mem, lens[1], torch.tensor([u[2] for u in users], device=ref.device))


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
        cross_mask: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on new query tokens ``x`` [B, T, dim] whose self-attention also sees the
        earlier tokens' keys/values ``past_kv`` [B, P, 2·dim] (``self_mask`` [B, T, P + T]) and whose
        cross-attention reads ``mem_kv`` [B, M, 2·dim] (:meth:`memory_kv`). Returns (the block's
        output, the new tokens' normalised self-attention input ``norm_sa(x)`` [B, T, dim]: what
        :class:`QFormerCache` keeps of them)."""
        h = self.norm_sa(x)
        keys = torch.cat([past_kv, self.self_attn.kv(h)], dim=1)
        x = x + self.self_attn.attend(h, keys, self_mask)
        x = x + self.cross_attn.attend(self.norm_ca(x), mem_kv, cross_mask)
        return x + self.mlp(self.norm_mlp(x)), h


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
        device = events.device
        win_tok, src_tok = self.token_index(w_count, device)
        x = self.query_rows(src_tok) + self.window_pos(win_tok)
        x = x.unsqueeze(0).expand(b, -1, -1)

        # Memory: null slot, context tokens, events. Cross mask [B, T, 1 + M + E].
        fixed = self.fixed_memory(b, context, events.dtype, device)
        mem = torch.cat([fixed, events], dim=1)
        visible_win = ev_mask[:, None, :] & (
            ev_window[:, None, :] <= torch.arange(w_count, device=device)[None, :, None]
        )
        always = torch.ones(b, w_count, fixed.shape[1], dtype=torch.bool, device=device)
        cross_mask = torch.cat([always, visible_win], dim=2)[:, win_tok]  # [B, T, 1 + M + E]
        self_mask = self.self_attention_mask(w_count, device)[None]

        for block in self.blocks:
            x = block(x, mem, self_mask, cross_mask)
        return self._output(x, win_mask, ev_window, ev_source, ev_mask)

    def fixed_memory(self, batch_size: int, context: torch.Tensor | None, dtype: torch.dtype,
                     device: torch.device | None) -> torch.Tensor:
        """The memory tokens every query may always see [B, 1 + M, dim]: the null slot, then the
        context tokens (``context`` [B, M, dim], e.g. the profile) when given."""
        parts = [self.null_kv.expand(batch_size, -1, -1).to(dtype=dtype, device=device)]
        if context is not None:
            parts.append(context.to(dtype))
        return torch.cat(parts, dim=1)

    def _output(self, x: torch.Tensor, win_mask: torch.Tensor, ev_window: torch.Tensor, ev_source: torch.Tensor,
                ev_mask: torch.Tensor) -> QFormerOutput:
        """The last block's query tokens [B, W·S·Q, dim] → one view per (window, source), the mean
        of its queries (zero on padded windows), and which views have events."""
        b, w_count = win_mask.shape
        s, q, d = self.num_sources, self.num_queries, self.dim
        views = self.norm_out(x).view(b, w_count, s, q, d).mean(dim=3)
        views = views * win_mask[:, :, None, None]
        present = (slice_presence(ev_window, ev_source, ev_mask, w_count, s) > 0) & win_mask[:, :, None]
        return QFormerOutput(views, present)

    # ------------------------------------------------------------------ one window at a time
    def empty_cache(self, batch_size: int, context: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32, device: torch.device | None = None) -> QFormerCache:
        """The cache of users with no window yet: the memory holds the null slot and the context
        tokens (``context`` [B, M, dim], e.g. the profile), no query token."""
        mem = self.fixed_memory(batch_size, context, dtype, device)[:, None]
        zeros = torch.zeros(batch_size, dtype=torch.long, device=mem.device)
        return QFormerCache(mem.new_zeros(batch_size, len(self.blocks) - 1, 0, self.dim), zeros, mem,
                            torch.full_like(zeros, mem.shape[2]), zeros)

    def past_self_kv(self, block: int, cache: QFormerCache, dtype: torch.dtype) -> torch.Tensor:
        """Block ``block``'s self-attention keys/values of the cached query tokens [B, P, 2·dim]:
        block 0's from each token's window and source (the same for every user, computed once),
        the others' from the cached normalised inputs."""
        b, p = cache.self_h.shape[0], cache.self_h.shape[2]
        layer = self.blocks[block]
        if block == 0:
            win, src = self.token_index(p // (self.num_sources * self.num_queries), cache.mem.device)
            x0 = self.query_rows(src) + self.window_pos(win.clamp_max(self.max_windows - 1))
            return layer.self_attn.kv(layer.norm_sa(x0.to(dtype)))[None].expand(b, -1, -1)
        return layer.self_attn.kv(cache.self_h[:, block - 1].to(dtype))

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
    ) -> tuple[QFormerOutput, QFormerCache]:
        """The views of windows appended after the cached ones, without re-encoding the past.

        Equal (to float rounding) to :meth:`forward` over the whole history for the new windows:
        a new window's queries attend to the keys/values of every earlier query and memory token
        (projected from the cache, :meth:`past_self_kv` and :meth:`_Block.memory_kv`), to the new
        memory tokens of windows ≤ theirs and to each other with the same block-causal mask. The
        cost is the new tokens' own plus one projection of the cache per block.

        Args:
            events: [B, E, dim] the new memory tokens (encoded events of the new windows; any
                encoder's tokens, e.g. :class:`~foundv2.nn.encoders.EventEncoder`'s).
            ev_window: [B, E] window of each new token, counted from the first new window (0).
            ev_source: [B, E] source index of each new token (for ``present``).
            ev_mask: [B, E] True on real tokens.
            win_mask: [B, W'] True on each user's real new windows (a prefix per user).
            cache: the users' cache (:meth:`empty_cache` when None: no earlier window), in any
                float dtype (a stored float16 cache is read as it is and computed in ``events``'s).
            context: always-visible tokens [B, M, dim]; only with ``cache=None`` (they are in the
                cache afterwards).
            delta: return only what this call adds to the cache (``self_h``/``mem`` hold the new
                rows, real first, ``*_len`` their counts; ``n_windows`` the updated count) instead
                of the whole updated cache: what a store that keeps the earlier rows needs,
                without copying them.

        Returns:
            ``(QFormerOutput(views [B, W', S, dim], present [B, W', S]), the updated cache)``
            (its delta with ``delta=True``).
        """
        b, w_count = win_mask.shape
        s, q, d = self.num_sources, self.num_queries, self.dim
        device, dtype = events.device, events.dtype
        if cache is None:
            cache = self.empty_cache(b, context, dtype, device)
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

        past, past_mem = cache.self_h.shape[2], cache.mem.shape[2]
        old_self = torch.arange(past, device=device)[None, :] < cache.self_len[:, None]
        self_mask = torch.cat([old_self[:, None, :].expand(-1, len(win_tok), -1),
                               self.self_attention_mask(w_count, device)[None].expand(b, -1, -1)], dim=2)
        old_mem = torch.arange(past_mem, device=device)[None, :] < cache.mem_len[:, None]
        new_mem = ev_mask[:, None, :] & (ev_window[:, None, :] <= win_tok[None, :, None])

        # the new memory tokens, real ones first per user (the cache keeps them compact)
        order = torch.sort((~ev_mask).to(torch.int8), dim=1, stable=True).indices
        events_c = torch.gather(events, 1, order[..., None].expand(-1, -1, d))
        cross_mask = torch.cat([old_mem[:, None, :].expand(-1, len(win_tok), -1),
                                torch.gather(new_mem, 2, order[:, None, :].expand(-1, len(win_tok), -1))], dim=2)
        mem = torch.cat([cache.mem[:, 0].to(dtype), events_c], dim=1)
        new_h = []
        for layer, block in enumerate(self.blocks):
            x, h = block.forward_cached(x, self.past_self_kv(layer, cache, dtype), self_mask, block.memory_kv(mem),
                                        cross_mask)
            if layer:
                new_h.append(h)
        out = self._output(x, win_mask, ev_window, ev_source, ev_mask)
        new_tokens = n_new * s * q
        n_events = ev_mask.sum(1)
        new_h = torch.stack(new_h, 1) if new_h else x.new_zeros(b, 0, len(win_tok), d)
        if delta:
            return out, QFormerCache(new_h, new_tokens, events_c[:, None], n_events, cache.n_windows + n_new)
        updated = QFormerCache(
            _append_rows(cache.self_h.to(dtype), cache.self_len, new_h, new_tokens),
            cache.self_len + new_tokens,
            _append_rows(cache.mem.to(dtype), cache.mem_len, events_c[:, None], n_events),
            cache.mem_len + n_events,
            cache.n_windows + n_new,
        )
        return out, updated


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
