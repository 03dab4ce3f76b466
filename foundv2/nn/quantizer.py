"""Residual quantisation with shared and source-specific codebooks (the core of stage 2).

`ResidualGroupQuantizer` quantises latents of several *sources* over L residual levels. Every
level owns one table laid out as ``[shared block | block of source 0 | block of source 1 | ...]``
(either kind of block may be empty); a row of source ``s`` may only pick codes from the shared
block or from block ``s``: the distances to every other block are masked with +inf.
The two layouts are two ways to size the blocks:

- ``sequential`` (the paper, default): levels ``0 .. n_shared_levels-1`` have a shared block only,
  the next ``n_specific_levels`` levels have one block per source only.
- ``union`` (the official code): every one of the ``n_shared_levels + n_specific_levels`` levels
  has a shared block *and* one block per source.

Stored codes (`codes[:, l]`) index *the level's table as the row's source sees it*: in
``union`` the whole table (shared block first), in ``sequential`` the shared codebook on shared
levels and the source's own codebook on specific levels. Every (level, block, code) also has one
*global id* (`global_ids`), so code 12 of level 1 and code 12 of level 2 are different tokens.
All tables live in one parameter ``codebook[vocab_size, dim]`` indexed by global id.

Losses (RQ-VAE, Lee et al. 2022): per level ``l`` with residual ``r_l = z - sg(q_0 + .. + q_{l-1})``,
``codebook = mse(q_l, sg(r_l))`` and ``commit = mse(r_l, sg(q_l))``, each averaged over valid rows
and dimensions and then averaged over levels. ``loss_codebook`` and ``loss_commit`` are returned
unweighted (for logging); ``loss = loss_codebook + beta * loss_commit`` is what to train on.
With ``ema=True`` the codebook is not trained by gradients and ``loss_codebook`` is 0.

Distances, argmin, k-means, respawn and EMA updates run in fp32 with autocast disabled.
Codebook care (k-means init, dead-code respawn, EMA statistics) is decided identically on every
DDP rank: latents are all-gathered, rank 0 computes, the result is broadcast. Without a process
group everything runs locally.

Usage counters are summed over ranks once, at every training step, so they are identical on
every rank (DDP's buffer broadcast cannot corrupt them) and `usage_metrics` reads them as they are.

Determinism: the code vectors are gathered with `F.embedding`, whose backward accumulates in a
fixed order (``table[idx]``'s does not with more than one thread), so a fixed config trains to
bit-identical codes on CPU. Before the k-means init (or without it) the codebook is seeded from
the first batch's latents (``data_init``): an untrained encoder's latents are small, and N(0, 1)
codes far from them leave most codes unreachable.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from foundv2.options import Options

SHARED = -1  # block id of a level's shared block; source blocks are numbered 0 .. S-1
_EPS = 1e-8  # guards norms and divisions against zero


# --------------------------------------------------------------------------- distributed helpers
def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _is_rank0() -> bool:
    return not _dist_on() or dist.get_rank() == 0


def _gather_rows(x: Tensor) -> Tensor:
    """Concatenate ``x`` (rows may differ in number) from every rank; ``x`` itself when alone."""
    if not _dist_on():
        return x
    world = dist.get_world_size()
    n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
    sizes = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(sizes, n)
    longest = max(int(s) for s in sizes)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(s)] for p, s in zip(parts, sizes, strict=True)])


def _broadcast_(*tensors: Tensor) -> None:
    """Overwrite ``tensors`` on every rank with rank 0's values."""
    if _dist_on():
        for t in tensors:
            dist.broadcast(t, src=0)


def _all_reduce_sum(t: Tensor) -> Tensor:
    """Sum of ``t`` over ranks (a new tensor)."""
    t = t.clone()
    if _dist_on():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


# ----------------------------------------------------------------------------- maths helpers
def _sq_dist(x: Tensor, c: Tensor) -> Tensor:
    """Squared euclidean distances ``[N, K]`` between rows of ``x`` and ``c`` (fp32 inputs)."""
    return x.pow(2).sum(1, keepdim=True) - 2.0 * x @ c.t() + c.pow(2).sum(1)[None, :]


def _nearest(x: Tensor, c: Tensor) -> Tensor:
    """argmin_k ||x - c_k||² with one addmm: ||x||² is constant per row, so it is left out."""
    return torch.addmm(c.pow(2).sum(1), x, c.t(), alpha=-2.0).argmin(1)


