"""Query-as-Anchor model layer (foundv2.nn.llm, foundv2.nn.anchor, foundv2.anchor_losses) on a
tiny randomly initialised LM in fp32: KV-cache serving equals the full pass, causal and padding
masks hold, the false-negative margin drops what it should, added tokens survive a round trip
and train, the losses fall on a planted task, and the gathered InfoNCE under 2-process gloo."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from data_modules.schema import DataError
from foundv2.anchor_losses import anchor_info_nce, next_token_loss, prototype_loss, qanchor_loss
from foundv2.nn.anchor import (
    U2QT_TOKEN,
    USER_EMB,
    AnchorHeadConfig,
    QueryAnchor,
    ScenarioPrompt,
    SoftPrefix,
    TokenPrefix,
)
from foundv2.nn.llm import CausalLM, load_causal_lm, tiny_causal_lm
from tests.helpers import free_port

K, CODE_DIM, EV_DIM, N_SRC = 24, 8, 12, 3  # codes, codebook width, event width, sources
QUERIES = ["favourite genre?", "how active is this user lately", "weekday habits"]
ANSWERS = ["drama and comedy", "very active", "mostly weekends"]


def _tokens(seed: int = 0, b: int = 3, t: int = 7) -> torch.Tensor:
    """U2QT token ids [b, t] with -1 padding at the end of some rows."""
    ids = torch.randint(0, K, (b, t), generator=torch.Generator().manual_seed(seed))
    lengths = torch.tensor([t, t - 3, 2, t - 1, 4, t, 3, 5][:b])
    return torch.where(torch.arange(t) < lengths[:, None], ids, -1)


def _events(seed: int = 0, b: int = 3, e: int = 6) -> dict[str, torch.Tensor]:
    """Cached event embeddings with empty event slots (and source 2 absent for user 1)."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(0, N_SRC, (b, e), generator=g)
    src[1] = src[1] % 2
    mask = torch.arange(e) < torch.tensor([e, 3, 1, e - 2, 2, e, 4, 3][:b])[:, None]
    return {"ev_text_emb": torch.randn(b, e, EV_DIM, generator=g), "ev_source": src, "ev_mask": mask}


def _model(kind: str, family: str = "llama", seed: int = 0) -> QueryAnchor:
    torch.manual_seed(seed)
    lm = tiny_causal_lm(family, seed=seed)
    if kind == "token":
        prefix = TokenPrefix(lm, torch.randn(K, CODE_DIM, generator=torch.Generator().manual_seed(seed)))
    else:
        prefix = SoftPrefix(lm.hidden_size, EV_DIM, N_SRC, adapter_hidden=16)
    return QueryAnchor(lm, prefix, AnchorHeadConfig(emb_dim=16, hidden=32))


def _inputs(kind: str, seed: int = 0, b: int = 3) -> dict[str, torch.Tensor]:
    return {"token_ids": _tokens(seed, b)} if kind == "token" else _events(seed, b)


