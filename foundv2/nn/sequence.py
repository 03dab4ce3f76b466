"""Stage 3's net (FOUNDv2): a causal Transformer over a user's token sequence.

A user's tokens come from the tokenizer's tokens dataset: per (window, source) slice, one global
token id per level. Every token is embedded as

    code_proj(token_table[id]) + level_emb[level] + source_emb[source] + window_pos[window]

where ``token_table`` starts from the tokenizer's code vectors (a global id maps to the code
vector it stands for, :func:`code_vectors`), so the sequence model begins with the geometry the
RQ-VAE learned; ``freeze_codes`` (:class:`SequenceConfig`) keeps it fixed.

Attention is **block causal over windows**: a token of window *w* attends to every token of
windows ≤ *w* (its own window included, since a window is one time step) and never to a later
window or a padding token. So every output for window *w* depends on the tokens of windows ≤ *w*
only, exactly: appending a window leaves the earlier windows' states unchanged, which is what lets
a deployment append one day of tokens without re-encoding the past. A window's state is the mean
of its tokens' outputs (after a final LayerNorm); padded windows are zero.

The attention layer is the Q-Former's (:class:`foundv2.nn.qformer._Attention`, SDPA with a boolean
mask): one implementation of masked attention in the code base.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from foundv2.nn.qformer import TransformerConfig, _Attention, block_mlp


@dataclass(frozen=True)
class SequenceConfig(TransformerConfig):
    """The token-sequence encoder's settings (stage 3's ``--model.sequence.*``)."""

    GROUP: ClassVar[str] = "sequence"

    freeze_codes: bool = False
    """Keep the token table at the tokenizer's code vectors (else it is trained, starting from them)."""


def code_vectors(model) -> Tensor:
    """[vocab_size, code_dim] (fp32): the code vector each global token id of a
    :class:`~foundv2.nn.mrqvae.MultiViewRQVAE` stands for (group quantiser ids first, then the
    tabular quantiser's, as :meth:`MultiViewRQVAE.global_ids` numbers them)."""
    tables = [model.quantizer.codebook.detach().float()]
    if getattr(model, "tabular_quantizer", None) is not None:
        tables.append(model.tabular_quantizer.codebook.detach().float())
    return torch.cat(tables).cpu()


class SequenceOutput(NamedTuple):
    """``tokens`` [B, T, D] per-token states; ``windows`` [B, W, D] per-window states."""

    tokens: Tensor
    windows: Tensor


