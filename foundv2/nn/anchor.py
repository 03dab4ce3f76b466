"""Query-as-Anchor: query-aware user embeddings from a causal LM (plain modules).

One sequence per (user, query)::

    [lead text] [user prefix] [query text] [soft prompt]? [<USER_EMB>] [answer text]?

- The **lead** is a fixed text (non-empty, so the first position is always a valid key and no
  attention row is ever fully masked).
- The **user prefix** comes from a :class:`UserPrefix`, which turns the user's inputs into
  embeddings ``[B, P, H]`` and a mask ``[B, P]``; masked slots are masked out of attention. Two
  kinds: :class:`TokenPrefix` (the U2QT tokens, added to the LM vocabulary) and
  :class:`SoftPrefix` (coarse-to-fine soft tokens from cached event embeddings).
- The **query** names the scenario; a :class:`ScenarioPrompt` may add learned tokens after it.
- The last hidden state at **<USER_EMB>**, through a small head (hidden → 512 → 128), is the
  query-aware embedding. An answer after it is read causally, so it never changes the embedding;
  the logits over the answer positions give the next-token loss.
- The **answer tower** (:meth:`QueryAnchor.embed_answers`) is the same LM and head, pooled at
  the answer's last token.

Segments are right-padded and concatenated; position ids count valid tokens only
(``cumsum(mask) - 1``), so a padded slot changes nothing, wherever it sits. Serving:
:meth:`QueryAnchor.encode_prefix` runs ``[lead][prefix]`` once into a :class:`PrefixCache`;
:meth:`QueryAnchor.embed_cached` then runs only a query's own tokens against it, with the same
masks and positions as the full pass, so the result equals the full pass (up to float rounding);
:meth:`QueryAnchor.embed_queries` runs *all* queries of a list in one such pass (a user's queries
side by side, each masked from the others), and :meth:`QueryAnchor.embed_users` is both steps:
what ``predict`` and ``foundv2 embed`` run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn

from data_modules.schema import DataError
from data_modules.store import atomic_dir, atomic_write_json
from foundv2.anchor_losses import TAU, prototype_logits
from foundv2.nn.llm import CausalLM
from foundv2.options import Options

USER_EMB = "<USER_EMB>"
U2QT_TOKEN = "<U2QT_{}>"  # the LM token of global U2QT id g (foundv2.nn.mrqvae's id space)
SCENARIO_CONFIG = "scenario.json"
SCENARIO_WEIGHTS = "prompt.safetensors"


def _mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, d_hidden), nn.GELU(), nn.Linear(d_hidden, d_out))


def _positions(mask: Tensor, start: Tensor | None = None) -> Tensor:
    """Position ids that count valid tokens only: ``start + cumsum(mask) - 1`` (clamped at 0)."""
    pos = mask.long().cumsum(dim=1) - 1
    if start is not None:
        pos = pos + start[:, None]
    return pos.clamp_min(0)


# ------------------------------------------------------------------------------ user prefixes
class UserPrefix(nn.Module):
    """A user's prefix: ``forward(lm, **inputs) → (embeds [B, P, H], mask [B, P])``.

    ``input_keys`` names the batch entries it reads (:meth:`inputs_from`)."""

    input_keys: tuple[str, ...] = ()

    def inputs_from(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The entries of ``batch`` this prefix reads; a clear error when one is missing."""
        missing = [k for k in self.input_keys if k not in batch]
        if missing:
            raise DataError(f"the {type(self).__name__} user prefix needs batch entries {missing}; "
                            f"the batch has {sorted(batch)}.")
        return {k: batch[k] for k in self.input_keys}