# ------------------------------------------------------------------------------ serving
@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", ["token", "soft"])
def test_cached_suffix_equals_full_pass(kind, family, one_thread):
    model = _model(kind, family).eval()
    inputs = _inputs(kind)
    q, qm = model.tokenize_queries(QUERIES)
    prompt = torch.randn(4, model.lm.hidden_size)
    with torch.no_grad():
        cache = model.encode_prefix(inputs)
        kv_before = [k.clone() for k, _ in cache.kv]
        for p in (None, prompt):
            full = model(inputs, q, qm, prompt=p).embedding
            cached = model.embed_cached(cache, q, qm, prompt=p)
            assert torch.allclose(cached, full, atol=1e-4), (cached - full).abs().max()
        # the stored cache is not mutated by the queries run against it: a second run is identical
        assert all(torch.equal(k, k0) for (k, _), k0 in zip(cache.kv, kv_before, strict=True))
        again = model.embed_cached(cache, q, qm)
        assert torch.allclose(again, model(inputs, q, qm).embedding, atol=1e-4)
        # every query of a list in one cached pass (queries of different lengths side by side,
        # a soft prompt after some of them), and the users' prefix encoded inside embed_users
        prompts = [None, prompt, torch.randn(2, model.lm.hidden_size)]
        many = model.embed_queries(cache, QUERIES, prompts)
        assert many.shape == (3, len(QUERIES), 16)
        assert torch.equal(model.embed_users(inputs, QUERIES, prompts), many)
        for j, text in enumerate(QUERIES):
            qj, qjm = model.tokenize_queries([text] * 3)
            full = model(inputs, qj, qjm, prompt=prompts[j]).embedding
            assert torch.allclose(many[:, j], full, atol=1e-4), (many[:, j] - full).abs().max()
        assert all(torch.equal(k, k0) for (k, _), k0 in zip(cache.kv, kv_before, strict=True))
        # cut to max_length tokens as the full pass of the cut query
        cut = model.embed_queries(cache, QUERIES[1:2], max_length=5)[:, 0]
        qc, qcm = model.tokenize_queries([QUERIES[1]] * 3, max_length=5)
        assert torch.allclose(cut, model(inputs, qc, qcm).embedding, atol=1e-4)
        with pytest.raises(DataError):
            model.embed_queries(cache, [])
        # several queries per user in one batch
        rep = cache.repeat_interleave(2)
        q2, q2m = q.repeat_interleave(2, 0), qm.repeat_interleave(2, 0)
        plain = model(inputs, q, qm).embedding
        assert torch.allclose(model.embed_cached(rep, q2, q2m), plain.repeat_interleave(2, 0), atol=1e-4)


def test_user_embedding_ignores_the_answer(one_thread):
    model = _model("token").eval()
    inputs = _inputs("token")
    q, qm = model.tokenize_queries(QUERIES)
    a1, m1 = model.tokenize_answers(ANSWERS)
    a2, m2 = model.tokenize_answers(["something else entirely", "no", "x y z w"])
    with torch.no_grad():
        out1 = model(inputs, q, qm, a1, m1)
        out2 = model(inputs, q, qm, a2, m2)
        bare = model(inputs, q, qm)
    assert torch.allclose(out1.embedding, out2.embedding, atol=1e-6)
    assert torch.allclose(out1.embedding, bare.embedding, atol=1e-5)
    assert out1.answer_logits.shape == (3, a1.shape[1], len(model.lm.tokenizer))
    # ... while the answer logits past the first position do depend on the answer
    assert not torch.allclose(out1.answer_logits[:, 1:2], out2.answer_logits[:, 1:2], atol=1e-4)
    # the first answer position is <USER_EMB> itself: equal logits there
    assert torch.allclose(out1.answer_logits[:, 0], out2.answer_logits[:, 0], atol=1e-5)


def test_masked_prefix_slots_do_not_matter(one_thread):
    model = _model("soft").eval()
    ev = _events()
    q, qm = model.tokenize_queries(QUERIES)
    with torch.no_grad():
        embeds, mask = model.prefix(model.lm, **ev)
        assert not mask.all() and mask[:, 0].all()  # some empty slots; the user token always present
        base = model.forward_embeds(embeds, mask, q, qm).embedding
        garbage = torch.where(mask[..., None], embeds, 10 * torch.randn_like(embeds))
        assert torch.allclose(model.forward_embeds(garbage, mask, q, qm).embedding, base, atol=1e-6)
        # the same garbage, attended to, changes the output: the mask is what protects it
        unmasked = model.forward_embeds(garbage, torch.ones_like(mask), q, qm).embedding
        assert not torch.allclose(unmasked, base, atol=1e-3)
        # through the soft prefix: new content in empty event slots changes nothing
        ev2 = dict(ev, ev_text_emb=torch.where(ev["ev_mask"][..., None], ev["ev_text_emb"],
                                               torch.randn_like(ev["ev_text_emb"])))
        ev2["ev_source"] = torch.where(ev["ev_mask"], ev["ev_source"], (ev["ev_source"] + 1) % N_SRC)
        assert torch.allclose(model(ev2, q, qm).embedding, model(ev, q, qm).embedding, atol=1e-6)
        # the same with U2QT tokens: the ids in padded slots do not matter
        tmodel = _model("token").eval()
        tok = _tokens()
        tb, tm = tmodel.prefix(tmodel.lm, tok)
        other = torch.where(tm[..., None], tb, torch.randn_like(tb))
        assert torch.allclose(tmodel.forward_embeds(other, tm, q, qm).embedding,
                              tmodel(dict(token_ids=tok), q, qm).embedding, atol=1e-6)


