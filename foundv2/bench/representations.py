"""What the bench probes: per-user features of any batch of users (:class:`~foundv2.bench.users.UserBatch`).

Each representation is built for the users it is asked for and nothing else: the probes' train
and validation samples once, then each batch of test users. One that learns something from the
train users (an IDF, an SVD, int8 scales, a reference date) learns it in :meth:`Features.fit`
from the train users of the sample and applies it unchanged to every other user.

- :class:`Pooled`: the mean over the history slices of the parameter-free slice features, from
  the prepared table through the DataModule's own event collate;
- :class:`TokenFeatures`: ``tokens_bag`` (counts of global token ids) and ``tokens_sum`` (summed
  code vectors per source) from a tokens dataset;
- :class:`Embedding`: a per-user embedding column of a stage output (stage 1, stage 3, ...);
- the baselines' features: :class:`TfIdf`, :class:`TfIdfSVD`, :class:`TopItems`, :class:`Activity`.

A stage output is read through :class:`~foundv2.bench.users.ArrowRows`, a file at a time and only
the rows asked for; a user the output does not hold gets zeros.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import scipy.sparse as sp
import torch

from data_modules.schema import DataError
from data_modules.store import Split
from foundv2.bench import baselines as B
from foundv2.bench.users import ArrowRows, UserBatch, prepared_rows_reader, ragged
from foundv2.nn.item_factors import ItemFactors, fit_idf, tfidf_rows

Matrix = np.ndarray | sp.csr_matrix


@contextlib.contextmanager
def readable(folder: Path, what: str) -> Iterator[None]:
    """Turn any failure to read a stage output / export folder into one DataError naming it."""
    try:
        yield
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - a corrupt folder fails in many libraries' ways
        raise DataError(
            f"{folder}: the {what} cannot be read ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            f"it is truncated, corrupt or from another version: rerun the step that writes it."
        ) from None


class Features:
    """Per-user features of any batch of users; :meth:`fit` first when they learn from the train users."""

    def fit(self, users: UserBatch) -> None:
        """Learn from the train users among ``users`` (nothing, by default)."""

    def __call__(self, users: UserBatch) -> Matrix:
        raise NotImplementedError


def check_stage_output(folder: str | Path, key: str) -> dict:
    """A stage output the bench reads (``key``: the setting that names it), checked before any
    data is read: a folder with a readable ``meta.json`` listing parts that all exist and open as
    Arrow streams (their schema; :class:`StageOutput` reads them whole before the first probe).
    Returns its meta."""
    from data_modules.store import META_FILE

    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{key} {folder}: no such folder; run the stage's predict first, or fix the path.")
    if not (folder / META_FILE).exists():
        raise DataError(f"{key} {folder}: no complete stage output here (meta.json missing): run the stage's "
                        f"predict first.")
    with readable(folder, "stage output"):
        meta = json.loads((folder / META_FILE).read_text())
        for part in meta.get("parts") or []:
            if not (folder / part).is_file():
                raise DataError(f"{key} {folder}: the part {part} that meta.json lists is missing; the stage output "
                                f"is incomplete: rerun the step that writes it.")
            with pa.memory_map(str(folder / part)) as src:
                pa.ipc.open_stream(src).schema  # noqa: B018 - the header must read
    if not meta.get("parts"):
        raise DataError(f"{key} {folder}: the stage output holds no rows.")
    return meta


def check_inputs(tokens_dir: str | None, tokenizer_dir: str | None, embeddings: dict[str, str],
                 qanchor: dict[str, str]) -> None:
    """What the bench reads besides the data, checked before anything is read or written: the
    tokens and embedding outputs (:func:`check_stage_output`), the tokenizer export against its
    checksums, each Q-Anchor checkpoint (its record, or the weights-only checks of one without)."""
    from data_modules.store import CONFIG_FILE, verify_export

    if tokens_dir:
        check_stage_output(tokens_dir, "bench.tokens_dir")
    for name, folder in embeddings.items():
        check_stage_output(folder, f"bench.embeddings.{name}")
    if tokenizer_dir and (Path(tokenizer_dir) / CONFIG_FILE).exists():
        verify_export(tokenizer_dir, "tokenizer export")
    if qanchor:
        from foundv2.bench.qanchor import checkpoint_path
        from foundv2.io import verify_checkpoint

        for name, ckpt in qanchor.items():
            verify_checkpoint(checkpoint_path(ckpt), f"give bench.qanchor.{name} a whole QAnchorStage checkpoint, "
                                                     f"or fit it again")


class StageOutput:
    """A complete stage output's ``meta.json`` and its parts, read now and indexed by their
    ``row`` column (:class:`ArrowRows`): a damaged part is refused before the first probe. Any
    failure to read it is one DataError naming it."""

    def __init__(self, folder: Path, n_rows: int, what: str):
        from data_modules.store import META_FILE

        self.folder, self.n_rows, self.what = Path(folder), n_rows, what
        if not (self.folder / META_FILE).exists():
            raise DataError(f"{folder}: no complete stage output here (meta.json missing): run the stage's predict "
                            f"first.")
        with readable(self.folder, what):
            self.meta = json.loads((self.folder / META_FILE).read_text())
        if not self.meta.get("parts"):
            raise DataError(f"{folder}: the stage output holds no rows.")
        self._rows: ArrowRows | None = None
        self.rows  # noqa: B018 - every part read (and indexed) now, not at its row's first probe

    @property
    def rows(self) -> ArrowRows:
        if self._rows is None:
            with readable(self.folder, self.what):
                self._rows = ArrowRows([self.folder / p for p in self.meta["parts"]], row_column="row",
                                       n_rows=self.n_rows, what=str(self.folder))
        return self._rows

    def read(self, rows: np.ndarray, columns: list[str]) -> tuple[pa.Table, np.ndarray]:
        """``columns`` of these prepared rows (those the output holds) and the mask of those found."""
        reader = self.rows
        missing = [c for c in columns if c not in reader.columns]
        if missing:
            raise DataError(f"{self.folder}: no {', '.join(repr(c) for c in missing)} column in this stage output; "
                            f"columns are {reader.columns}.")
        with readable(self.folder, self.what):
            return reader.read(rows, columns)


# ------------------------------------------------------------------------------------- pooled
class Pooled(Features):
    """Mean over every history slice of the parameter-free slice features.

    The sources fill mostly different columns of a slice feature (text, item codes, category
    histogram, values), so one mean keeps them apart at a quarter of a per-source concatenation's
    width, which keeps the probes fast. Users are read from the prepared table and collated by the
    DataModule's own event collate, ``batch_size`` users at a time.
    """

    def __init__(self, dm):
        from foundv2.nn.slices import PooledSliceFeatures

        d = dm.dims()
        self.dm = dm
        self.net = PooledSliceFeatures(d["num_sources"], d["num_items"], d["num_categories"], d["text_dim"],
                                       d["tabular_dim"], calendar_dim=d["calendar_dim"])
        self.reader = prepared_rows_reader(dm)

    @property
    def dim(self) -> int:
        return int(self.net.dim)

    def __call__(self, users: UserBatch) -> np.ndarray:
        import datasets
        from torch.utils.data import DataLoader

        from data_modules.datamodule import UserRows
        from foundv2.nn.slices import mean_by_user

        table, _ = self.reader.read(users.rows)
        if "row" not in table.column_names:
            table = table.append_column("row", pa.array(users.rows, pa.int64()))
        rows = datasets.Dataset(datasets.table.InMemoryTable(table))
        loader = DataLoader(UserRows(rows, np.arange(len(users))), batch_size=self.dm.hparams.batch_size,
                            collate_fn=self.dm.collate())
        out = np.zeros((len(users), self.net.dim), np.float32)
        at = 0
        with torch.no_grad():
            for batch in loader:
                s = self.net(batch)
                n = batch["user_id"].shape[0]
                out[at:at + n] = mean_by_user(s["feat"], s["slice_user"], n).numpy()
                at += n
        return out


# ------------------------------------------------------------------------------------- tokens
def token_bytes(tokens_dir: Path) -> float:
    """Bytes per user of a tokens output, from its ``report.json`` (``storage.bytes_per_user``)."""
    with readable(tokens_dir, "tokens' report.json"):
        return float(json.loads((Path(tokens_dir) / "report.json").read_text())["storage"]["bytes_per_user"])


def token_collision_rate(folder: Path) -> float | None:
    """The whole-tuple collision rate in a tokens output's ``report.json`` (the share of windows,
    or of users for user-level tokens, whose whole code tuple another one shares); None when the
    output has no such report."""
    path = Path(folder) / "report.json"
    if not path.exists():
        return None
    with readable(folder, "tokens' report.json"):
        rate = json.loads(path.read_text()).get("collisions", {}).get("collision_rate")
    return None if rate is None else float(rate)


def _nested(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A per-user list of per-slice lists → ``(values, slice of each value, user of each slice)``."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    slice_user = np.asarray(pc.list_parent_indices(arr).to_numpy(), np.int64)
    inner = arr.flatten()
    value_slice = np.asarray(pc.list_parent_indices(inner).to_numpy(), np.int64)
    return np.asarray(inner.flatten().to_numpy(zero_copy_only=False), np.int64), value_slice, slice_user


class TokenFeatures:
    """``tokens_bag`` and ``tokens_sum`` of a tokens dataset (TokenizerStage predict).

    ``tokens_bag``: counts of each user's global token ids ``[n, vocab]`` (sparse);
    ``tokens_sum``: the decoded code vectors summed per source ``[n, sources × dim]`` (needs the
    tokenizer's export). :attr:`usage` sums every bag built, for the code-usage plot.
    """

    def __init__(self, tokens_dir: Path, tokenizer_dir: Path | None, n_rows: int):
        self.folder = Path(tokens_dir)
        self.bytes_per_user = token_bytes(self.folder)
        self.output = StageOutput(self.folder, n_rows, "tokens output")
        meta = self.output.meta
        with readable(self.folder, "tokens output"):
            self.vocab = int(meta["vocab_size"])
            self.n_sources = len(meta["sources"])
            self.levels = meta["levels"]
        self.model = None
        if tokenizer_dir is not None and (Path(tokenizer_dir) / "config.json").exists():
            from foundv2.nn.mrqvae import MultiViewRQVAE

            with readable(Path(tokenizer_dir), "tokenizer export"):
                self.model = MultiViewRQVAE.from_pretrained(tokenizer_dir).eval()
        self.usage = np.zeros(self.vocab)

    def bag(self, users: UserBatch) -> sp.csr_matrix:
        table, found = self.output.read(users.rows, ["token_ids"])
        ids, id_slice, slice_user = _nested(table.column("token_ids"))
        keep = ids >= 0
        owner = np.flatnonzero(found)[slice_user[id_slice[keep]]]
        bag = sp.csr_matrix((np.ones(int(keep.sum()), np.float32), (owner, ids[keep])), shape=(len(users), self.vocab))
        self.usage += np.asarray(bag.sum(0)).ravel()
        return bag

    def summed(self, users: UserBatch) -> np.ndarray:
        if self.model is None:
            raise DataError(f"{self.folder}: no tokenizer export (config.json) to sum code vectors for 'tokens_sum'; "
                            f"pass tokenizer_dir or leave 'tokens_sum' out of representations.")
        table, found = self.output.read(users.rows, ["codes", "slice_source"])
        codes, code_slice, slice_user = _nested(table.column("codes"))
        src, _ = ragged(table.column("slice_source"), np.int64)
        n_slices = len(slice_user)
        with torch.no_grad():
            q = self.model.quantizer.decode_codes(torch.as_tensor(codes.reshape(n_slices, -1)),
                                                  torch.as_tensor(src)).numpy()
        out = np.zeros((len(users), self.n_sources, q.shape[1]), np.float32)
        np.add.at(out, (np.flatnonzero(found)[slice_user], src), q)
        return out.reshape(len(users), -1)


class _Bound(Features):
    def __init__(self, fn):
        self.fn = fn

    def __call__(self, users: UserBatch) -> Matrix:
        return self.fn(users)


def token_rows(tokens: TokenFeatures) -> dict[str, Features]:
    """``{'tokens_bag', 'tokens_sum'}`` features of a :class:`TokenFeatures` (the sum only with
    the tokenizer's export)."""
    out = {"tokens_bag": _Bound(tokens.bag)}
    if tokens.model is not None:
        out["tokens_sum"] = _Bound(tokens.summed)
    return out


# ------------------------------------------------------------------------------------- stage outputs
class Embedding(Features):
    """A per-user embedding column of a stage output (stage 1, stage 3, Q-Anchor)."""

    def __init__(self, folder: Path, n_rows: int, column: str = "user_emb"):
        self.folder, self.column = Path(folder), column
        self.output = StageOutput(self.folder, n_rows, "embedding output")
        self.dim: int | None = None

    def __call__(self, users: UserBatch) -> np.ndarray:
        table, found = self.output.read(users.rows, [self.column])
        with readable(self.folder, "embedding output"):
            col = table.column(self.column).combine_chunks()
            flat = np.asarray(col.flatten().to_numpy(zero_copy_only=False), np.float32)
            if self.dim is None:
                self.dim = int(len(flat) // len(col)) if len(col) else self._width()
            out = np.zeros((len(users), self.dim), np.float32)
            out[found] = flat.reshape(len(col), self.dim)
        return out

    def _width(self) -> int:
        """The column's width, from its first row (asked for users the output does not hold)."""
        table, _ = self.output.read(np.flatnonzero(self.output.rows.where >= 0)[:1], [self.column])
        return len(table.column(self.column)[0])


# ------------------------------------------------------------------------------------- baselines
def _train(users: UserBatch) -> np.ndarray:
    return users.part(Split.TRAIN)


class TfIdf(Features):
    """TF-IDF of the history item counts, IDF from the train users (:func:`~foundv2.bench.baselines.tfidf_features`)."""

    def fit(self, users: UserBatch) -> None:
        self.idf = fit_idf(users.history[_train(users)])

    def __call__(self, users: UserBatch) -> sp.csr_matrix:
        return tfidf_rows(users.history, self.idf)


class TfIdfSVD(Features):
    """``tfidf_svd<k>_int8``: TF-IDF → truncated SVD fitted on the train users → per-dimension
    int8 with scales from the train users (:func:`~foundv2.bench.baselines.tfidf_svd_int8`), read
    back as float32."""

    def __init__(self, k: int, seed: int = 0):
        self.k, self.seed = k, seed

    def fit(self, users: UserBatch) -> None:
        counts = sp.csr_matrix(users.history[_train(users)], dtype=np.float64)
        self.factors = ItemFactors(counts.shape[1], B.svd_width(self.k, *counts.shape[::-1]))
        _, self.scales = B.quantise_int8(self.factors.fit_matrix(counts, self.seed).project(counts),
                                         np.arange(counts.shape[0]))

    def __call__(self, users: UserBatch) -> np.ndarray:
        return B.dequantise_int8(B.quantise_with(self.factors.project(users.history), self.scales), self.scales)


class TopItems(Features):
    """``top_items<b>``: each user's ``b // 2`` most frequent history items as a bag, TF-IDF'd
    with the IDF of the train users' bags (:func:`~foundv2.bench.baselines.top_items`)."""

    def __init__(self, n_bytes: int):
        self.n_bytes = n_bytes

    def fit(self, users: UserBatch) -> None:
        self.idf = fit_idf(B.top_items(users.history[_train(users)], self.n_bytes))

    def __call__(self, users: UserBatch) -> sp.csr_matrix:
        return tfidf_rows(B.top_items(users.history, self.n_bytes), self.idf)


class Activity(Features):
    """Item-free activity features, the reference date from the train users
    (:func:`~foundv2.bench.baselines.activity_features`)."""

    def __init__(self, n_sources: int):
        self.n_sources = n_sources
        self.dim = len(B.activity_features([], [], [], n_sources, np.zeros(0, np.int64))[1])

    def fit(self, users: UserBatch) -> None:
        self.reference = B.activity_reference([users.times[u] for u in _train(users)])

    def __call__(self, users: UserBatch) -> np.ndarray:
        return B.activity_features(users.sources, users.times, users.values, self.n_sources, users.split,
                                   reference=self.reference)[0]
