"""Multi-view RQ-VAE: per-source MLP encoders, the group residual quantiser, per-source decoders.

Also `disambiguate`, the extra index that makes colliding code tuples unique (the collisions
themselves are counted by `foundv2.metrics.collisions`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from data_modules.store import load_export, save_export
from foundv2.nn.quantizer import QuantizerConfig, ResidualGroupQuantizer
from foundv2.options import Options


def _mlp(dims: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear layers with GELU (and dropout) between them, none after the last."""
    layers: list[nn.Module] = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:], strict=True)):
        layers.append(nn.Linear(d_in, d_out))
        if i < len(dims) - 2:
            layers += [nn.GELU()] + ([nn.Dropout(dropout)] if dropout > 0 else [])
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class RQVAEConfig(Options):
    """The multi-view RQ-VAE's own settings: encoders, decoders, latent (the tokenizer stage's
    ``--model.rqvae.*``; the quantiser's are :class:`~foundv2.nn.quantizer.QuantizerConfig`)."""

    GROUP: ClassVar[str] = "rqvae"

    code_dim: int = 64
    """Width of the latent and code space (paper 256)."""
    hidden: list[int] = field(default_factory=lambda: [256])
    """Hidden widths of the per-source encoder MLPs (the decoders use them reversed)."""
    dropout: float = 0.0
    """Dropout between MLP layers."""
    recon_reduction: Literal["sum", "mean"] = "sum"
    """The squared reconstruction error of a row is summed (default; keeps reconstruction dominant,
    which prevents collapse) or averaged over its features (see :class:`MultiViewRQVAE`)."""
    latent_norm: bool = True
    """End every encoder with a LayerNorm without weights, so that latents keep the codes' scale
    (see :class:`MultiViewRQVAE`)."""
    tabular_separate: bool = False
    """The source named ``tabular_source`` gets its own plain residual quantiser
    (``tabular_levels`` x ``tabular_codes``, the other quantiser options shared) instead of the
    group quantiser."""
    tabular_source: str = "tabular"
    """Name of the tabular source."""
    tabular_levels: int | None = None
    """Levels of the tabular quantiser (default: the group quantiser's)."""
    tabular_codes: int = 1024
    """Codebook size per level of the tabular quantiser."""

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "hidden", [int(h) for h in self.hidden])  # a list: config.json round-trips


@dataclass
class MRQVAEOutput:
    """What `MultiViewRQVAE.forward` returns."""

    recon: Tensor  # [N, D] fp32; a source of input dim d fills columns [:d], zeros after
    codes: Tensor  # [N, L] long, -1 for masked rows (and for levels a quantiser does not have)
    latent: Tensor  # [N, code_dim] encoder output (fp32)
    quantized: Tensor  # [N, code_dim] quantised latent
    losses: dict[str, Tensor]  # recon_mse, recon_mse/<source>, [recon_weighted], loss_codebook, loss_commit, loss
    counts: Tensor  # [vocab_size] this batch's code usage by global id