def test_soft_prefix_layout():
    prefix = SoftPrefix(8, EV_DIM, N_SRC)
    ev = _events()
    embeds, mask = prefix(None, **ev)
    assert embeds.shape == (3, 1 + N_SRC + 6, 8)
    for b in range(3):
        present = set(ev["ev_source"][b][ev["ev_mask"][b]].tolist())
        assert mask[b, 1: 1 + N_SRC].tolist() == [s in present for s in range(N_SRC)]
    assert torch.equal(mask[:, 1 + N_SRC:], ev["ev_mask"])
    with pytest.raises(DataError, match="source"):
        prefix(None, ev["ev_text_emb"], torch.full_like(ev["ev_source"], N_SRC), ev["ev_mask"])


# ------------------------------------------------------------------------------ losses
def _reference_nce(u, a, tau, margin):
    """Per anchor: candidates are every answer and every other user, minus those above the
    positive's cosine + margin; mean cross-entropy (written out row by row)."""
    u, a = F.normalize(u, dim=-1), F.normalize(a, dim=-1)
    losses = []
    for i in range(u.shape[0]):
        pos = u[i] @ a[i]
        cands = [a[i]] + [a[j] for j in range(len(a)) if j != i] + [u[j] for j in range(len(u)) if j != i]
        sims = torch.stack([u[i] @ c for c in cands])
        keep = torch.ones_like(sims, dtype=torch.bool) if margin is None else sims <= pos + margin
        keep[0] = True
        losses.append(-torch.log_softmax(sims[keep] / tau, 0)[0])
    return torch.stack(losses).mean()


def test_margin_mask_drops_planted_near_duplicates():
    g = torch.Generator().manual_seed(0)
    n, d = 6, 64
    u = torch.randn(n, d, generator=g)
    u[3] = u[0] + 0.01 * torch.randn(d, generator=g)  # a near-duplicate user of user 0
    a = u + 0.9 * torch.randn(n, d, generator=g)  # positives: cosine ≈ 0.7
    a[1] = u[1] + 1.5 * torch.randn(d, generator=g)  # a weaker positive (≈ 0.55) ...
    a[5] = 2 * F.normalize(u[1], dim=0) + F.normalize(u[5], dim=0)  # ... and an answer that fits user 1 better
    un, an = F.normalize(u, dim=-1), F.normalize(a, dim=-1)
    pos = (un * an).sum(1)
    sims = torch.cat([un @ an.T, un @ un.T], 1)  # candidates: answers, then users
    planted = {(0, n + 3), (3, n + 0), (1, 5)}
    for i in range(n):
        for j in range(2 * n):
            if j in (i, n + i):
                continue  # the positive, and the anchor itself
            if (i, j) in planted:
                assert sims[i, j] > pos[i] + 0.1
            else:  # not near the margin: only the planted rows can be dropped
                assert sims[i, j] < pos[i] + 0.08, (i, j)
    tau = 0.07
    loss, acc = anchor_info_nce(u, a, tau=tau, fn_margin=0.1)
    assert torch.allclose(loss, _reference_nce(u, a, tau, 0.1), atol=1e-5)
    off, _ = anchor_info_nce(u, a, tau=tau, fn_margin=None)
    assert torch.allclose(off, _reference_nce(u, a, tau, None), atol=1e-5)
    assert loss < off - 1.0  # the planted rows dominated the unmasked loss
    assert 0.0 < acc <= 1.0
    # keys: a shared key makes two rows non-negatives of each other
    keyed, _ = anchor_info_nce(u, a, tau=tau, fn_margin=None, keys=torch.tensor([0, 1, 2, 0, 4, 5]))
    assert keyed < off