class TokenPrefix(UserPrefix):
    """The U2QT tokens of a user, read as LM tokens.

    Every global token id ``g`` of the tokenizer (``0 ≤ g < K``) becomes an LM token named
    ``<U2QT_g>`` (added by name, ids looked up after adding). Its input embedding is
    ``E[row_g] + proj(codebook[g])``: the resized embedding matrix's new row plus a **learned**
    projection of the code's codebook vector. The new rows start at zero, so at the start a
    token's embedding *is* its projected codebook vector (``proj`` is scaled so these match the
    spread of the LM's own embeddings), and codes with similar vectors start close; both the rows
    and ``proj`` are trained (under LoRA the rows stay trainable through
    ``CausalLM.enable_lora(trainable_token_ids=prefix.lm_token_ids)``).
    :meth:`fold_into_embeddings` writes ``proj(codebook)`` into the rows, for an LM that is
    exported on its own.

    Args:
        lm: the LM whose vocabulary gets the tokens.
        codebook: [K, code_dim] codebook vectors in global-id order (the tokenizer's
            ``quantizer.codebook``, and the tabular quantiser's after it).
    """

    input_keys = ("token_ids",)

    def __init__(self, lm: CausalLM, codebook: Tensor) -> None:
        super().__init__()
        if codebook.ndim != 2 or codebook.shape[0] == 0:
            raise DataError(f"TokenPrefix needs a [K, code_dim] codebook with K > 0; got shape {tuple(codebook.shape)}.")
        k, code_dim = codebook.shape
        names = [U2QT_TOKEN.format(g) for g in range(k)]
        already = not lm.missing_tokens(names)
        ids = lm.add_special_tokens(names)
        self.register_buffer("lm_token_ids", torch.tensor(ids, dtype=torch.long))
        self.register_buffer("codebook", codebook.detach().float().clone())
        self.proj = nn.Linear(code_dim, lm.hidden_size)
        table = lm.input_embeddings.weight
        with torch.no_grad():
            nn.init.zeros_(self.proj.bias)
            if already:  # an LM that already holds these rows (e.g. exported after fold_into_embeddings)
                nn.init.zeros_(self.proj.weight)
            else:
                base = table[: min(ids)].float()
                spread = self.proj(self.codebook).std().clamp_min(1e-8)
                self.proj.weight.mul_(base.std() / spread)
                table[self.lm_token_ids] = 0.0

    def forward(self, lm: CausalLM, token_ids: Tensor) -> tuple[Tensor, Tensor]:
        """``token_ids`` [B, T] global ids, -1 = empty slot → (embeds [B, T, H], mask [B, T])."""
        mask = token_ids >= 0
        if (token_ids >= self.codebook.shape[0]).any():
            raise DataError(f"U2QT token id {int(token_ids.max())} is outside the {self.codebook.shape[0]} "
                            "codes this prefix was built for (a different tokenizer?).")
        g = token_ids.clamp_min(0)
        emb = lm.embed(self.lm_token_ids[g]) + self.proj(self.codebook[g]).to(lm.input_embeddings.weight.dtype)
        return emb, mask

    @torch.no_grad()
    def fold_into_embeddings(self, lm: CausalLM) -> None:
        """Add ``proj(codebook)`` to the embedding rows and zero ``proj``: the same embeddings,
        now held by the LM alone."""
        table = lm.input_embeddings.weight
        table[self.lm_token_ids] += self.proj(self.codebook).to(table.dtype)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)


