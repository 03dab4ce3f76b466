"""Query-as-Anchor losses, as plain functions over tensors (no stage batch, no module state).

- :func:`anchor_info_nce`: InfoNCE of each query-aware user embedding against its answer
  embedding, τ = 0.07, with **user–answer and user–user negatives** from the whole batch,
  gathered across DDP ranks with gradients (the gather of ``foundv2.objectives``), and the
  paper's false-negative mask: a negative whose similarity to the anchor exceeds the positive's
  by more than ``fn_margin`` (0.1) is dropped.
- :func:`next_token_loss`: next-token cross-entropy on the answer tokens.
- :func:`qanchor_loss`: the two, weighted 1:1 (paper), each term reported apart.
- :func:`prototype_logits` / :func:`prototype_loss`: scenario tuning's prototype softmax.

Under DDP every rank must call :func:`anchor_info_nce` the same number of times (the gathers
are collectives), also a rank with no rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from foundv2.objectives import _directional_nce, gather_batch

TAU = 0.07  # paper
FN_MARGIN = 0.1  # paper: drop negatives above the positive's similarity + 0.1


def anchor_info_nce(user: Tensor, answer: Tensor, tau: float = TAU, fn_margin: float | None = FN_MARGIN,
                    gather: bool = True, keys: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """InfoNCE of ``user[i]`` against ``answer[i]`` among all answers and all *other* users.

    Args:
        user: [N, D] query-aware user embeddings (anchors); L2-normalised here.
        answer: [N, D] answer embeddings; row i is the positive of ``user[i]``.
        tau: temperature.
        fn_margin: drop a negative (answer or user) whose cosine to the anchor exceeds the
            positive's by more than this; None = keep all.
        gather: when ``torch.distributed`` is initialised, candidates come from every rank
            (gathered with gradients; ranks may hold different numbers of rows).
        keys: [N] int group ids, unique across ranks (e.g. pair ids); candidates sharing the
            anchor's key are not negatives (the anchor's own user row always is excluded).
            Default: every row its own group.

    Returns:
        ``(loss, acc)``: the mean over this rank's anchors, and the top-1 accuracy of picking
        the positive among all candidates (detached); 0 (still in the graph) with no rows.
    """
    user, answer = F.normalize(user.float(), dim=-1), F.normalize(answer.float(), dim=-1)
    n = user.shape[0]
    g = gather_batch([answer, user, keys], [True, True, False], gather)
    zero = (user.sum() + answer.sum()) * 0.0 + g.anchor
    if n == 0 or g.total == 0:
        return zero, zero.detach()
    all_answer, all_user, all_keys = g.rows
    labels = g.offset + torch.arange(n, device=user.device)
    if keys is None:  # every row its own group: its global row index
        keys, all_keys = labels, torch.arange(g.total, device=user.device)
    candidates = torch.cat([all_answer, all_user])  # answers first: label i is answer i
    cand_keys = torch.cat([all_keys, all_keys])  # the anchor's own user row shares its key: dropped
    loss, acc = _directional_nce(user, candidates, labels, tau, fn_margin, keys, cand_keys)
    return loss + zero, acc


@torch.no_grad()
def answer_retrieval(user: Tensor, answer: Tensor, texts: list[str]) -> tuple[Tensor, Tensor]:
    """User → answer retrieval among one batch's answers: ``(accuracy, chance)``.

    ``user[i]`` retrieves the answer of highest cosine; it is a hit when that answer's text equals
    ``texts[i]`` (several users may share an answer text, e.g. "High activity"). ``chance`` is the
    expected accuracy of a uniformly random pick on the same batch: the mean share of the batch's
    answers that have the user's own text.
    """
    sim = F.normalize(user.float(), dim=-1) @ F.normalize(answer.float(), dim=-1).T
    ids = {t: i for i, t in enumerate(dict.fromkeys(texts))}
    code = torch.tensor([ids[t] for t in texts], device=sim.device)
    same = code[:, None] == code[None, :]
    hit = same.gather(1, sim.argmax(1, keepdim=True)).float().mean()
    return hit, same.float().mean(1).mean()


def next_token_loss(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean cross-entropy over the valid target tokens: ``logits`` [B, T, V] predict
    ``targets`` [B, T] where ``mask`` [B, T] is True; 0 (in the graph) when none is valid."""
    valid = mask.bool()
    if not valid.any():
        return logits.sum() * 0.0
    return F.cross_entropy(logits[valid].float(), targets[valid])


def qanchor_loss(user: Tensor, answer: Tensor, answer_logits: Tensor, answer_ids: Tensor, answer_mask: Tensor,
                 nce_weight: float = 1.0, ntp_weight: float = 1.0, **nce_options) -> dict[str, Tensor]:
    """``nce_weight · anchor_info_nce + ntp_weight · next_token_loss`` (paper 1:1), as a dict:
    ``loss``, ``loss/nce``, ``loss/ntp``, ``acc/nce``."""
    nce, acc = anchor_info_nce(user, answer, **nce_options)
    ntp = next_token_loss(answer_logits, answer_ids, answer_mask)
    return {"loss": nce_weight * nce + ntp_weight * ntp, "loss/nce": nce, "loss/ntp": ntp, "acc/nce": acc}


def prototype_logits(emb: Tensor, prototypes: Tensor, tau: float) -> Tensor:
    """Cosine similarity of embeddings [B, D] to class prototypes [C, D], over ``tau``: [B, C]."""
    return F.normalize(emb.float(), dim=-1) @ F.normalize(prototypes.float(), dim=-1).T / tau


def prototype_loss(emb: Tensor, prototypes: Tensor, labels: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """Prototype softmax: cross-entropy of :func:`prototype_logits` against class ``labels``
    [B]; returns ``(loss, accuracy)``."""
    logits = prototype_logits(emb, prototypes, tau)
    return F.cross_entropy(logits, labels), (logits.detach().argmax(1) == labels).float().mean()