def test_next_token_and_prototype_losses():
    logits = torch.randn(2, 3, 5)
    targets = torch.tensor([[1, 2, 3], [4, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, False, False]])
    ref = F.cross_entropy(torch.cat([logits[0], logits[1, :1]]), torch.tensor([1, 2, 3, 4]))
    assert torch.allclose(next_token_loss(logits, targets, mask), ref)
    assert next_token_loss(logits, targets, torch.zeros_like(mask)).item() == 0.0
    protos = torch.eye(3, 4)
    emb = torch.eye(3, 4) * 2 + 0.01
    loss, acc = prototype_loss(emb, protos, torch.tensor([0, 1, 2]), tau=0.1)
    assert acc == 1.0 and loss < 0.01


# ------------------------------------------------------------------------------ added tokens
def test_added_token_ids_survive_save_and_load(tmp_path):
    model = _model("token")
    lm = model.lm
    names = [USER_EMB] + [U2QT_TOKEN.format(g) for g in (0, 7, K - 1)]
    ids = [lm.token_id(n) for n in names]
    assert len(set(ids)) == len(ids) and min(ids) >= 256  # after the byte tokens, looked up by name
    rows = lm.input_embeddings.weight[ids].detach().clone()
    lm.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(str(tmp_path / "lm"))
    assert [loaded.token_id(n) for n in names] == ids
    assert torch.equal(loaded.input_embeddings.weight[ids], rows)
    again = QueryAnchor(loaded, TokenPrefix(loaded, model.prefix.codebook), AnchorHeadConfig(emb_dim=16, hidden=32))
    assert again.user_emb_id == model.user_emb_id
    assert torch.equal(again.prefix.lm_token_ids, model.prefix.lm_token_ids)
    assert len(loaded.tokenizer) == len(lm.tokenizer)  # nothing added twice
    with pytest.raises(DataError, match="no token"):
        loaded.token_id("<NOT_ADDED>")
    # the export is checksummed: one flipped byte in its weights is refused, naming the file
    weights = next((tmp_path / "lm").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(DataError, match=r"checksum mismatch.*causal LM folder"):
        load_causal_lm(str(tmp_path / "lm"))


def test_fold_into_embeddings_keeps_the_prefix(tmp_path):
    model = _model("token")
    tok = _tokens()
    before, _ = model.prefix(model.lm, tok)
    model.prefix.fold_into_embeddings(model.lm)
    after, _ = model.prefix(model.lm, tok)
    assert torch.allclose(before, after, atol=1e-6)
    model.lm.save_pretrained(tmp_path / "lm")
    loaded = load_causal_lm(str(tmp_path / "lm"))
    standalone, _ = TokenPrefix(loaded, model.prefix.codebook)(loaded, tok)  # rows already there: kept
    assert torch.allclose(standalone, before, atol=1e-6)


def test_gradients_reach_added_token_rows(one_thread):
    model = _model("token").train()
    tok = _tokens()
    q, qm = model.tokenize_queries(QUERIES)
    a, am = model.tokenize_answers(ANSWERS)
    out = model({"token_ids": tok}, q, qm, a, am)
    losses = qanchor_loss(out.embedding, model.embed_answers(a, am), out.answer_logits, a, am)
    losses["loss"].backward()
    grad = model.lm.input_embeddings.weight.grad
    used = model.prefix.lm_token_ids[tok[tok >= 0].unique()]
    assert (grad[used].abs().sum(1) > 0).all()
    assert grad[model.user_emb_id].abs().sum() > 0
    assert model.prefix.proj.weight.grad.abs().sum() > 0


def test_lora_keeps_added_rows_trainable(one_thread):
    pytest.importorskip("peft")
    model = _model("token").train()
    new_ids = model.prefix.lm_token_ids.tolist() + [model.user_emb_id]
    model.lm.enable_lora(r=4, alpha=8, dropout=0.0, trainable_token_ids=new_ids)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(trainable, lr=1.0)
    tok = _tokens()
    q, qm = model.tokenize_queries(QUERIES)
    a, am = model.tokenize_answers(ANSWERS)
    probe = torch.tensor([model.prefix.lm_token_ids[tok[0, 0]].item(), model.user_emb_id, 65])  # 65: "b"
    before = model.lm.embed(probe).detach().clone()
    out = model({"token_ids": tok}, q, qm, a, am)
    qanchor_loss(out.embedding, model.embed_answers(a, am), out.answer_logits, a, am)["loss"].backward()
    opt.step()
    after = model.lm.embed(probe).detach()
    assert not torch.allclose(after[:2], before[:2])  # the added rows moved
    assert torch.equal(after[2], before[2])  # an original row is frozen under LoRA
    assert not model.lm.input_embeddings.weight.requires_grad


# ------------------------------------------------------------------------------ training
@pytest.mark.parametrize("kind", ["token", "soft"])
def test_short_optimisation_lowers_both_losses(kind, one_thread):
    """A planted task: a user's group (half the users each) decides both its prefix content and
    its answer; a few dozen steps must lower the contrastive and the next-token loss."""
    torch.manual_seed(0)
    model = _model(kind)
    b = 8
    group = torch.arange(b) % 2
    if kind == "token":
        ids = torch.randint(0, K // 2, (b, 6), generator=torch.Generator().manual_seed(1))
        inputs = {"token_ids": ids + group[:, None] * (K // 2)}
    else:
        ev = _events(1, b)
        ev["ev_text_emb"] = ev["ev_text_emb"] + 3.0 * (2 * group[:, None, None] - 1)
        inputs = ev
    q, qm = model.tokenize_queries(["which group?"] * b)
    a, am = model.tokenize_answers([["the red group", "the blue group"][g] for g in group.tolist()])
    keys = group  # same-group users are not each other's negatives

    def losses():
        out = model(inputs, q, qm, a, am)
        return qanchor_loss(out.embedding, model.embed_answers(a, am), out.answer_logits, a, am, keys=keys)

    model.eval()
    with torch.no_grad():
        start = losses()
    model.train()
    # lr 1e-3: Adam moves every coordinate by ~lr a step, and the tiny LM's rows start at std 0.02
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(50):
        opt.zero_grad()
        losses()["loss"].backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        end = losses()
    assert end["loss/nce"] < 0.5 * start["loss/nce"], (start, end)
    assert end["loss/ntp"] < 0.8 * start["loss/ntp"], (start, end)


def test_scenario_prompt_tunes_and_round_trips(tmp_path, one_thread):
    """Everything frozen but the prompt and the prototypes; a planted two-class scenario."""
    model = _model("token").eval()
    for p in model.parameters():
        p.requires_grad_(False)
    b = 8
    labels = torch.arange(b) % 2
    ids = torch.randint(0, K // 2, (b, 6), generator=torch.Generator().manual_seed(2)) + labels[:, None] * (K // 2)
    inputs = {"token_ids": ids}
    scen = ScenarioPrompt(model.lm.hidden_size, 16, ["no", "yes"], query="will the user churn?", name="churn")
    scen.init_prompt(model.lm, seed=0)
    q, qm = model.tokenize_queries([scen.query] * b)
    with torch.no_grad():
        scen.init_prototypes(model(inputs, q, qm, prompt=scen.prompt).embedding, labels)
    opt = torch.optim.Adam(scen.parameters(), lr=1e-2)

    def loss():
        return prototype_loss(model(inputs, q, qm, prompt=scen.prompt).embedding, scen.prototypes, labels, scen.tau)

    with torch.no_grad():
        start, _ = loss()
    prompt0 = scen.prompt.detach().clone()
    for _ in range(30):
        opt.zero_grad()
        loss()[0].backward()
        opt.step()
    end, acc = loss()
    assert end < start and acc == 1.0
    assert not torch.allclose(scen.prompt, prompt0)  # the prompt itself was trained
    scen.save(tmp_path / "churn")
    back = ScenarioPrompt.load(tmp_path / "churn")
    assert back.config == scen.config
    with torch.no_grad():
        emb = model(inputs, q, qm, prompt=back.prompt).embedding
        assert torch.equal(back.logits(emb), scen.logits(emb))
        # served: the prompt runs after the query against the cached prefix
        served = model.embed_cached(model.encode_prefix(inputs), q, qm, prompt=back.prompt)
    assert torch.allclose(served, emb, atol=1e-4)
    with pytest.raises(DataError):
        ScenarioPrompt.load(tmp_path / "missing")


def test_load_errors():
    with pytest.raises(DataError, match="not one of"):
        load_causal_lm("/no/such/folder")
    with pytest.raises(DataError, match="non-empty lead"):
        QueryAnchor(tiny_causal_lm(), SoftPrefix(32, 4, 1), lead="")
    assert isinstance(load_causal_lm("tiny-qwen2"), CausalLM)


# ------------------------------------------------------------------------------ DDP
WORLD, PER_RANK = 2, 3


def _ddp_batch():
    b = WORLD * PER_RANK
    tok = _tokens(3, b)
    answers = [f"answer number {i}" for i in range(b)]
    return tok, [QUERIES[i % 3] for i in range(b)], answers


def _ddp_losses(model, tok, queries, answers, gather):
    q, qm = model.tokenize_queries(queries)
    a, am = model.tokenize_answers(answers)
    out = model({"token_ids": tok}, q, qm, a, am)
    return qanchor_loss(out.embedding, model.embed_answers(a, am), out.answer_logits, a, am, gather=gather)


def _ddp_worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = _model("token").train()
        tok, queries, answers = _ddp_batch()
        sl = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        losses = _ddp_losses(model, tok[sl], queries[sl], answers[sl], gather=True)
        losses["loss/nce"].backward()
        local = _ddp_losses(model, tok[sl], queries[sl], answers[sl], gather=False)["loss/nce"].detach()
        torch.save({"nce": losses["loss/nce"].detach(), "local": local,
                    "grad_head": model.head[0].weight.grad, "grad_proj": model.prefix.proj.weight.grad},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.ddp
def test_gathered_info_nce_under_ddp(tmp_path, one_thread):
    # the single-process reference first: the forked children then inherit the imported
    # transformers modules instead of importing them again (they set 1 thread first, as
    # DataLoader workers do)
    model = _model("token").train()
    tok, queries, answers = _ddp_batch()
    full = _ddp_losses(model, tok, queries, answers, gather=False)["loss/nce"]
    full.backward()
    mp.start_processes(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True, start_method="fork")
    res = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    # the rank losses average to the single-process loss over the whole batch ...
    assert torch.allclose(sum(r["nce"] for r in res) / WORLD, full, atol=1e-5)
    # ... which saw the other rank's users and answers as negatives
    assert not torch.allclose(res[0]["nce"], res[0]["local"], atol=1e-4)
    # gradients flow back through the gather: DDP's average of the rank gradients is the full one
    for name, param in (("grad_head", model.head[0].weight), ("grad_proj", model.prefix.proj.weight)):
        assert torch.allclose(sum(r[name] for r in res) / WORLD, param.grad, atol=1e-5), name


# ------------------------------------------------------------------------------ SmolLM2
@pytest.mark.slow
def test_smollm2_converts_once_and_answers(tmp_path):
    from foundv2.nn.llm import smollm2_folder

    torch.set_num_threads(2)
    lm = load_causal_lm("smollm2", cache_dir=tmp_path)
    folder = smollm2_folder(tmp_path)
    stamp = (folder / "config.json").stat().st_mtime_ns
    lm2 = load_causal_lm("smollm2", cache_dir=tmp_path)
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # read, not converted again
    assert lm2.hidden_size == 576 and type(lm2.hf).__name__ == "LlamaForCausalLM"
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids, mask = lm.tokenize([prompt])
    with torch.no_grad():
        out = lm.hf.generate(input_ids=ids, attention_mask=mask.long(), max_new_tokens=8, do_sample=False)
    assert "Paris" in lm.tokenizer.decode(out[0, ids.shape[1]:])
    # the special tokens of Query-as-Anchor go on top of its vocabulary, looked up by name
    vocab = lm2.input_embeddings.weight.shape[0]
    assert lm2.add_special_tokens([USER_EMB]) == [vocab] and lm2.input_embeddings.weight.shape[0] == vocab + 1