class MultiViewRQVAE(nn.Module):
    """Per-source MLP encoder → `ResidualGroupQuantizer` → per-source MLP decoder.

    Reconstruction loss: per row, the squared error is **summed over the source's features**
    (``recon_reduction="sum"``, default) or averaged over them (``"mean"``); rows are then
    averaged: ``recon_mse/<source>`` over that source's rows (0 when the batch has none, never
    NaN), ``recon_mse`` over all valid rows. The reduction decides collapse: averaging over
    features shrinks the reconstruction term by the input dimension relative to the
    (dimension-averaged) commitment term, so the encoder is pulled onto few codes; summing keeps
    reconstruction dominant.

    ``loss = recon_mse + loss_codebook + beta * loss_commit`` (quantiser terms as documented in
    `foundv2.nn.quantizer`; with ``tabular_separate`` the tabular quantiser's terms are added).
    With ``feature_weights`` the reconstruction term of the loss is ``recon_weighted``, the same
    error with every feature's square multiplied by its weight; ``recon_mse`` stays unweighted
    (comparable across weightings) and is logged beside it.

    ``latent_norm``: without it the straight-through gradient grows the latents away from the
    codes (latent RMS 0.08 → 1.4 in 50 steps on synthetic data while the codes stayed at 0.08),
    most codes die, the decoder learns the coarse codes, and the respawn that brings the codes
    back makes the loss jump 20x (6.2 → 140); with it the jump is 3.9 → 4.8.

    Args:
        input_dims: one input dim shared by all sources, or a dict source → input dim (then the
            dict's order is the source order and ``sources`` may be omitted).
        sources: source names (index = the ``source`` value in ``forward``).
        config: the net's own settings (:class:`RQVAEConfig`: code width, MLPs, reduction,
            latent norm, separate tabular quantiser).
        quantizer: layout and codebook care of the quantiser (`QuantizerConfig`).
        feature_weights: per source, one weight per input feature (a list as long as the source's
            input dim) multiplying that feature's squared error in the training loss; a source
            not named keeps weight 1 everywhere. A feature of small variance (a window's clock or
            calendar position beside a wide text embedding) adds little to a summed error, so the
            codes need not keep it; a weight makes them. Only the loss changes: the encoder still
            reads the raw features, so `tokenize` is unaffected.
    """

    def __init__(
        self,
        input_dims: int | dict[str, int],
        sources: Sequence[str] | None = None,
        config: RQVAEConfig = RQVAEConfig(),
        quantizer: QuantizerConfig = QuantizerConfig(),
        feature_weights: dict[str, Sequence[float]] | None = None,
    ) -> None:
        super().__init__()
        code_dim, hidden, dropout = config.code_dim, config.hidden, config.dropout
        if isinstance(input_dims, dict):
            sources = list(sources) if sources is not None else list(input_dims)
            dims = {s: int(input_dims[s]) for s in sources}
        else:
            if sources is None:
                raise ValueError("sources are required when input_dims is one int")
            sources = list(sources)
            dims = {s: int(input_dims) for s in sources}
        weights = {str(k): [float(x) for x in v] for k, v in (feature_weights or {}).items()}
        for name, w in weights.items():
            if name not in dims:
                raise ValueError(f"feature_weights names source {name!r}, not one of {list(dims)}")
            if len(w) != dims[name]:
                raise ValueError(f"feature_weights[{name!r}] has {len(w)} entries, the source's input dim is "
                                 f"{dims[name]}")
            if min(w) < 0:
                raise ValueError(f"feature_weights[{name!r}] has a negative weight")
        # what config.json and a checkpoint hold: the sizes, the two configs' fields, the weights
        self.config = dict(
            input_dims=dims, sources=sources, **dataclasses.asdict(config), quantizer=dataclasses.asdict(quantizer),
            feature_weights=weights or None,
        )  # fmt: skip
        self.sources = sources
        self.input_dims = dims
        self.max_dim = max(dims.values())
        self.recon_reduction = config.recon_reduction
        # [S, max_dim] weight of each feature's squared error (1 where none is given; unused columns 0)
        table = torch.zeros(len(sources), self.max_dim)
        for i, name in enumerate(sources):
            table[i, : dims[name]] = torch.tensor(weights[name]) if name in weights else 1.0
        self.register_buffer("recon_weight_table", table, persistent=False)
        self.weighted = bool(weights)
        self.encoders = nn.ModuleList(_mlp([dims[s], *hidden, code_dim], dropout) for s in sources)
        if config.latent_norm:
            for encoder in self.encoders:
                encoder.append(nn.LayerNorm(code_dim, elementwise_affine=False))
        self.decoders = nn.ModuleList(
            _mlp([code_dim, *reversed(list(hidden)), dims[s]], dropout) for s in sources
        )

        tabular_source = config.tabular_source
        self.tabular_separate = config.tabular_separate and tabular_source in sources
        grouped = [s for s in sources if not (self.tabular_separate and s == tabular_source)]
        self.quantizer = ResidualGroupQuantizer(code_dim, grouped, quantizer)
        # source index → index among the grouped sources (-1: the separate tabular source)
        to_group = torch.tensor([grouped.index(s) if s in grouped else -1 for s in sources])
        self.register_buffer("to_group", to_group, persistent=False)
        self.tabular_quantizer: ResidualGroupQuantizer | None = None
        if self.tabular_separate:
            tabular = quantizer.replace(
                layout="sequential", n_shared_levels=config.tabular_levels or self.quantizer.n_levels,
                n_specific_levels=0, shared_codes=config.tabular_codes,
            )  # fmt: skip
            self.tabular_quantizer = ResidualGroupQuantizer(code_dim, [tabular_source], tabular)
        self.n_levels = max(
            self.quantizer.n_levels, self.tabular_quantizer.n_levels if self.tabular_quantizer else 0
        )
        self.vocab_size = self.quantizer.vocab_size + (
            self.tabular_quantizer.vocab_size if self.tabular_quantizer else 0
        )

    # ------------------------------------------------------------------------------ forward
    def _rows(self, source: Tensor, valid: Tensor) -> list[Tensor]:
        """Row indices of each source among the valid rows."""
        return [((source == i) & valid).nonzero().flatten() for i in range(len(self.sources))]

    def encode_latent(self, feat: Tensor, source: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encoder outputs ``[N, code_dim]`` (fp32; zeros for masked rows)."""
        valid = torch.ones_like(source, dtype=torch.bool) if mask is None else mask.bool()
        z = feat.new_zeros(feat.shape[0], self.config["code_dim"], dtype=torch.float32)
        for i, rows in enumerate(self._rows(source, valid)):
            if rows.numel():
                z[rows] = self.encoders[i](feat[rows, : self.input_dims[self.sources[i]]]).float()
        return z

    def _quantize(self, z: Tensor, source: Tensor, valid: Tensor):
        """Run the group quantiser (and the tabular one); combine their outputs."""
        group_src = self.to_group[source.clamp(0, len(self.sources) - 1)]
        is_tab = group_src < 0
        out = self.quantizer(z, group_src.clamp_min(0), valid & ~is_tab)
        codes = torch.full((z.shape[0], self.n_levels), -1, dtype=torch.long, device=z.device)
        codes[:, : self.quantizer.n_levels] = out.codes
        quantized, counts = out.quantized, out.counts
        loss_codebook, loss_commit, loss = out.loss_codebook, out.loss_commit, out.loss
        if self.tabular_quantizer is not None:
            tab = self.tabular_quantizer(z, torch.zeros_like(group_src), valid & is_tab)
            quantized = quantized + tab.quantized  # each is zero on the other's rows
            tab_codes = torch.where(is_tab[:, None], tab.codes, -1)
            codes[:, : self.tabular_quantizer.n_levels] = torch.where(
                is_tab[:, None], tab_codes, codes[:, : self.tabular_quantizer.n_levels]
            )
            counts = torch.cat([counts, tab.counts])
            loss_codebook, loss_commit = loss_codebook + tab.loss_codebook, loss_commit + tab.loss_commit
            loss = loss + tab.loss
        return quantized, codes, counts, loss_codebook, loss_commit, loss

    def decode(self, quantized: Tensor, source: Tensor, mask: Tensor | None = None) -> Tensor:
        """Decoder outputs ``[N, max input dim]`` (fp32; a source fills its first d columns)."""
        valid = torch.ones_like(source, dtype=torch.bool) if mask is None else mask.bool()
        recon = quantized.new_zeros(quantized.shape[0], self.max_dim, dtype=torch.float32)
        for i, rows in enumerate(self._rows(source, valid)):
            if rows.numel():
                recon[rows, : self.input_dims[self.sources[i]]] = self.decoders[i](quantized[rows]).float()
        return recon

    def forward(self, feat: Tensor, source: Tensor, mask: Tensor | None = None) -> MRQVAEOutput:
        """Encode, quantise and reconstruct ``feat [N, D]`` (D = the largest input dim) of sources
        ``source [N]``; rows with ``mask`` False are ignored."""
        source = source.long()
        valid = torch.ones_like(source, dtype=torch.bool) if mask is None else mask.bool()
        z = self.encode_latent(feat, source, valid)
        quantized, codes, counts, loss_codebook, loss_commit, loss_q = self._quantize(z, source, valid)
        recon = self.decode(quantized, source, valid)

        losses: dict[str, Tensor] = {}
        total = recon.new_zeros(())
        total_weighted = recon.new_zeros(())
        reduce = (lambda e: e.sum(1)) if self.recon_reduction == "sum" else (lambda e: e.mean(1))
        for i, rows in enumerate(self._rows(source, valid)):
            d = self.input_dims[self.sources[i]]
            err = (recon[rows, :d] - feat[rows, :d].float()).pow(2)
            per_row = reduce(err)
            losses[f"recon_mse/{self.sources[i]}"] = per_row.sum() / max(rows.numel(), 1)
            total = total + per_row.sum()
            if self.weighted:
                total_weighted = total_weighted + reduce(err * self.recon_weight_table[i, :d]).sum()
        n_valid = valid.sum().clamp_min(1)
        losses["recon_mse"] = total / n_valid
        if self.weighted:
            losses["recon_weighted"] = total_weighted / n_valid
        losses["loss_codebook"] = loss_codebook
        losses["loss_commit"] = loss_commit
        losses["loss"] = losses["recon_weighted" if self.weighted else "recon_mse"] + loss_q
        return MRQVAEOutput(
            recon=recon, codes=codes, latent=z, quantized=quantized, losses=losses, counts=counts
        )

    @torch.no_grad()
    def tokenize(self, feat: Tensor, source: Tensor, mask: Tensor | None = None) -> Tensor:
        """Codes ``[N, L]`` of the inputs (no reconstruction, no losses, no training side effects;
        the quantisers' :meth:`~foundv2.nn.quantizer.ResidualGroupQuantizer.encode`): the codes of
        ``forward`` in eval mode."""
        valid = torch.ones_like(source, dtype=torch.bool) if mask is None else mask.bool()
        was_training = self.training
        self.eval()
        try:
            source = source.long()
            z = self.encode_latent(feat, source, valid)
            group_src = self.to_group[source.clamp(0, len(self.sources) - 1)]
            is_tab = group_src < 0
            codes = torch.full((z.shape[0], self.n_levels), -1, dtype=torch.long, device=z.device)
            codes[:, : self.quantizer.n_levels] = self.quantizer.encode(z, group_src.clamp_min(0), valid & ~is_tab)
            if self.tabular_quantizer is not None:
                tab = self.tabular_quantizer.encode(z, torch.zeros_like(group_src), valid & is_tab)
                m = self.tabular_quantizer.n_levels
                codes[:, :m] = torch.where(is_tab[:, None], tab, codes[:, :m])
            return codes
        finally:
            self.train(was_training)

    # ---------------------------------------------------------------------------- global ids
    def global_ids(self, codes: Tensor, source: Tensor) -> Tensor:
        """Global token ids ``[N, L]`` in ``[0, vocab_size)`` (-1 stays -1): the group quantiser's
        ids first, then the tabular quantiser's."""
        group_src = self.to_group[source.long().clamp(0, len(self.sources) - 1)]
        is_tab = (group_src < 0)[:, None]
        out = torch.full_like(codes, -1)
        n = self.quantizer.n_levels
        out[:, :n] = self.quantizer.global_ids(codes[:, :n], group_src.clamp_min(0))
        if self.tabular_quantizer is not None:
            m = self.tabular_quantizer.n_levels
            tab = self.tabular_quantizer.global_ids(codes[:, :m], torch.zeros_like(group_src))
            tab = torch.where(tab >= 0, tab + self.quantizer.vocab_size, -1)
            out[:, :m] = torch.where(is_tab, tab, out[:, :m])
            out = torch.where(is_tab & (torch.arange(out.shape[1], device=out.device) >= m), -1, out)
        return out

    # -------------------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | Path) -> None:
        """Write ``config.json``, ``model.safetensors`` (weights and quantiser state) and their
        ``checksums.json`` (``data_modules.store.save_export``)."""
        save_export(folder, self.config, self.state_dict())

    @classmethod
    def from_config(cls, config: dict) -> MultiViewRQVAE:
        """An untrained model from a `config` dict (config.json, a checkpoint: what ``self.config`` holds)."""
        own = {k: v for k, v in config.items() if k not in ("input_dims", "sources", "quantizer", "feature_weights")}
        return cls(config["input_dims"], config["sources"], RQVAEConfig.from_dict(own),
                   QuantizerConfig.from_dict(config["quantizer"]), config.get("feature_weights"))

    @classmethod
    def from_pretrained(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> MultiViewRQVAE:
        """Rebuild a model saved by `save_pretrained` (in eval mode); a damaged folder (checksum,
        truncation, NaN weights) is a DataError naming the file."""
        config, state = load_export(folder, "tokenizer export", device=str(map_location))
        model = cls.from_config(config)
        model.load_state_dict(state)
        return model.to(map_location).eval()


# ------------------------------------------------------------------------------ collisions
def disambiguate(tuples: Tensor) -> Tensor:
    """Extra index ``[N]`` that makes every (tuple, index) unique: the occurrence number of the
    row's tuple among the rows before it (0 for the first occurrence)."""
    n = tuples.shape[0]
    if n == 0:
        return torch.zeros(0, dtype=torch.long, device=tuples.device)
    _, inverse, counts = torch.unique(tuples, dim=0, return_inverse=True, return_counts=True)
    order = torch.sort(inverse, stable=True).indices  # rows grouped by tuple, original order kept
    starts = torch.cumsum(counts, 0) - counts
    extra = torch.empty(n, dtype=torch.long, device=tuples.device)
    extra[order] = torch.arange(n, device=tuples.device) - starts[inverse[order]]
    return extra
