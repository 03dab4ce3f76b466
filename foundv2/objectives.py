"""Multi-scale alignment objectives (FOUNDv2) and the stage-1 reconstruction objective.

One module for stage 1 (continuous Q-Former views) and stage 3 (Transformer over token
sequences): every objective takes generic tensors — sequence representations [B, T, D],
masks, window keys, pooled user vectors — never a stage's batch.

- :func:`info_nce`: InfoNCE with in-batch negatives, gathered across DDP ranks *with
  gradients* (``torch.distributed.nn.functional.all_gather``; ranks may hold different
  numbers of rows), optional false-negative masking, returns loss and retrieval accuracy.
- :class:`FineGrainedObjective` (behavioural dependencies): from the representation up to
  step k predict step k + 1 — InfoNCE against in-batch candidates, or the paper's
  ``(1 + k/τ)·(1 − cos)``.
- :class:`WindowObjective` (periodicity): InfoNCE between windows of one user whose keys
  differ by ``period``; negatives are other users' windows.
- :class:`SemanticObjective` (future intent): InfoNCE between the user's representation at the
  end of the history and the embedding of a text describing its future behaviour.
- :class:`ReconstructionObjective`: per-source reconstruction of pooled input features
  (:func:`foundv2.nn.slices.pooled_slice_targets`) on present slices.
- :class:`DistillObjective` (stage 3 only, off unless weighted): regress a teacher's per-user
  vector (stage 1's continuous features, standardised) from the user's representation, on
  training users only, so that what quantisation blurred is learned back as a function of the
  tokens.
- :class:`MultiScaleObjectives`: the weighted sum, every term switchable, each term's loss and
  accuracy reported under ``loss/<term>`` and ``acc/<term>``.

Under DDP every rank must call the same terms in the same order (the gathers are
collectives); a rank with no rows for a term still takes part and contributes a zero loss
that stays connected to the graph.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Literal, NamedTuple, get_args

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from foundv2.options import Options

TERMS = ("fine", "window", "semantic", "recon", "distill")
FineMode = Literal["infonce", "cosine"]  # the fine term: InfoNCE, or the paper's weighted cosine
FINE_MODES = get_args(FineMode)
# paper: 0.2/0.4/0.4; distill is ours and off unless given a weight (it needs a teacher)
DEFAULT_WEIGHTS = {"fine": 0.2, "window": 0.4, "semantic": 0.4, "recon": 1.0, "distill": 0.0}
# Offset that keeps default row keys of different ranks apart when they are gathered.
RANK_KEY_OFFSET = 1 << 40


# --------------------------------------------------------------------------- distributed helpers


def _dist_on() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _rank() -> int:
    return dist.get_rank() if _dist_on() else 0


def _all_sizes(n: int, device: torch.device) -> list[int]:
    """Row counts of every rank (a collective)."""
    t = torch.tensor([n], dtype=torch.long, device=device)
    out = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [int(x) for x in out]


def _gather_rows(x: torch.Tensor, sizes: list[int], with_grad: bool) -> torch.Tensor:
    """Concatenate ``x`` [n, ...] of all ranks (rank order); rows are padded to the largest
    rank for the collective and the padding is cut off again."""
    nmax = max(sizes)
    if x.shape[0] < nmax:
        x = torch.cat([x, x.new_zeros(nmax - x.shape[0], *x.shape[1:])])
    x = x.contiguous()
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x)
    return torch.cat([p[:s] for p, s in zip(parts, sizes, strict=True)])



class GlobalBatch(NamedTuple):
    """What :func:`gather_batch` returns: the rows of every rank, concatenated in rank order
    (``None`` stays ``None``), this rank's first global row ``offset``, the global row count
    ``total``, and ``anchor``: a 0-valued term that holds every tensor gathered with gradients
    in the graph; add it to the loss on every rank (the backward of such a gather is itself a
    collective, so every rank must run it)."""

    rows: list[torch.Tensor | None]
    offset: int
    total: int
    anchor: torch.Tensor | float


def gather_batch(tensors: Sequence[torch.Tensor | None], with_grad: Sequence[bool], gather: bool = True) -> GlobalBatch:
    """The global batch of contrastive rows under DDP (a collective: every rank calls it, also
    one with 0 rows; ranks may hold different numbers of rows). ``tensors`` all have this
    rank's rows first ([n, ...]); ``with_grad[i]`` says whether tensor i is gathered with
    gradients (embeddings) or without (keys). Without DDP, or with ``gather`` False, the local
    rows come back as they are."""
    n = next(t.shape[0] for t in tensors if t is not None)
    if not (gather and _dist_on()):
        return GlobalBatch(list(tensors), 0, n, 0.0)
    device = next(t.device for t in tensors if t is not None)
    sizes = _all_sizes(n, device)
    rows, anchor = [], 0.0
    for t, grad in zip(tensors, with_grad, strict=True):
        if t is None or sum(sizes) == 0:
            rows.append(t)
            continue
        rows.append(_gather_rows(t, sizes, with_grad=grad))
        if grad:
            anchor = anchor + rows[-1].sum() * 0.0
    return GlobalBatch(rows, sum(sizes[: _rank()]), sum(sizes), anchor)


# --------------------------------------------------------------------------- InfoNCE


def _directional_nce(
    anchors: torch.Tensor,
    cands: torch.Tensor,
    labels: torch.Tensor,
    tau: float,
    fn_margin: float | None,
    anchor_keys: torch.Tensor | None,
    cand_keys: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    sim = anchors @ cands.T  # [n, M]
    rows = torch.arange(anchors.shape[0], device=anchors.device)
    drop = torch.zeros_like(sim, dtype=torch.bool)
    if fn_margin is not None:
        pos = sim.detach()[rows, labels]
        drop |= sim.detach() > pos[:, None] + fn_margin
    if anchor_keys is not None and cand_keys is not None:
        drop |= anchor_keys[:, None] == cand_keys[None, :]
    drop[rows, labels] = False  # the positive is never dropped: no all-masked row
    logits = (sim / tau).masked_fill(drop, float("-inf"))
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(dim=1) == labels).float().mean()
    return loss, acc


def info_nce(
    a: torch.Tensor,
    b: torch.Tensor,
    tau: float = 0.07,
    gather: bool = True,
    fn_margin: float | None = None,
    keys: torch.Tensor | None = None,
    symmetric: bool = True,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE between paired rows ``a[i] ↔ b[i]`` with in-batch negatives.

    Args:
        a: [N, D] anchors.
        b: [N, D] positives (row i is the positive of ``a[i]``; the other rows are negatives).
        tau: temperature.
        gather: when ``torch.distributed`` is initialised, gather the rows of all ranks *with
            gradients*, so negatives come from the global batch (N may differ per rank); else
            local only.
        fn_margin: false-negative masking: drop a negative whose similarity to the anchor
            exceeds the positive's by more than this margin (Q-Anchor uses 0.1); None = off.
        keys: [N] int group ids; negatives with the anchor's key are dropped (e.g. other
            windows of the same user, or duplicate texts). Must be unique across ranks.
        symmetric: average the a→b and b→a directions (CLIP-style); else a→b only.
        normalize: L2-normalise rows first (cosine similarity).

    Returns:
        ``(loss, acc)``: the mean loss over this rank's rows (with equal rows per rank, DDP's
        gradient averaging then gives exactly the global-batch loss's gradient) and the a→b top-1 retrieval accuracy among all
        candidates (detached). Both are 0 (loss still in the graph) when there are no rows.
    """
    a, b = a.float(), b.float()
    if normalize:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    n = a.shape[0]
    g = gather_batch([b, a if symmetric else None, keys], [True, True, False], gather)
    zero = (a.sum() + b.sum()) * 0.0 + g.anchor
    if n == 0 or g.total == 0:
        return zero, zero.detach()
    all_b, all_a, all_keys = g.rows
    labels = g.offset + torch.arange(n, device=a.device)
    loss, acc = _directional_nce(a, all_b, labels, tau, fn_margin, keys, all_keys)
    if symmetric:
        loss_ba, _ = _directional_nce(b, all_a, labels, tau, fn_margin, keys, all_keys)
        loss = 0.5 * (loss + loss_ba)
    return loss + zero, acc