class _SelfBlock(nn.Module):
    """Pre-norm block: masked self-attention, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: int, dropout: float) -> None:
        super().__init__()
        self.norm_sa = nn.LayerNorm(dim)
        self.attn = _Attention(dim, num_heads, dropout)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = block_mlp(dim, mlp_ratio, dropout)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        h = self.norm_sa(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm_mlp(x))


class TokenSequenceEncoder(nn.Module):
    """Causal Transformer over token sequences (see the module docstring).

    Args:
        code_vectors: [V, C] the code vector of every global token id (:func:`code_vectors`).
        num_levels: quantiser levels (size of the level table).
        num_sources: sources, the profile included (size of the source table).
        max_windows: the most windows a user may have (size of the window-position table).
        config: the encoder's own settings (:class:`SequenceConfig`: width, blocks, frozen codes).
    """

    def __init__(
        self,
        code_vectors: Tensor,
        num_levels: int,
        num_sources: int,
        max_windows: int = 64,
        config: SequenceConfig = SequenceConfig(),
    ) -> None:
        super().__init__()
        vocab, code_dim = code_vectors.shape
        dim = config.dim
        self.config, self.dim, self.max_windows = config, dim, max_windows
        self.token_table = nn.Embedding(vocab, code_dim)
        with torch.no_grad():
            self.token_table.weight.copy_(code_vectors.float())
        self.token_table.weight.requires_grad_(not config.freeze_codes)
        self.register_buffer("target_table", code_vectors.float().clone(), persistent=True)
        self.code_proj = nn.Linear(code_dim, dim)
        self.level_emb = nn.Embedding(num_levels, dim)
        self.source_emb = nn.Embedding(num_sources, dim)
        self.window_pos = nn.Embedding(max_windows, dim)
        for emb in (self.level_emb, self.source_emb, self.window_pos):
            nn.init.normal_(emb.weight, std=0.02)
        self.blocks = nn.ModuleList(_SelfBlock(dim, config.num_heads, config.mlp_ratio, config.dropout)
                                    for _ in range(config.num_layers))
        self.norm_out = nn.LayerNorm(dim)

    @staticmethod
    def attention_mask(tok_window: Tensor, tok_mask: Tensor) -> Tensor:
        """[B, T, T] bool: token i may attend to token j when j is real and its window is ≤ i's.
        Every token also sees itself, so a padding row is never all-masked (no NaN)."""
        allowed = tok_mask[:, None, :] & (tok_window[:, None, :] <= tok_window[:, :, None])
        eye = torch.eye(tok_window.shape[1], dtype=torch.bool, device=tok_window.device)
        return allowed | eye

    def embed(self, token_id: Tensor, tok_level: Tensor, tok_source: Tensor, tok_window: Tensor) -> Tensor:
        """[B, T] ids, levels, sources, window positions → [B, T, D] (padding ids may be -1)."""
        # F.embedding, not table[idx]: its backward is deterministic on CPU
        codes = F.embedding(token_id.clamp_min(0), self.token_table.weight)
        return (self.code_proj(codes) + self.level_emb(tok_level.clamp_min(0))
                + self.source_emb(tok_source.clamp_min(0)) + self.window_pos(tok_window.clamp_min(0)))

    def window_targets(self, token_id: Tensor, tok_window: Tensor, tok_mask: Tensor, num_windows: int) -> Tensor:
        """[B, W, C] the mean code vector of a window's tokens, from the tokenizer's fixed code
        vectors (proportional to the mean quantised slice vector of the window, since a slice's
        quantised vector is the sum of its levels' codes): what the fine term predicts for the
        next window. Scale does not matter to the cosine and InfoNCE losses."""
        codes = F.embedding(token_id.clamp_min(0), self.target_table) * tok_mask[..., None]
        member = self._membership(tok_window, tok_mask, num_windows)  # [B, W, T]
        return member @ codes / member.sum(-1, keepdim=True).clamp_min(1.0)

    @staticmethod
    def _membership(tok_window: Tensor, tok_mask: Tensor, num_windows: int) -> Tensor:
        w = torch.arange(num_windows, device=tok_window.device)
        return ((tok_window[:, None, :] == w[None, :, None]) & tok_mask[:, None, :]).float()

    def forward(
        self,
        token_id: Tensor,
        tok_level: Tensor,
        tok_source: Tensor,
        tok_window: Tensor,
        tok_mask: Tensor,
        num_windows: int,
    ) -> SequenceOutput:
        """Encode a batch of token sequences.

        Args:
            token_id: [B, T] global token ids (-1 or anything on padding).
            tok_level, tok_source: [B, T] level and source index of each token.
            tok_window: [B, T] window position of each token, 0 = the user's first window.
            tok_mask: [B, T] True on real tokens.
            num_windows: W, the batch's window count (window states are [B, W, D]).
        """
        if num_windows > self.max_windows:
            raise ValueError(f"the batch has {num_windows} windows but the sequence model was built with "
                             f"max_windows={self.max_windows}; raise max_windows or cap windows in the data module")
        x = self.embed(token_id, tok_level, tok_source, tok_window)
        mask = self.attention_mask(tok_window, tok_mask)
        for block in self.blocks:
            x = block(x, mask)
        x = self.norm_out(x) * tok_mask[..., None]
        member = self._membership(tok_window, tok_mask, num_windows)
        windows = member @ x / member.sum(-1, keepdim=True).clamp_min(1.0)
        return SequenceOutput(x, windows)