def kmeans(x: Tensor, k: int, iters: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeding then ``iters`` Lloyd iterations; returns ``[k, dim]`` centres.

    With fewer points than centres, points are repeated; the duplicates end up unused and the
    dead-code respawn replaces them later. Empty clusters keep their previous centre.
    """
    n = x.shape[0]
    if n <= k:
        pick = torch.cat(
            [torch.randperm(n, generator=generator), torch.randint(n, (k - n,), generator=generator)]
        )
        return x[pick.to(x.device)].clone()
    first = int(torch.randint(n, (1,), generator=generator))
    centres = [x[first]]
    closest = (x - x[first]).pow(2).sum(1)
    for _ in range(1, k):  # k-means++: next centre drawn with probability ∝ squared distance
        weights = closest.clamp_min(0).cpu().double()
        nxt = int(torch.multinomial(weights, 1, generator=generator)) if weights.sum() > 0 else 0
        centres.append(x[nxt])
        closest = torch.minimum(closest, (x - x[nxt]).pow(2).sum(1))
    c = torch.stack(centres)
    for _ in range(iters):
        assign = _sq_dist(x, c).argmin(1)
        counts = torch.bincount(assign, minlength=k).to(x.dtype)
        sums = torch.zeros_like(c).index_add_(0, assign, x)
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled, None]
    return c


def _sinkhorn_argmin(d: Tensor, iters: int, temperature: float) -> Tensor:
    """Balanced assignment: Sinkhorn-Knopp on ``exp(-d / (temperature * std(d)))``, then argmax.

    Masked (+inf) distances get zero mass; codes that no row may reach are left out of the
    column normalisation. ``d`` is ``[N, K]`` fp32.
    """
    finite = torch.isfinite(d)
    scale = d[finite].std().clamp_min(_EPS) * temperature
    logits = torch.where(finite, -(d - d[finite].min()) / scale, torch.full_like(d, -math.inf))
    reachable = finite.any(0, keepdim=True)
    for _ in range(iters):
        col = torch.logsumexp(logits, dim=0, keepdim=True)
        logits = logits - torch.where(reachable, col, torch.zeros_like(col))  # equal mass per code
        logits = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # one unit per row
    return logits.argmax(1)


def _rotate_to(e: Tensor, q: Tensor) -> Tensor:
    """Rotation trick (Fifty et al. 2024): maps ``e`` onto ``q`` by a rotation + rescaling treated
    as a constant, so the gradient wrt ``e`` is rotated instead of copied. Value ≈ ``q``."""
    e_norm = e.norm(dim=1, keepdim=True).clamp_min(_EPS)
    q_norm = q.norm(dim=1, keepdim=True).clamp_min(_EPS)
    e_hat = (e / e_norm).detach()
    q_hat = (q / q_norm).detach()
    r = e_hat + q_hat
    r = (r / r.norm(dim=1, keepdim=True).clamp_min(_EPS)).detach()
    scale = (q_norm / e_norm).detach()
    return scale * (e - 2 * r * (r * e).sum(1, keepdim=True) + 2 * q_hat * (e_hat * e).sum(1, keepdim=True))


def _masked_mse(a: Tensor, b: Tensor, valid: Tensor) -> Tensor:
    """Mean squared error over valid rows and all dimensions; 0 (not NaN) without valid rows."""
    sq = (a - b).pow(2).sum(1) * valid
    return sq.sum() / (valid.sum().clamp_min(1) * a.shape[1])


def _as_list(x: int | Sequence[int], n: int, name: str) -> list[int]:
    out = [int(x)] * n if isinstance(x, int) else [int(v) for v in x]
    if len(out) != n:
        raise ValueError(f"{name} has {len(out)} entries, expected {n}")
    return out


# ------------------------------------------------------------------------------------ config
@dataclass(frozen=True)
class QuantizerConfig(Options):
    """The quantiser's layout and codebook care: one set of options and defaults, shared by
    `ResidualGroupQuantizer`, `foundv2.nn.mrqvae.MultiViewRQVAE` and the tokenizer stage (its
    ``--model.quantizer.*`` options; each attribute's docstring is the ``--help`` text)."""

    GROUP: ClassVar[str] = "quantizer"

    layout: Literal["sequential", "union"] = "sequential"
    """``sequential`` (paper: shared levels, then per-source levels) or ``union`` (official code:
    every level holds a shared block and one block per source)."""
    n_shared_levels: int = 4
    """sequential: levels with one shared codebook (paper 4); union: together with
    ``n_specific_levels``, the number of levels."""
    n_specific_levels: int = 2
    """sequential: the following levels, one codebook per source (paper 2)."""
    shared_codes: int | list[int] = 1024
    """Codes of a shared codebook (block): one int, or one per shared level (union: per level)."""
    specific_codes: int | list[int] = 1024
    """Codes of a source's codebook (block): one int, or one per specific level (union: per level)."""
    beta: float = 0.25
    """Commitment weight in ``loss = loss_codebook + beta * loss_commit`` (paper 0.25)."""
    kmeans_init: bool = True
    """Initialise every level by k-means on the residuals of buffered real latents."""
    kmeans_buffer: int = 4096
    """Latents (summed over ranks) buffered before the k-means init; a few times the largest block."""
    kmeans_iters: int = 10
    """Lloyd iterations of the k-means init, after k-means++ seeding."""
    data_init: bool = True
    """Seed the codebook from the first training batch's latents (k-means++ seeding, no
    iterations), so that most codes are reachable before the k-means init (or without it)."""
    respawn: bool = True
    """Replace dead codes on every level with recent residuals of that level."""
    respawn_every: int = 100
    """Training steps in a respawn (usage) window."""
    dead_fraction: float = 0.03
    """A code used less than this fraction of its block's mean use in the window is dead (a code
    of a block with no use at all is always dead)."""
    recent_size: int = 2048
    """Recent latents kept (per rank) to draw replacements from."""
    ema: bool = False
    """Update codes by exponential moving averages instead of gradients (paper: no EMA)."""
    ema_decay: float = 0.99
    """EMA decay."""
    sinkhorn_last: bool = False
    """Balance the last level's assignment with Sinkhorn-Knopp in training."""
    sinkhorn_iters: int = 5
    """Sinkhorn-Knopp iterations."""
    sinkhorn_temperature: float = 0.05
    """Softmax temperature of the Sinkhorn assignment, in units of the distances' std."""
    rotation_trick: bool = False
    """Pass gradients through the rotation trick (Fifty et al. 2024) instead of straight-through."""
    codebook_init_std: float = 1.0
    """Std of the N(0, std²) initial codebook (before any data or k-means init; official code: 1)."""
    seed: int = 0
    """Seed of the generator used by k-means and respawn (rank 0)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("shared_codes", "specific_codes"):  # lists, not tuples: config.json round-trips
            value = getattr(self, name)
            if not isinstance(value, int):
                object.__setattr__(self, name, [int(v) for v in value])


# ------------------------------------------------------------------------------------ layout
@dataclass(frozen=True)
class LevelLayout:
    """One level's table: ``[shared block | S source blocks]``, global ids from ``offset``."""

    offset: int  # global id of the level's first code
    n_shared: int  # size of the shared block (0: none)
    n_specific: int  # size of each source's block (0: none)
    n_sources: int

    @property
    def size(self) -> int:
        return self.n_shared + self.n_sources * self.n_specific

    def block(self, block: int) -> tuple[int, int]:
        """(start, stop) of a block inside the level's table; ``block`` is SHARED or a source."""
        if block == SHARED:
            return 0, self.n_shared
        start = self.n_shared + block * self.n_specific
        return start, start + self.n_specific

    def blocks(self) -> list[int]:
        """The non-empty blocks of this level."""
        out = [SHARED] if self.n_shared else []
        return out + (list(range(self.n_sources)) if self.n_specific else [])


@dataclass
class QuantizerOutput:
    """What `ResidualGroupQuantizer.forward` returns."""

    quantized: Tensor  # [N, dim] sum of the chosen codes, gradient straight-through (or rotated) to z
    codes: Tensor  # [N, L] long, index in the level's table as the row's source sees it; -1 if masked
    loss_codebook: Tensor  # scalar, unweighted
    loss_commit: Tensor  # scalar, unweighted (multiply by beta, or use `loss`)
    loss: Tensor  # loss_codebook + beta * loss_commit
    counts: Tensor  # [vocab_size] float, this batch's code usage by global id (valid rows only)


# --------------------------------------------------------------------------------- quantizer
class ResidualGroupQuantizer(nn.Module):
    """Residual quantiser over L levels with shared and per-source codebooks.

    Args:
        dim: latent (code) dimension.
        sources: source names (their order defines the source index used in ``forward``).
        config: layout and codebook care (`QuantizerConfig`; its attributes are documented there).
    """

    def __init__(self, dim: int, sources: Sequence[str], config: QuantizerConfig = QuantizerConfig()) -> None:
        super().__init__()
        self.dim = dim
        self.sources = list(sources)
        self.config = config
        self.layout = config.layout
        self.beta = config.beta
        layout, n_shared_levels, n_specific_levels = config.layout, config.n_shared_levels, config.n_specific_levels
        shared_codes, specific_codes = config.shared_codes, config.specific_codes

        n_src, n_levels = len(self.sources), n_shared_levels + n_specific_levels
        if layout == "sequential":
            sizes = [(k, 0) for k in _as_list(shared_codes, n_shared_levels, "shared_codes")]
            sizes += [(0, k) for k in _as_list(specific_codes, n_specific_levels, "specific_codes")]
        else:
            sizes = list(
                zip(
                    _as_list(shared_codes, n_levels, "shared_codes"),
                    _as_list(specific_codes, n_levels, "specific_codes"),
                    strict=True,
                )
            )
        self.levels: list[LevelLayout] = []
        offset = 0
        for n_shared, n_specific in sizes:
            self.levels.append(LevelLayout(offset, n_shared, n_specific, n_src))
            offset += self.levels[-1].size
        self.vocab_size = offset
        if min(lv.size for lv in self.levels) == 0:
            raise ValueError("every level needs at least one code")

        # allowed[s, g]: source s may pick global id g; local_base[l, s]: table index - stored code
        allowed = torch.zeros(n_src, self.vocab_size, dtype=torch.bool)
        local_base = torch.zeros(n_levels, n_src, dtype=torch.long)
        for li, lv in enumerate(self.levels):
            for s in range(n_src):
                for b in (SHARED, s):
                    start, stop = lv.block(b)
                    allowed[s, lv.offset + start : lv.offset + stop] = True
                if layout == "sequential" and lv.n_specific:
                    local_base[li, s] = lv.block(s)[0]
        self.register_buffer("allowed", allowed, persistent=False)
        self.register_buffer("local_base", local_base, persistent=False)
        self.register_buffer(
            "level_offsets", torch.tensor([lv.offset for lv in self.levels]), persistent=False
        )

        self.codebook = nn.Parameter(
            torch.randn(self.vocab_size, dim) * config.codebook_init_std, requires_grad=not config.ema
        )
        if config.ema:
            self.register_buffer("ema_count", torch.ones(self.vocab_size))
            self.register_buffer("ema_sum", self.codebook.detach().clone())
        self.register_buffer("initialised", torch.tensor(not config.kmeans_init))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # training forwards so far
        self.register_buffer("usage", torch.zeros(self.vocab_size))  # since `reset_usage`, training
        self.register_buffer("window_usage", torch.zeros(self.vocab_size))  # current respawn window
        self.register_buffer("respawned", torch.zeros(n_levels))  # codes respawned since reset
        # recent latents for respawn (ring buffer, local to the rank); saved in checkpoints so that
        # a resumed run respawns from the same rows as an uninterrupted one
        self.register_buffer("recent", torch.zeros(config.recent_size, dim))
        self.register_buffer("recent_source", torch.full((config.recent_size,), -1, dtype=torch.long))
        self.register_buffer("recent_ptr", torch.zeros((), dtype=torch.long))
        self._init_rows: list[tuple[Tensor, Tensor]] = []  # buffered (latents, sources) before init

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        recent = state_dict.get(prefix + "recent")
        if recent is not None and recent.dim() == 3:  # saved before the buffer held latents only
            state_dict[prefix + "recent"] = recent[:, 0]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n_levels(self) -> int:
        return len(self.levels)

    # ------------------------------------------------------------------------------ forward
    def _assign(self, r: Tensor, level: int, source: Tensor, table: Tensor, balanced: bool = False) -> Tensor:
        """Index in the level's table of the nearest allowed code for each row (no gradient)."""
        lv = self.levels[level]
        if balanced and r.shape[0] > 1:  # Sinkhorn needs the whole masked distance matrix
            d = _sq_dist(r, table)
            d = d.masked_fill(~self.allowed[source, lv.offset : lv.offset + lv.size], math.inf)
            return _sinkhorn_argmin(d, self.config.sinkhorn_iters, self.config.sinkhorn_temperature)
        if not lv.n_specific:
            return _nearest(r, table)
        # per source, only the blocks it may use: no distances computed just to be masked away
        idx = torch.empty(r.shape[0], dtype=torch.long, device=r.device)
        shared = torch.arange(lv.n_shared, device=r.device)
        for s in torch.unique(source).tolist():
            rows = (source == s).nonzero().flatten()
            start, stop = lv.block(s)
            cols = torch.cat([shared, torch.arange(start, stop, device=r.device)])
            idx[rows] = cols[_nearest(r[rows], table[cols])]
        return idx

    def forward(self, z: Tensor, source: Tensor, mask: Tensor | None = None) -> QuantizerOutput:
        """Quantise ``z [N, dim]`` of sources ``source [N]``; rows with ``mask`` False are ignored
        (zero output, codes -1, no loss, no usage)."""
        valid = torch.ones_like(source, dtype=torch.bool) if mask is None else mask.bool()
        src = torch.where(valid, source.long(), 0).clamp(0, len(self.sources) - 1)
        with torch.autocast(device_type=z.device.type, enabled=False):
            z32 = z.float()
            if self.training and self.config.data_init and int(self.step) == 0:
                self.init_from_data(z32[valid].detach(), src[valid])
            if self.training and not bool(self.initialised):
                self._collect_for_init(z32[valid].detach(), src[valid])
            codebook = self.codebook.float()
            residual = z32
            q_total = torch.zeros_like(z32)
            codes = torch.full((z.shape[0], self.n_levels), -1, dtype=torch.long, device=z.device)
            gids = torch.full_like(codes, -1)
            loss_codebook = z32.new_zeros(())
            loss_commit = z32.new_zeros(())
            for li, lv in enumerate(self.levels):
                table = codebook[lv.offset : lv.offset + lv.size]
                r_det = residual.detach()
                with torch.no_grad():
                    last = li == self.n_levels - 1
                    balanced = self.config.sinkhorn_last and last and self.training
                    idx = torch.zeros_like(src)
                    idx[valid] = self._assign(r_det[valid], li, src[valid], table.detach(), balanced)
                # F.embedding, not table[idx]: its backward accumulates in a fixed order (deterministic)
                q = torch.where(valid[:, None], F.embedding(idx, table), 0.0)
                codes[:, li] = torch.where(valid, idx - self.local_base[li, src], -1)
                gids[:, li] = torch.where(valid, idx + lv.offset, -1)
                loss_codebook = loss_codebook + _masked_mse(q, r_det, valid)
                loss_commit = loss_commit + _masked_mse(residual, q.detach(), valid)
                q_total = q_total + q.detach()
                residual = residual - q.detach()
            loss_codebook = loss_codebook / self.n_levels
            loss_commit = loss_commit / self.n_levels
            if self.config.ema:
                loss_codebook = loss_codebook.detach() * 0.0
            # value exactly q_total; gradient of g (identity = straight-through, or rotated)
            g = _rotate_to(z32, q_total) if self.config.rotation_trick else z32
            quantized = q_total + torch.where(valid[:, None], g - g.detach(), 0.0)
            counts = torch.bincount(gids[valid].flatten(), minlength=self.vocab_size).float()
            if self.training and self.config.respawn and bool(self.initialised):
                self._remember(z32[valid].detach(), src[valid])
            if self.training:
                self._after_step(counts, gids, residual_inputs=(z32.detach(), valid))
        return QuantizerOutput(
            quantized=quantized.to(z.dtype),
            codes=codes,
            loss_codebook=loss_codebook,
            loss_commit=loss_commit,
            loss=loss_codebook + self.beta * loss_commit,
            counts=counts,
        )

    @torch.no_grad()
    def encode(self, z: Tensor, source: Tensor, mask: Tensor | None = None) -> Tensor:
        """The codes ``[N, L]`` of ``z [N, dim]`` (-1 for rows with ``mask`` False), exactly those of
        ``forward`` in eval mode, without its losses, straight-through output, usage counts or
        training side effects: what inference (the tokenizer's predict) needs."""
        valid = torch.ones_like(source, dtype=torch.bool) if mask is None else mask.bool()
        src = torch.where(valid, source.long(), 0).clamp(0, len(self.sources) - 1)
        everyone = bool(valid.all())
        with torch.autocast(device_type=z.device.type, enabled=False):
            codebook = self.codebook.detach().float()
            residual = z.float() if everyone else z.float()[valid]
            rows_src = src if everyone else src[valid]
            codes = torch.full((z.shape[0], self.n_levels), -1, dtype=torch.long, device=z.device)
            for li, lv in enumerate(self.levels):
                table = codebook[lv.offset : lv.offset + lv.size]
                idx = self._assign(residual, li, rows_src, table)
                local = idx - self.local_base[li, rows_src]
                if everyone:
                    codes[:, li] = local
                else:
                    codes[valid, li] = local
                if li + 1 < self.n_levels:
                    residual = residual - F.embedding(idx, table)
        return codes

    # ------------------------------------------------------------------------ ids and decode
    def global_ids(self, codes: Tensor, source: Tensor) -> Tensor:
        """Map stored ``codes [N, L]`` of sources ``source [N]`` to global ids in
        ``[0, vocab_size)``; -1 stays -1."""
        src = source.long().clamp(0, len(self.sources) - 1)
        gid = codes + self.level_offsets[None, :] + self.local_base.t()[src]
        return torch.where(codes >= 0, gid, -1)

    def token_info(self, gids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inverse of `global_ids`: (level, block, index in block) per id; block is SHARED (-1)
        or a source index. Entries of -1 ids are -1."""
        ok = gids >= 0
        g = gids.clamp_min(0)
        level = torch.searchsorted(self.level_offsets, g, right=True) - 1
        n_shared = torch.tensor([lv.n_shared for lv in self.levels], device=g.device)[level]
        n_specific = torch.tensor([lv.n_specific for lv in self.levels], device=g.device)[level]
        in_level = g - self.level_offsets[level]
        is_shared = in_level < n_shared
        spec = (in_level - n_shared).clamp_min(0)
        block = torch.where(is_shared, SHARED, spec // n_specific.clamp_min(1))
        index = torch.where(is_shared, in_level, spec % n_specific.clamp_min(1))
        return tuple(torch.where(ok, t, -1) for t in (level, block, index))  # type: ignore[return-value]

    def codes_from_global_ids(self, gids: Tensor) -> tuple[Tensor, Tensor]:
        """Inverse of `global_ids` for rows ``[N, L]``: (codes [N, L], source [N]). The source is
        read from the first source-specific id of the row, -1 when the row has none."""
        level, block, _ = self.token_info(gids)
        blocks = torch.where(block >= 0, block, torch.iinfo(torch.long).max).min(1).values
        source = torch.where(blocks == torch.iinfo(torch.long).max, -1, blocks)
        bases = self.global_ids(torch.zeros_like(gids), source.clamp_min(0))  # global id of code 0
        return torch.where(gids >= 0, gids - bases, -1), source

    def decode_codes(self, codes: Tensor, source: Tensor) -> Tensor:
        """Sum of the code vectors of ``codes [N, L]`` (fp32, zero for -1); in eval mode equal
        to ``forward(...).quantized``."""
        gid = self.global_ids(codes, source)
        codebook = self.codebook.detach().float()
        out = torch.zeros(codes.shape[0], self.dim, device=codes.device)
        for li in range(self.n_levels):
            out = out + torch.where(gid[:, li, None] >= 0, codebook[gid[:, li].clamp_min(0)], 0.0)
        return out

    # ------------------------------------------------------------------------- codebook care
    def _generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(self.config.seed + int(self.step))

    @torch.no_grad()
    def init_from_data(self, z: Tensor, source: Tensor) -> None:
        """Seed every level from the latents ``z`` of all ranks (k-means++ seeding, no Lloyd
        iterations; level l on the residuals left by levels < l). Run on the first training
        batch: the random N(0, std²) codes are far from an untrained encoder's small latents, and
        nearly all of them would be unreachable until the k-means init (for ever without it)."""
        self._fit_levels(z, source, iters=0)

    @torch.no_grad()
    def _collect_for_init(self, z: Tensor, source: Tensor) -> None:
        """Buffer latents; once ``kmeans_buffer`` rows exist over all ranks, run the k-means init."""
        self._init_rows.append((z, source))
        have = _all_reduce_sum(torch.tensor(sum(r.shape[0] for r, _ in self._init_rows), device=z.device))
        if int(have) >= self.config.kmeans_buffer:
            self.init_codebooks()

    @torch.no_grad()
    def init_codebooks(self) -> None:
        """k-means init of every level from the buffered latents of all ranks."""
        z = torch.cat([r for r, _ in self._init_rows]) if self._init_rows else self.codebook.new_zeros(0, self.dim)
        s = torch.cat([s for _, s in self._init_rows]) if self._init_rows else z.new_zeros(0, dtype=torch.long)
        self._fit_levels(z, s, iters=self.config.kmeans_iters)
        self.initialised.fill_(True)
        self._init_rows = []

    def _fit_levels(self, z: Tensor, s: Tensor, iters: int) -> None:
        """k-means (``iters`` Lloyd iterations) of every level on the gathered rows of all ranks;
        rank 0 computes and broadcasts. Level l is fitted on the residuals left by levels < l, the
        shared block on all rows, a source's block on that source's rows."""
        z, s = _gather_rows(z.float()), _gather_rows(s)
        table = self.codebook.detach().float().clone()
        if _is_rank0() and z.shape[0] > 0:
            gen = self._generator()
            residual = z
            for li, lv in enumerate(self.levels):
                for b in lv.blocks():
                    rows = residual if b == SHARED else residual[s == b]
                    start, stop = lv.block(b)
                    if rows.shape[0] > 0:
                        table[lv.offset + start : lv.offset + stop] = kmeans(rows, stop - start, iters, gen)
                level_table = table[lv.offset : lv.offset + lv.size]
                residual = residual - level_table[self._assign(residual, li, s, level_table)]
        _broadcast_(table)
        self.codebook.data.copy_(table.to(self.codebook.dtype))
        if self.config.ema:
            self.ema_count.fill_(1.0)
            self.ema_sum.copy_(table)

    @torch.no_grad()
    def _remember(self, z: Tensor, source: Tensor) -> None:
        """Write this step's latents into the ring buffer the respawn draws from."""
        n = min(z.shape[0], self.config.recent_size)
        pos = (int(self.recent_ptr) + torch.arange(n, device=z.device)) % self.config.recent_size
        self.recent[pos] = z[-n:]
        self.recent_source[pos] = source[-n:]
        self.recent_ptr.fill_((int(self.recent_ptr) + n) % self.config.recent_size)

    @torch.no_grad()
    def _after_step(self, counts: Tensor, gids: Tensor, residual_inputs: tuple[Tensor, Tensor]) -> None:
        """Usage bookkeeping, EMA update and, every ``respawn_every`` steps, the respawn."""
        self.step += 1
        if not bool(self.initialised):
            return
        # usage summed over ranks every step (and only here): the counters are identical
        # everywhere, so DDP's buffer broadcast (on by default) cannot corrupt them
        counts = _all_reduce_sum(counts)
        self.usage += counts
        self.window_usage += counts
        if self.config.ema:
            self._ema_update(gids, *residual_inputs)
        if self.config.respawn and int(self.step) % self.config.respawn_every == 0:
            self.respawn_dead_codes()

    @torch.no_grad()
    def _ema_update(self, gids: Tensor, z: Tensor, valid: Tensor) -> None:
        """EMA of per-code counts and residual sums (summed over ranks), codebook = sum / count."""
        codebook = self.codebook.detach().float()
        counts = torch.zeros(self.vocab_size, device=z.device)
        sums = torch.zeros(self.vocab_size, self.dim, device=z.device)
        residual = z[valid]
        for li in range(self.n_levels):
            g = gids[valid, li]
            counts.index_add_(0, g, torch.ones_like(g, dtype=counts.dtype))
            sums.index_add_(0, g, residual)
            residual = residual - codebook[g]
        counts, sums = _all_reduce_sum(counts), _all_reduce_sum(sums)
        self.ema_count.mul_(self.config.ema_decay).add_(counts, alpha=1 - self.config.ema_decay)
        self.ema_sum.mul_(self.config.ema_decay).add_(sums, alpha=1 - self.config.ema_decay)
        alive = self.ema_count > _EPS
        new = torch.where(alive[:, None], self.ema_sum / self.ema_count.clamp_min(_EPS)[:, None], codebook)
        self.codebook.data.copy_(new.to(self.codebook.dtype))

    @torch.no_grad()
    def respawn_dead_codes(self) -> Tensor:
        """Replace, on every level and block, the codes whose use in the current window (summed
        over ranks) is below ``dead_fraction`` × the block's mean, or zero, by random residuals of
        recent latents (of the block's source). Levels are respawned in order and a level's
        residuals are computed with the levels above it *as respawned*: residuals recorded before
        would be those of codes that no longer exist, and the new codes of a level would not fit
        what now reaches it (a loss spike of 20x on synthetic data). Returns the number respawned
        per level; resets the window. Identical on every rank."""
        window = self.window_usage  # already summed over ranks
        have = self.recent_source >= 0
        residual = _gather_rows(self.recent[have])
        recent_source = _gather_rows(self.recent_source[have])
        table = self.codebook.detach().float().clone()
        replaced = torch.zeros(self.vocab_size, device=table.device)
        if _is_rank0() and residual.shape[0] > 0:
            gen = self._generator()
            for li, lv in enumerate(self.levels):
                for b in lv.blocks():
                    start, stop = lv.block(b)
                    use = window[lv.offset + start : lv.offset + stop]
                    # `| (use == 0)`: in a block nobody used, mean × fraction is 0 and `<` is false
                    dead = ((use < self.config.dead_fraction * use.mean()) | (use == 0)).nonzero().flatten()
                    pool = residual if b == SHARED else residual[recent_source == b]
                    if dead.numel() == 0 or pool.shape[0] == 0:
                        continue
                    if pool.shape[0] >= dead.numel():
                        pick = torch.randperm(pool.shape[0], generator=gen)[: dead.numel()]
                    else:
                        pick = torch.randint(pool.shape[0], (dead.numel(),), generator=gen)
                    table[lv.offset + start + dead] = pool[pick.to(pool.device)]
                    replaced[lv.offset + start + dead] = 1.0
                level_table = table[lv.offset : lv.offset + lv.size]
                residual = residual - level_table[self._assign(residual, li, recent_source, level_table)]
        _broadcast_(table, replaced)
        self.codebook.data.copy_(table.to(self.codebook.dtype))
        if self.config.ema:
            hit = replaced.bool()
            self.ema_count[hit] = 1.0
            self.ema_sum[hit] = table[hit]
        per_level = torch.stack([replaced[lv.offset : lv.offset + lv.size].sum() for lv in self.levels])
        self.respawned += per_level
        self.window_usage.zero_()
        return per_level

    # --------------------------------------------------------------------------------- usage
    def reset_usage(self) -> None:
        """Zero the per-epoch usage and respawn counters (call at the start of an epoch)."""
        self.usage.zero_()
        self.respawned.zero_()

    @torch.no_grad()
    def usage_metrics(self, counts: Tensor | None = None, sync: bool = False) -> dict[str, float]:
        """Codebook health from usage counts by global id (default: the training usage since
        `reset_usage`, already summed over ranks at every step; ``sync`` sums given ``counts``
        over ranks, e.g. a batch's `QuantizerOutput.counts`): ``util/L{l}/shared``,
        ``util/L{l}/<source>`` (share of the block's codes used), ``perplexity/L{l}`` (exp of
        the entropy of the level's code distribution), ``dead_codes/L{l}`` (unused codes of the
        level), ``respawned/L{l}``. Levels are numbered from 0 like the columns of ``codes``."""
        if counts is None:
            counts = self.usage
        elif sync:
            counts = _all_reduce_sum(counts)
        out: dict[str, float] = {}
        for li, lv in enumerate(self.levels):
            level = counts[lv.offset : lv.offset + lv.size].float()
            for b in lv.blocks():
                start, stop = lv.block(b)
                name = "shared" if b == SHARED else self.sources[b]
                out[f"util/L{li}/{name}"] = float((level[start:stop] > 0).float().mean())
            p = level / level.sum().clamp_min(_EPS)
            out[f"perplexity/L{li}"] = float(torch.exp(-(p * p.clamp_min(_EPS).log()).sum()))
            out[f"dead_codes/L{li}"] = float((level == 0).sum())
            out[f"respawned/L{li}"] = float(self.respawned[li])
        return out