# --------------------------------------------------------------------------- helpers


def last_valid(reps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The representation at each user's last valid step: [B, T, D], [B, T] → [B, D]
    (zeros for a user with no valid step)."""
    t = torch.arange(mask.shape[1], device=mask.device)
    last = torch.where(mask, t, torch.full_like(t, -1)).max(dim=1).values
    out = reps[torch.arange(reps.shape[0], device=reps.device), last.clamp_min(0)]
    return out * (last >= 0)[:, None]


def _subsample(n: int, max_rows: int | None, device: torch.device) -> torch.Tensor | None:
    if max_rows is None or n <= max_rows:
        return None
    return torch.randperm(n, device=device)[:max_rows]


def _duplicate_keys(x: torch.Tensor) -> torch.Tensor:
    """[N] ids, equal for identical rows of ``x`` [N, D]. Rows are compared within a rank; a
    rank offset keeps duplicates on other ranks as (rare) negatives."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.unique(x, dim=0, return_inverse=True)[1] + _rank() * RANK_KEY_OFFSET


# --------------------------------------------------------------------------- objectives


class FineGrainedObjective(nn.Module):
    """Predict step k + 1 from the representation up to step k (behavioural dependencies).

    ``reps`` must already be causal (step k summarises steps ≤ k). Pairs are (k, k + 1) with
    both steps valid. Targets default to ``reps`` itself, detached (the next step's
    representation); pass ``targets`` for the paper's next-code embeddings.

    Modes:
        ``infonce``: InfoNCE of the prediction against all target steps of the (gathered)
            batch; collapse-proof, and the default.
        ``cosine``: the paper's ``(1 + k/τ_step)·(1 − cos(pred, target))``, normalised by the
            sum of the weights (so the loss lies in [0, 2]); its accuracy is the top-1 in-batch
            retrieval of the target, for logging only.

    Args:
        dim: width of ``reps``.
        target_dim: width of the targets (default ``dim``).
        mode: ``infonce`` or ``cosine``.
        tau: InfoNCE temperature.
        step_tau: τ of the cosine mode's step weighting ``1 + k/τ`` (in steps; later steps,
            which see more context, weigh more).
        hidden: hidden width of the predictor MLP (default ``2 * dim``).
        max_pairs: at most this many (k, k+1) pairs per rank and batch (random subset); None =
            all. Bounds the InfoNCE logits on long token sequences.
        detach_targets: stop gradients into the targets.
        mask_duplicate_targets: in ``infonce`` mode, a candidate equal to the positive target
            (the same code, or the same window content again) is not used as a negative.
        gather: gather candidates across DDP ranks.
    """

    def __init__(
        self,
        dim: int,
        target_dim: int | None = None,
        mode: FineMode = "infonce",
        tau: float = 0.07,
        step_tau: float = 10.0,
        hidden: int | None = None,
        max_pairs: int | None = 4096,
        detach_targets: bool = True,
        mask_duplicate_targets: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        if mode not in FINE_MODES:
            raise ValueError(f"fine-grained mode must be 'infonce' or 'cosine', got {mode!r}")
        self.mode, self.tau, self.step_tau = mode, tau, step_tau
        self.max_pairs, self.detach_targets, self.gather = max_pairs, detach_targets, gather
        self.mask_duplicate_targets = mask_duplicate_targets
        hidden = hidden or 2 * dim
        self.predictor = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, target_dim or dim)
        )

    def forward(
        self, reps: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """reps [B, T, D], mask [B, T] bool, targets [B, T, Dt] (default: reps) → (loss, acc)."""
        tgt = reps if targets is None else targets
        if self.detach_targets:
            tgt = tgt.detach()
        valid = mask[:, :-1] & mask[:, 1:]
        steps = torch.arange(reps.shape[1] - 1, device=reps.device).expand_as(valid)
        src, nxt, k = reps[:, :-1][valid], tgt[:, 1:][valid], steps[valid]
        pick = _subsample(src.shape[0], self.max_pairs, reps.device)
        if pick is not None:
            src, nxt, k = src[pick], nxt[pick], k[pick]
        pred = self.predictor(src)
        if self.mode == "infonce":
            keys = None
            if self.mask_duplicate_targets:
                keys = _duplicate_keys(nxt.detach())
            return info_nce(pred, nxt, self.tau, gather=self.gather, keys=keys, symmetric=False)
        cos = F.cosine_similarity(pred.float(), nxt.float(), dim=-1)
        w = 1.0 + k.float() / self.step_tau
        loss = (w * (1.0 - cos)).sum() / w.sum().clamp_min(1e-8)
        with torch.no_grad():
            if pred.shape[0] == 0:
                acc = loss.new_zeros(())
            else:
                sim = F.normalize(pred.float(), dim=-1) @ F.normalize(nxt.float(), dim=-1).T
                acc = (sim.argmax(1) == torch.arange(sim.shape[0], device=sim.device)).float().mean()
        return loss, acc


class WindowObjective(nn.Module):
    """InfoNCE between a user's periodic windows (macro-temporal periodicity).

    A pair is two real windows (w1, w2) of one user with ``win_key[w2] - win_key[w1] ==
    period`` (same weekday one week apart for day windows; a fixed stride for event-count
    windows). Both sides go through one shared linear projection. Negatives are the windows of
    pairs of *other* users in the (gathered) batch; other pairs of the same user are masked out.
    A user with no pair contributes nothing.

    Args:
        dim: width of the window representations.
        proj_dim: projection width (default ``dim``).
        period: key difference of periodic partners (7 for day windows).
        tau: temperature.
        fn_margin: false-negative margin (see :func:`info_nce`); None = off.
        max_pairs: at most this many pairs per rank and batch (random subset); None = all.
        gather: gather negatives across DDP ranks.
    """

    def __init__(
        self,
        dim: int,
        proj_dim: int | None = None,
        period: int = 7,
        tau: float = 0.07,
        fn_margin: float | None = None,
        max_pairs: int | None = 4096,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.period, self.tau, self.fn_margin = period, tau, fn_margin
        self.max_pairs, self.gather = max_pairs, gather
        self.proj = nn.Linear(dim, proj_dim or dim)

    def pairs(self, win_mask: torch.Tensor, win_key: torch.Tensor) -> torch.Tensor:
        """[P, 3] rows (user, w1, w2) of periodic partners."""
        diff = win_key[:, None, :] - win_key[:, :, None]  # [B, w1, w2] = key[w2] - key[w1]
        ok = (diff == self.period) & win_mask[:, :, None] & win_mask[:, None, :]
        return ok.nonzero()

    def forward(
        self,
        reps: torch.Tensor,
        win_mask: torch.Tensor,
        win_key: torch.Tensor,
        user_keys: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """reps [B, W, D], win_mask [B, W], win_key [B, W], user_keys [B] (ids unique across
        ranks, e.g. ``user_id``; default: row index) → (loss, acc, number of pairs)."""
        idx = self.pairs(win_mask, win_key)
        pick = _subsample(idx.shape[0], self.max_pairs, reps.device)
        if pick is not None:
            idx = idx[pick]
        u, w1, w2 = idx.unbind(1)
        if user_keys is None:
            user_keys = torch.arange(reps.shape[0], device=reps.device) + _rank() * RANK_KEY_OFFSET
        a, b = self.proj(reps[u, w1]), self.proj(reps[u, w2])
        loss, acc = info_nce(a, b, self.tau, gather=self.gather, fn_margin=self.fn_margin, keys=user_keys[u])
        return loss, acc, torch.tensor(float(idx.shape[0]), device=reps.device)


class SemanticObjective(nn.Module):
    """InfoNCE between the user's representation at the end of the history and the text
    embedding of its future behaviour (future intent), for users with ``has_fut_text`` only.

    The user vector is projected to the text width; the text embedding is used as is (it comes
    from a frozen text encoder). Templated summaries repeat across users, so identical texts
    are not used as each other's negatives (``mask_duplicate_texts``).

    Args:
        dim: width of the user representation.
        text_dim: width of ``fut_text_emb``.
        tau: temperature.
        fn_margin: false-negative margin (see :func:`info_nce`; Q-Anchor: 0.1); None = off.
        mask_duplicate_texts: drop negatives whose text embedding equals the positive's.
        gather: gather negatives across DDP ranks.
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        tau: float = 0.07,
        fn_margin: float | None = 0.1,
        mask_duplicate_texts: bool = True,
        gather: bool = True,
    ) -> None:
        super().__init__()
        self.tau, self.fn_margin = tau, fn_margin
        self.mask_duplicate_texts, self.gather = mask_duplicate_texts, gather
        self.proj = nn.Linear(dim, text_dim)

    def forward(
        self, user_rep: torch.Tensor, fut_text_emb: torch.Tensor, has_fut_text: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """user_rep [B, D], fut_text_emb [B, d], has_fut_text [B] bool → (loss, acc)."""
        a = self.proj(user_rep[has_fut_text])
        t = fut_text_emb[has_fut_text].float()
        keys = _duplicate_keys(t) if self.mask_duplicate_texts else None
        return info_nce(a, t, self.tau, gather=self.gather, fn_margin=self.fn_margin, keys=keys)


class ReconstructionObjective(nn.Module):
    """Squared error between per-source reconstructions and pooled targets on present slices.

    Reduction: **sum over features, mean over present slices**. With unit-norm text
    embeddings this gives the text part and the log-count feature comparable weight; a mean
    over features would let the one count column outweigh hundreds of text columns.
    """

    def forward(
        self, recon: torch.Tensor, target: torch.Tensor, present: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """recon, target [B, W, S, Dp], present [B, W, S] → (loss, per-source error [S])."""
        err = (recon.float() - target.float()).pow(2).sum(-1) * present
        n = present.float().sum()
        loss = err.sum() / n.clamp_min(1.0)
        per_source = err.detach().sum((0, 1)) / present.float().sum((0, 1)).clamp_min(1.0)
        return loss, per_source


class DistillObjective(nn.Module):
    """Squared error between a head's reading of the user representation and a teacher's vector
    of the user (``teacher_emb``, standardised per feature on the training users by the data
    module), for users with ``has_teacher`` only (training users). Reduction: mean over features
    and over those users; a rank with none contributes a zero that stays in the graph.

    The head (LayerNorm, Linear, GELU, Linear) is also the stage's ``distill`` readout, so a
    user's embedding can be the teacher's vector as predicted from tokens alone.

    Args:
        in_dim: width of the representation read.
        teacher_dim: width of the teacher's vector.
        hidden: the head's hidden width.
    """

    def __init__(self, in_dim: int, teacher_dim: int, hidden: int = 512) -> None:
        super().__init__()
        self.head = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, hidden), nn.GELU(),
                                  nn.Linear(hidden, teacher_dim))

    def forward(
        self, rep: torch.Tensor, teacher_emb: torch.Tensor, has_teacher: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """rep [B, Din], teacher_emb [B, Dt], has_teacher [B] bool → (loss, explained share
        ``1 − mse / mean square of the targets``, detached)."""
        err = (self.head(rep.float()) - teacher_emb.float()).pow(2).mean(-1) * has_teacher
        n = has_teacher.float().sum()
        loss = err.sum() / n.clamp_min(1.0)
        power = (teacher_emb.float().pow(2).mean(-1) * has_teacher).sum() / n.clamp_min(1.0)
        explained = torch.where(n > 0, 1.0 - loss / power.clamp_min(1e-8), torch.zeros_like(loss))
        return loss, explained.detach()  # 0 where no user has a target (validation batches)


@dataclass(frozen=True)
class ObjectivesConfig(Options):
    """The objective terms of the stages trained by :class:`MultiScaleObjectives` (stage 1 and
    stage 3: their ``--model.objectives.*`` options; each attribute's docstring is the
    ``--help`` text). An ablation is a change here, e.g. ``enabled: {semantic: false}``."""

    GROUP: ClassVar[str] = "objectives"

    weights: dict[str, float] | None = None
    """Per-term weights (fine, window, semantic, and recon or distill where the stage has it);
    missing terms take the paper's 0.2 / 0.4 / 0.4 (recon 1.0; distill 0, i.e. off)."""
    enabled: dict[str, bool] | None = None
    """Per-term switches, e.g. ``{semantic: false}``; missing → on."""
    tau: float = 0.07
    """InfoNCE temperature of every contrastive term."""
    fine_mode: FineMode = "infonce"
    """The fine term: ``infonce`` against the batch's other next steps, or the paper's weighted
    ``cosine`` ``(1 + k/step_tau)(1 - cos)``."""
    step_tau: float = 10.0
    """τ of the cosine mode's ``1 + k/τ`` step weighting."""
    window_fn_margin: float | None = None
    """False-negative margin of the window term (None = off)."""
    semantic_fn_margin: float | None = 0.1
    """False-negative margin of the semantic term (None = off)."""
    max_pairs: int | None = 4096
    """Cap on fine/window pairs per batch and rank."""
    distill_hidden: int = 512
    """Hidden width of the distill term's head."""

    def only(self, terms: Sequence[str]) -> ObjectivesConfig:
        """These options for a stage trained by ``terms`` only (stage 3 has no recon): a weight or
        switch of another term is an error that names it; the other terms are switched off."""
        other = sorted((set(self.weights or {}) | set(self.enabled or {})) - set(terms))
        if other:
            raise ValueError(f"this stage's objective terms are {list(terms)}; got {other}")
        return self.replace(enabled={**(self.enabled or {}), **{t: False for t in TERMS if t not in terms}})

    def active(self, term: str) -> bool:
        """Whether these options compute ``term`` (enabled and weight > 0, defaults filled in), as
        :meth:`MultiScaleObjectives.active` will."""
        weight = {**DEFAULT_WEIGHTS, **(self.weights or {})}[term]
        return bool((self.enabled or {}).get(term, True)) and weight > 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, table in (("weights", self.weights or {}), ("enabled", self.enabled or {})):
            unknown = set(table) - set(TERMS)
            if unknown:
                raise ValueError(f"unknown objective term(s) in {name}: {sorted(unknown)}; known: {TERMS}")


class MultiScaleObjectives(nn.Module):
    """Weighted sum of the alignment objectives and reconstruction, each term switchable.

    A term is computed only when it is enabled *and* its weight is > 0; an ablation is a
    config change. Inputs are keyword tensors; an active term whose inputs are missing raises.

    Args:
        dim: width of the representations (sequence steps, windows, user vector).
        text_dim: width of ``fut_text_emb`` (semantic term).
        weights: per-term weights; missing terms take the defaults (fine 0.2, window 0.4,
            semantic 0.4 as in the paper; recon 1.0).
        enabled: per-term switches (missing → True).
        period: key difference of periodic windows (7 for day windows).
        tau: InfoNCE temperature of all contrastive terms.
        fine_mode: ``infonce`` or ``cosine`` (see :class:`FineGrainedObjective`).
        fine_target_dim: width of the fine-grained targets (default ``dim``).
        step_tau: τ of the cosine mode's ``1 + k/τ`` weighting.
        window_fn_margin: false-negative margin of the window term; None = off.
        semantic_fn_margin: false-negative margin of the semantic term; None = off.
        max_pairs: cap on pairs per rank and batch for the fine and window terms.
        gather: gather negatives across DDP ranks.
        distill_in_dim, teacher_dim: the distill term's input and teacher widths (None: the
            stage has no teacher, and giving the term a weight is an error).
        distill_hidden: the distill head's hidden width.
    """

    def __init__(
        self,
        dim: int,
        text_dim: int,
        weights: Mapping[str, float] | None = None,
        enabled: Mapping[str, bool] | None = None,
        period: int = 7,
        tau: float = 0.07,
        fine_mode: FineMode = "infonce",
        fine_target_dim: int | None = None,
        step_tau: float = 10.0,
        window_fn_margin: float | None = None,
        semantic_fn_margin: float | None = 0.1,
        max_pairs: int | None = 4096,
        gather: bool = True,
        distill_in_dim: int | None = None,
        teacher_dim: int | None = None,
        distill_hidden: int = 512,
    ) -> None:
        super().__init__()
        for name, table in (("weights", weights or {}), ("enabled", enabled or {})):
            unknown = set(table) - set(TERMS)
            if unknown:
                raise ValueError(f"unknown objective term(s) in {name}: {sorted(unknown)}; known: {TERMS}")
        self.weights = {**DEFAULT_WEIGHTS, **(weights or {})}
        self.enabled = {t: bool((enabled or {}).get(t, True)) for t in TERMS}
        self.fine = FineGrainedObjective(
            dim, fine_target_dim, fine_mode, tau, step_tau, max_pairs=max_pairs, gather=gather
        )
        self.window = WindowObjective(
            dim, period=period, tau=tau, fn_margin=window_fn_margin, max_pairs=max_pairs, gather=gather
        )
        self.semantic = SemanticObjective(dim, text_dim, tau, fn_margin=semantic_fn_margin, gather=gather)
        self.recon = ReconstructionObjective()
        self.distill = DistillObjective(distill_in_dim, teacher_dim, distill_hidden) if teacher_dim else None
        if self.active("distill") and self.distill is None:
            raise ValueError("the distill term has a weight but there is no teacher: give the data module "
                             "data.teacher_dir (a dataset with one user_emb per user, e.g. stage 1's features)")

    @classmethod
    def from_options(cls, options: ObjectivesConfig, dim: int, text_dim: int, period: int,
                     fine_target_dim: int | None = None, distill_in_dim: int | None = None,
                     teacher_dim: int | None = None) -> MultiScaleObjectives:
        """The objectives of a stage's :class:`ObjectivesConfig`."""
        return cls(dim, text_dim, weights=options.weights, enabled=options.enabled, period=period, tau=options.tau,
                   fine_mode=options.fine_mode, fine_target_dim=fine_target_dim, step_tau=options.step_tau,
                   window_fn_margin=options.window_fn_margin, semantic_fn_margin=options.semantic_fn_margin,
                   max_pairs=options.max_pairs, distill_in_dim=distill_in_dim, teacher_dim=teacher_dim,
                   distill_hidden=options.distill_hidden)

    def active(self, term: str) -> bool:
        """Whether ``term`` is computed (enabled and weight > 0)."""
        return self.enabled[term] and self.weights[term] > 0

    @staticmethod
    def _need(term: str, **inputs: torch.Tensor | None) -> None:
        missing = [k for k, v in inputs.items() if v is None]
        if missing:
            raise ValueError(f"objective '{term}' is active but its inputs {missing} were not given")

    def forward(
        self,
        *,
        seq: torch.Tensor | None = None,
        seq_mask: torch.Tensor | None = None,
        seq_targets: torch.Tensor | None = None,
        windows: torch.Tensor | None = None,
        win_mask: torch.Tensor | None = None,
        win_key: torch.Tensor | None = None,
        user_keys: torch.Tensor | None = None,
        user_rep: torch.Tensor | None = None,
        fut_text_emb: torch.Tensor | None = None,
        has_fut_text: torch.Tensor | None = None,
        recon: torch.Tensor | None = None,
        recon_target: torch.Tensor | None = None,
        present: torch.Tensor | None = None,
        distill_in: torch.Tensor | None = None,
        teacher_emb: torch.Tensor | None = None,
        has_teacher: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the active terms.

        Args:
            seq, seq_mask, seq_targets: fine term — causal step reps [B, T, D], [B, T] bool,
                optional targets [B, T, Dt].
            windows, win_mask, win_key, user_keys: window term — window reps [B, W, D],
                [B, W] bool, [B, W] int, optional [B] ids unique across ranks.
            user_rep, fut_text_emb, has_fut_text: semantic term — [B, D], [B, d], [B] bool.
            recon, recon_target, present: recon term — [B, W, S, Dp] twice, [B, W, S] bool.
            distill_in, teacher_emb, has_teacher: distill term — [B, Din], [B, Dt], [B] bool.

        Returns:
            ``(total, logs)``: total = Σ weight·loss over active terms; logs (detached) holds
            ``loss/total`` and, per active term, ``loss/<term>``; ``acc/fine``,
            ``acc/window``, ``pairs/window``, ``acc/semantic``, ``n/semantic``, and
            ``recon_mse/<source index>`` (the recon error of each source), ``explained/distill``
            and ``n/distill``.
        """
        losses: dict[str, torch.Tensor] = {}
        logs: dict[str, torch.Tensor] = {}
        if self.active("fine"):
            self._need("fine", seq=seq, seq_mask=seq_mask)
            losses["fine"], logs["acc/fine"] = self.fine(seq, seq_mask, seq_targets)
        if self.active("window"):
            self._need("window", windows=windows, win_mask=win_mask, win_key=win_key)
            losses["window"], logs["acc/window"], logs["pairs/window"] = self.window(
                windows, win_mask, win_key, user_keys
            )
        if self.active("semantic"):
            self._need("semantic", user_rep=user_rep, fut_text_emb=fut_text_emb, has_fut_text=has_fut_text)
            losses["semantic"], logs["acc/semantic"] = self.semantic(user_rep, fut_text_emb, has_fut_text)
            logs["n/semantic"] = has_fut_text.float().sum()
        if self.active("recon"):
            self._need("recon", recon=recon, recon_target=recon_target, present=present)
            losses["recon"], per_source = self.recon(recon, recon_target, present)
            for s, v in enumerate(per_source):
                logs[f"recon_mse/{s}"] = v
        if self.active("distill"):
            self._need("distill", distill_in=distill_in, teacher_emb=teacher_emb, has_teacher=has_teacher)
            losses["distill"], logs["explained/distill"] = self.distill(distill_in, teacher_emb, has_teacher)
            logs["n/distill"] = has_teacher.float().sum()
        if not losses:
            raise ValueError("no objective term is active: enable one and give it a weight > 0")
        total = sum(self.weights[t] * v for t, v in losses.items())
        for t, v in losses.items():
            logs[f"loss/{t}"] = v.detach()
        logs["loss/total"] = total.detach()
        return total, logs