class SoftPrefix(UserPrefix):
    """Coarse-to-fine soft tokens from cached event embeddings (Q-Anchor's user encoder).

    ``1 + S + E`` slots: one **user** token (the mean of all the user's event vectors through
    the user adapter; always present), one token per **source** (the mean of that source's
    event vectors through an adapter shared by all sources, plus a learned source embedding;
    masked when the user has no event of that source), then one token per **event** slot (the
    event vector through its source's adapter; masked where ``ev_mask`` is False). Masked slots
    are masked out of attention, so their content never matters.

    Args:
        hidden: the LM's hidden size.
        event_dim: width of the cached event embeddings (e.g. 384 for MiniLM).
        n_sources: number of sources (``ev_source`` values ``0..S-1``).
        adapter_hidden: hidden width of every adapter MLP (default: ``hidden``).
    """

    input_keys = ("ev_text_emb", "ev_source", "ev_mask")

    def __init__(self, hidden: int, event_dim: int, n_sources: int, adapter_hidden: int | None = None) -> None:
        super().__init__()
        a = adapter_hidden or hidden
        self.n_sources = n_sources
        self.event_adapters = nn.ModuleList(_mlp(event_dim, a, hidden) for _ in range(n_sources))
        self.source_adapter = _mlp(event_dim, a, hidden)
        self.source_embedding = nn.Parameter(torch.randn(n_sources, hidden) * 0.02)
        self.user_adapter = _mlp(event_dim, a, hidden)

    def forward(self, lm: CausalLM | None, ev_text_emb: Tensor, ev_source: Tensor,
                ev_mask: Tensor) -> tuple[Tensor, Tensor]:
        """Events ``[B, E, event_dim]``, sources ``[B, E]``, mask ``[B, E]`` →
        (embeds [B, 1 + S + E, H], mask [B, 1 + S + E])."""
        valid = ev_mask.bool()
        if (ev_source[valid] >= self.n_sources).any() or (ev_source[valid] < 0).any():
            raise DataError(f"an event's source is outside 0..{self.n_sources - 1}, the sources this prefix was built for.")
        x = ev_text_emb.to(self.source_embedding.dtype) * valid[..., None]
        b, e, _ = x.shape
        events = x.new_zeros(b, e, self.source_embedding.shape[1])
        for s, adapter in enumerate(self.event_adapters):
            sel = valid & (ev_source == s)
            if sel.any():
                events[sel] = adapter(x[sel]).to(events.dtype)  # bf16 under autocast
        onehot = nn.functional.one_hot(ev_source.clamp(0, self.n_sources - 1), self.n_sources).to(x.dtype)
        onehot = onehot * valid[..., None]  # [B, E, S]
        counts = onehot.sum(dim=1)  # [B, S]
        source_mean = torch.einsum("bes,bed->bsd", onehot, x) / counts.clamp_min(1)[..., None]
        sources = self.source_adapter(source_mean) + self.source_embedding
        user_mean = x.sum(dim=1) / valid.sum(dim=1).clamp_min(1)[:, None]
        user = self.user_adapter(user_mean)[:, None]
        embeds = torch.cat([user, sources, events], dim=1)
        mask = torch.cat([valid.new_ones(b, 1), counts > 0, valid], dim=1)
        return embeds, mask


# ------------------------------------------------------------------------------ serving cache
@dataclass
class PrefixCache:
    """The keys and values of ``[lead][prefix]`` for a batch of users, with its mask.

    :meth:`fresh` builds a new ``transformers`` cache from them for each query: a forward
    mutates its cache (appends, or crops in place), so the stored tensors are never handed out."""

    kv: list[tuple[Tensor, Tensor]]  # per layer: keys, values [B, heads, P, head_dim]
    mask: Tensor  # [B, P] bool
    count: Tensor  # [B] valid positions (the next position id)

    def fresh(self):
        from transformers import DynamicCache

        cache = DynamicCache()
        for layer, (k, v) in enumerate(self.kv):
            cache.update(k, v, layer)  # concatenates onto an empty cache: a copy
        return cache

    def select(self, rows: Tensor) -> PrefixCache:
        """The cache of some users only (``rows``: a [B] bool mask or indices)."""
        return PrefixCache([(k[rows], v[rows]) for k, v in self.kv], self.mask[rows], self.count[rows])

    def repeat_interleave(self, n: int) -> PrefixCache:
        """Each user's cache ``n`` times in a row (``n`` queries per user in one batch)."""
        return PrefixCache([(k.repeat_interleave(n, 0), v.repeat_interleave(n, 0)) for k, v in self.kv],
                           self.mask.repeat_interleave(n, 0), self.count.repeat_interleave(n, 0))


def _cache_tensors(cache) -> list[tuple[Tensor, Tensor]]:
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache, strict=True))


# ------------------------------------------------------------------------------ the model
@dataclass
class AnchorOutput:
    """What :meth:`QueryAnchor.forward` returns."""

    embedding: Tensor  # [B, emb_dim] the query-aware user embedding (head output, not normalised)
    hidden: Tensor  # [B, H] last hidden state at <USER_EMB>
    answer_logits: Tensor | None  # [B, La, V]: position t predicts answer token t (None without answer)


@dataclass(frozen=True)
class AnchorHeadConfig(Options):
    """The embedding head that both towers of :class:`QueryAnchor` share (the Q-Anchor stage's
    ``--model.head.*``)."""

    GROUP: ClassVar[str] = "head"

    emb_dim: int = 128
    """Width of the query-aware embedding (paper 128)."""
    hidden: int = 512
    """Hidden width of the embedding head (paper 512)."""
    norm: bool = False
    """A LayerNorm on the last hidden state before the head (both towers)."""


def answer_hidden(lm: CausalLM, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
    """An LM's last hidden state [B, H] at each answer's last valid token (the answer tower before
    its head)."""
    mask = answer_mask.bool()
    if not mask.any(dim=1).all():
        raise DataError("an answer has no tokens; answers are tokenized with an end-of-text token "
                        "(QueryAnchor.tokenize_answers), so none is empty.")
    hidden, _ = lm.trunk(lm.embed(answer_ids), mask, _positions(mask))
    last = mask.long().cumsum(dim=1).argmax(dim=1)  # the last valid position
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class QueryAnchor(nn.Module):
    """The user tower and the answer tower of Query-as-Anchor over one causal LM.

    Args:
        causal_lm: the causal LM (gets the ``<USER_EMB>`` token).
        user_prefix: the user prefix (:class:`TokenPrefix` or :class:`SoftPrefix`).
        config: the embedding head (:class:`AnchorHeadConfig`: width, hidden width, norm).
        lead: the fixed text before the prefix (must not be empty).
        query_lead: text put before every query by :meth:`tokenize_queries`.
    """

    def __init__(self, causal_lm: CausalLM, user_prefix: UserPrefix, config: AnchorHeadConfig = AnchorHeadConfig(),
                 lead: str = "User:", query_lead: str = "\nQuery: ") -> None:
        super().__init__()
        self.lm = causal_lm
        self.prefix = user_prefix
        self.config = config
        self.user_emb_id = causal_lm.add_special_tokens([USER_EMB])[0]
        lead_ids, _ = causal_lm.tokenize([lead])
        if lead_ids.shape[1] == 0:
            raise DataError("QueryAnchor needs a non-empty lead text: its first token keeps every attention row "
                            "valid whatever prefix slots are empty.")
        self.register_buffer("lead_ids", lead_ids, persistent=False)
        self.query_lead = query_lead
        self.head_norm = nn.LayerNorm(causal_lm.hidden_size) if config.norm else nn.Identity()
        self.head = _mlp(causal_lm.hidden_size, config.hidden, config.emb_dim)

    def embed_hidden(self, hidden: Tensor) -> Tensor:
        """The embedding head on last hidden states ``[..., H]`` → ``[..., emb_dim]``."""
        return self.head(self.head_norm(hidden))

    # ---------------------------------------------------------------------------- text
    def tokenize_queries(self, queries: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        return self.lm.tokenize([self.query_lead + q for q in queries], max_length=max_length,
                                device=self.lead_ids.device)

    def tokenize_answers(self, answers: list[str], max_length: int | None = None) -> tuple[Tensor, Tensor]:
        """Answers end with the end-of-text token (the answer tower pools there)."""
        return self.lm.tokenize(answers, add_eos=True, max_length=max_length, device=self.lead_ids.device)

    # ---------------------------------------------------------------------------- segments
    def _prefix_segment(self, prefix_embeds: Tensor, prefix_mask: Tensor) -> tuple[Tensor, Tensor]:
        b = prefix_embeds.shape[0]
        lead = self.lm.embed(self.lead_ids).expand(b, -1, -1)
        embeds = torch.cat([lead, prefix_embeds.to(lead.dtype)], dim=1)
        return embeds, torch.cat([prefix_mask.new_ones(b, lead.shape[1]), prefix_mask.bool()], dim=1)

    def _suffix_segment(self, query_ids: Tensor, query_mask: Tensor,
                        prompt: Tensor | None) -> tuple[Tensor, Tensor]:
        """``[query][prompt]?[<USER_EMB>]``; ``prompt`` is [n, H] (one per scenario) or [B, n, H]."""
        b = query_ids.shape[0]
        parts = [self.lm.embed(query_ids)]
        masks = [query_mask.bool()]
        if prompt is not None:
            prompt = prompt.to(parts[0].dtype)
            parts.append(prompt.expand(b, -1, -1) if prompt.ndim == 2 else prompt)
            masks.append(query_mask.new_ones(b, parts[-1].shape[1], dtype=torch.bool))
        parts.append(self.lm.embed(torch.full_like(query_ids[:, :1], self.user_emb_id)))
        masks.append(query_mask.new_ones(b, 1, dtype=torch.bool))
        return torch.cat(parts, dim=1), torch.cat(masks, dim=1)

    # ---------------------------------------------------------------------------- user tower
    def forward(self, prefix_inputs: Mapping[str, Tensor], query_ids: Tensor, query_mask: Tensor,
                answer_ids: Tensor | None = None, answer_mask: Tensor | None = None,
                prompt: Tensor | None = None) -> AnchorOutput:
        """The full pass: the prefix from ``prefix_inputs`` (see ``prefix.input_keys``), then
        the query (right-padded ids and mask), an optional soft prompt and ``<USER_EMB>``,
        then optionally the answer (whose logits are returned for the next-token loss)."""
        embeds, mask = self.prefix(self.lm, **prefix_inputs)
        return self.forward_embeds(embeds, mask, query_ids, query_mask, answer_ids, answer_mask, prompt)

    def forward_embeds(self, prefix_embeds: Tensor, prefix_mask: Tensor, query_ids: Tensor, query_mask: Tensor,
                       answer_ids: Tensor | None = None, answer_mask: Tensor | None = None,
                       prompt: Tensor | None = None) -> AnchorOutput:
        """:meth:`forward` on prefix embeddings ``[B, P, H]`` and mask ``[B, P]`` given directly."""
        pre, pre_mask = self._prefix_segment(prefix_embeds, prefix_mask)
        suf, suf_mask = self._suffix_segment(query_ids, query_mask, prompt)
        parts, masks = [pre, suf], [pre_mask, suf_mask]
        if answer_ids is not None:
            parts.append(self.lm.embed(answer_ids))
            masks.append(answer_mask.bool())
        mask = torch.cat(masks, dim=1)
        hidden, _ = self.lm.trunk(torch.cat(parts, dim=1), mask, _positions(mask))
        at = pre.shape[1] + suf.shape[1] - 1  # <USER_EMB>: the last slot of the suffix
        h = hidden[:, at]
        logits = None
        if answer_ids is not None:  # <USER_EMB> predicts answer token 0, answer token t-1 predicts t
            logits = self.lm.logits(hidden[:, at: at + answer_ids.shape[1]])
        return AnchorOutput(self.embed_hidden(h), h, logits)

    # ---------------------------------------------------------------------------- answer tower
    def embed_answers(self, answer_ids: Tensor, answer_mask: Tensor) -> Tensor:
        """The answer tower: the same LM and head, pooled at each answer's last valid token."""
        return self.embed_hidden(answer_hidden(self.lm, answer_ids, answer_mask))

    # ---------------------------------------------------------------------------- serving
    def encode_prefix(self, prefix_inputs: Mapping[str, Tensor]) -> PrefixCache:
        """Run ``[lead][prefix]`` once; every query then runs against the returned cache."""
        embeds, mask = self.prefix(self.lm, **prefix_inputs)
        return self.encode_prefix_embeds(embeds, mask)

    def encode_prefix_embeds(self, prefix_embeds: Tensor, prefix_mask: Tensor) -> PrefixCache:
        pre, pre_mask = self._prefix_segment(prefix_embeds, prefix_mask)
        _, cache = self.lm.trunk(pre, pre_mask, _positions(pre_mask), use_cache=True)
        return PrefixCache(_cache_tensors(cache), pre_mask, pre_mask.long().sum(dim=1))

    def embed_cached(self, cache: PrefixCache, query_ids: Tensor, query_mask: Tensor,
                     prompt: Tensor | None = None) -> Tensor:
        """The query-aware embedding [B, emb_dim] from a prefix cache: only the query's own
        tokens (and its soft prompt, and ``<USER_EMB>``) run; equal to the full pass."""
        suf, suf_mask = self._suffix_segment(query_ids, query_mask, prompt)
        mask = torch.cat([cache.mask, suf_mask], dim=1)
        hidden, _ = self.lm.trunk(suf, mask, _positions(suf_mask, cache.count), past_key_values=cache.fresh(),
                                  use_cache=True)
        return self.embed_hidden(hidden[:, -1])

    def embed_users(self, prefix_inputs: Mapping[str, Tensor], queries: list[str],
                    prompts: list[Tensor | None] | None = None, max_length: int | None = None) -> Tensor:
        """Serving: [B, Q, emb_dim], every user of ``prefix_inputs`` for every query, the prefix
        encoded once (:meth:`encode_prefix`), then all queries in one cached pass
        (:meth:`embed_queries`); equal to a full pass per query."""
        return self.embed_queries(self.encode_prefix(prefix_inputs), queries, prompts, max_length)

    def embed_queries(self, cache: PrefixCache, queries: list[str], prompts: list[Tensor | None] | None = None,
                      max_length: int | None = None) -> Tensor:
        """Embeddings [B, Q, emb_dim] of every user of ``cache`` for every query of a list, in
        **one** pass over the queries' own tokens: a user's Q suffixes ``[query][prompt]?
        [<USER_EMB>]`` are laid side by side in one row after the cached prefix, each seeing
        the prefix and, causally, itself only (a block-diagonal mask), its positions continuing
        from the prefix as in its own full pass; so the LM's weights are read once for all users
        and queries, and the cache is neither copied per query nor repeated per user.
        ``prompts[q]`` is query q's soft prompt or None; queries are cut to ``max_length`` tokens."""
        if not queries:
            raise DataError("embed_queries needs at least one query.")
        parts, masks = [], []
        for q, text in enumerate(queries):
            ids, mask = self.tokenize_queries([text], max_length=max_length)
            emb, m = self._suffix_segment(ids, mask, prompts[q] if prompts is not None else None)
            parts.append(emb[0])
            masks.append(m[0])
        lengths = torch.tensor([len(m) for m in masks], device=cache.mask.device)
        suf, suf_mask = torch.cat(parts), torch.cat(masks)  # [S, H], [S]
        segment = torch.repeat_interleave(torch.arange(len(queries), device=lengths.device), lengths)
        # positions: valid tokens counted within each segment, from the prefix's count on
        before = torch.cumsum(suf_mask.long(), 0) - suf_mask.long()  # valid tokens before each slot
        starts = (torch.cumsum(lengths, 0) - lengths)
        within = before - before[starts][segment]
        b, s = cache.mask.shape[0], suf.shape[0]
        positions = (cache.count[:, None] + within[None]).clamp_min(0)
        order = torch.arange(s, device=lengths.device)
        own = (segment[:, None] == segment[None]) & (order[:, None] >= order[None]) & suf_mask[None]  # [S, S]
        visible = torch.cat([cache.mask[:, None].expand(b, s, -1), own.expand(b, -1, -1)], dim=2)
        hidden, _ = self.lm.trunk(suf.expand(b, -1, -1), visible, positions, past_key_values=cache.fresh(),
                                  use_cache=True)
        ends = torch.cumsum(lengths, 0) - 1  # each segment's <USER_EMB>
        return self.embed_hidden(hidden[:, ends])


# ------------------------------------------------------------------------------ scenario tuning
class ScenarioPrompt(nn.Module):
    """Scenario tuning (cluster-based soft prompts): ``n_tokens`` learned prompt tokens placed
    after the scenario's query, and one learned prototype per class; trained with the prototype
    softmax (``foundv2.anchor_losses.prototype_loss``) while everything else is frozen. Saved
    and loaded on its own (:meth:`save` / :meth:`load`), one folder per scenario.

    Args:
        hidden: the LM's hidden size.
        emb_dim: width of the query-aware embeddings.
        classes: the class names (their order is the label order).
        query: the scenario's query text.
        name: the scenario's name.
        n_tokens: prompt tokens (paper ≈ 6).
        tau: temperature of the prototype softmax.
    """

    def __init__(self, hidden: int, emb_dim: int, classes: list[str], query: str, name: str = "scenario",
                 n_tokens: int = 6, tau: float = TAU) -> None:
        super().__init__()
        if len(classes) < 2:
            raise DataError(f"scenario {name!r} needs at least 2 classes; got {classes}.")
        self.hidden, self.emb_dim, self.classes = hidden, emb_dim, list(classes)
        self.query, self.name, self.n_tokens, self.tau = query, name, n_tokens, tau
        self.prompt = nn.Parameter(torch.zeros(n_tokens, hidden))
        self.prototypes = nn.Parameter(torch.randn(len(classes), emb_dim) * 0.02)

    @property
    def config(self) -> dict:
        return {"hidden": self.hidden, "emb_dim": self.emb_dim, "classes": self.classes, "query": self.query,
                "name": self.name, "n_tokens": self.n_tokens, "tau": self.tau}

    @torch.no_grad()
    def init_prompt(self, lm: CausalLM, seed: int = 0) -> None:
        """Start the prompt tokens at the embeddings of ``n_tokens`` vocabulary tokens drawn
        with ``seed`` (from the LM's original vocabulary, not added tokens)."""
        table = lm.input_embeddings.weight
        added = torch.tensor(sorted(lm.tokenizer.get_added_vocab().values()), dtype=torch.long)
        keep = ~torch.isin(torch.arange(table.shape[0]), added)
        pick = torch.randperm(int(keep.sum()), generator=torch.Generator().manual_seed(seed))[: self.n_tokens]
        rows = keep.nonzero().squeeze(1)[pick]
        self.prompt.copy_(table[rows.to(table.device)].to(self.prompt.dtype))

    @torch.no_grad()
    def init_prototypes(self, emb: Tensor, labels: Tensor) -> None:
        """Start each prototype at the mean of its class's (normalised) embeddings; a class
        with no rows keeps its random start."""
        z = nn.functional.normalize(emb.float(), dim=-1)
        for c in range(len(self.classes)):
            sel = labels == c
            if sel.any():
                self.prototypes[c] = z[sel].mean(dim=0).to(self.prototypes.dtype)

    def logits(self, emb: Tensor) -> Tensor:
        """Class logits [B, C] of query-aware embeddings [B, emb_dim]."""
        return prototype_logits(emb, self.prototypes, self.tau)

    def save(self, folder: str | Path) -> None:
        """``scenario.json`` and ``prompt.safetensors`` into ``folder``, atomically."""
        from safetensors.torch import save_file

        with atomic_dir(folder) as tmp:
            atomic_write_json(tmp / SCENARIO_CONFIG, self.config)
            save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()},
                      str(tmp / SCENARIO_WEIGHTS))

    @classmethod
    def load(cls, folder: str | Path, map_location: str | torch.device = "cpu") -> ScenarioPrompt:
        from safetensors.torch import load_file

        folder = Path(folder)
        try:
            config = json.loads((folder / SCENARIO_CONFIG).read_text())
            state = load_file(str(folder / SCENARIO_WEIGHTS), device=str(map_location))
        except (OSError, json.JSONDecodeError) as err:
            raise DataError(f"{folder}: not a saved scenario prompt ({type(err).__name__}: {err}).") from err
        prompt = cls(**config)
        prompt.load_state_dict(state)
        return prompt.to(map_location)
