"""The settings of the data (a config's ``data:`` section) and the preparation they name.

:class:`DataSettings` holds what ``data:`` declares and prepares the data set it names
(``prepare_data``); it imports neither Lightning nor the models, so ``foundv2 data`` (and each of
its ranks under torchrun) starts in about a second and a half instead of five or more.
:class:`~data_modules.datamodule.UserDataModule` is the same settings on a LightningDataModule, with
the loaders the stages read.
"""

from __future__ import annotations

from pathlib import Path

from data_modules.loaders import files_fingerprint, open_dataset
from data_modules.prepare import PrepareConfig, WindowConfig, load_meta, prepare_dataset
from data_modules.ranks import Ranks
from data_modules.schema import DataError

#: the orders ``predict`` may read users in (``data.predict_order``)
PREDICT_ORDERS = ("rows", "length")


class Settings(dict):
    """The settings as a dict whose keys read as attributes too (``hparams.cache_dir``), as
    Lightning's ``hparams`` do."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DataSettings:
    """A data set, how its users' histories are cut into windows, and how batches read them.

    Args:
        dataset: ``synthetic``, ``movielens-1m``, ``movielens-100k`` or ``files``.
        loader_args: arguments of the loader (synthetic: n_users, seed ...; files: events, users,
            sources, tabular_inputs, labels, primary_source).
        window_mode: ``day``, ``week`` or ``events`` (every ``window_size`` distinct moments).
        window_size: moments per window for ``events`` mode.
        window_period: windows this far apart in key are periodic partners (default by mode).
        split_seed: seed of the deterministic 80/10/10 user split.
        future_frac: share of each user's (primary-source) events held out as the future.
        text_encoder: ``hashing``, ``minilm`` or ``hf:<local model folder>``.
        cache_dir: where prepared data and the text-embedding cache live (gitignored).
        buckets: users are partitioned by a hash of their id into this many buckets while the
            data are prepared, one shard each; peak memory is one bucket. None: the loader's
            default, about one bucket per 500,000 events (one for MovieLens). It decides the
            shards; the number of processes that prepare them never does.
        batch_size: users per batch, per process.
        num_workers: DataLoader worker processes.
        max_windows: most recent windows kept per user in a batch.
        max_events: most recent history events kept per user in a batch.
        predict_splits: which users ``predict`` covers.
        progress: show progress bars while preparing.
        features_dir: a features dataset (a stage-1 ``predict`` output); when set, batches are
            slice batches of those features instead of event batches.
        tokens_dir: a tokens dataset (the tokenizer's ``predict`` output); when set, batches are
            token batches (data_modules/tokens.py): stage 3 reads them.
        representation_dir: a dataset with one ``user_emb`` per user (any stage output that has
            it, or ``representations.write_representation``); when set, batches are
            representation batches (the vector, the labels, history and future items) for probes.
        teacher_dir: with ``tokens_dir``: a dataset with one ``user_emb`` per user (stage 1's
            features, say) that token batches carry as ``teacher_emb``, standardised per feature
            with the (sampled, ``fit_users``) training users' mean and spread, for stage 3's
            distill term; only the users a fit reads have one (the ``fit_users`` and ``val_users``
            samples): ``has_teacher`` is False for everyone else, and for test users (their
            vectors never reach a loss; validation users' score only the validation loss).
        questions: Query-as-Anchor pairs (data_modules/questions.py): a list of questions
            ``{name, query, answer, source?, top?}``, or ``true`` for the default set; when set,
            *training* batches are query/answer batches of the training users' pairs (validation
            and test users get none): event batches of the pairs' users plus the pairs, or token
            batches with ``tokens_dir``; ``predict`` still hands out batches of users.
        calendar: give the models absolute time where the data has calendar time: each window's
            position in the data set's calendar and the user's tenure at it (event batches'
            ``win_calendar``; stage 1's event encoder and the pooled slice features read it).
            false: the models are built without it (an ablation, or a checkpoint from before).
        fit_users: train on a seeded sample of this many training users (None: every training
            user). The sample is drawn once from ``sample_seed`` among the training users the input
            dataset holds, ordered by prepared row, so it is the same on every DDP rank (each rank
            then takes its share of it, as of the whole split) and the same users at every stage
            whose input holds the same users. Whatever is fitted on "the training users" reads
            this sample only: the training batches, question pairs, collaborative item factors,
            the teacher's vectors and their standardisation. ``predict`` still covers every user.
        val_users: validate on a seeded sample of this many validation users (None: all of them).
        sample_seed: seed of the ``fit_users`` and ``val_users`` samples.
        predict_order: the order ``predict`` reads (and writes) users in: ``rows`` (the input's
            order) or ``length`` (by how long a user is: windows then events for event batches,
            tokens for token batches; stable), so that a batch holds users of like length and
            little padding: stage 1 and stage 3 then compute ~1.5-2x less on synthetic users. Each
            user's output is the same up to float rounding (a user's numbers depend in their last
            bits on which users share its batch, as with another batch size); the output holds them
            in that order (readers look users up by ``row``). Under DDP each rank reads every
            world-size-th user of that order.
        warn_no_history: ``foundv2 data`` and the bench report warn, with the likely fix, when more
            than this share of the users with events have no history window (1: never).
        warn_future_share: ... and when the future holds more than this share of all events (1: never).

    The settings are kept as ``hparams`` (:class:`Settings`; on the DataModule, Lightning's saved
    hyperparameters, so checkpoints carry them).
    """

    def __init__(
        self,
        dataset: str = "movielens-1m",
        loader_args: dict | None = None,
        window_mode: str = "events",
        window_size: int = 16,
        window_period: int | None = None,
        split_seed: int = 0,
        future_frac: float = 0.2,
        text_encoder: str = "minilm",
        cache_dir: str = ".cache/foundv2",
        buckets: int | None = None,
        batch_size: int = 64,
        num_workers: int = 0,
        max_windows: int = 32,
        max_events: int = 512,
        predict_splits: list[str] | None = None,
        progress: bool = True,
        features_dir: str | None = None,
        tokens_dir: str | None = None,
        representation_dir: str | None = None,
        teacher_dir: str | None = None,
        questions: list[dict] | bool | None = None,
        calendar: bool = True,
        fit_users: int | None = None,
        val_users: int | None = None,
        sample_seed: int = 0,
        predict_order: str = "rows",
        warn_no_history: float = 0.25,
        warn_future_share: float = 0.5,
    ):
        super().__init__()
        if predict_order not in PREDICT_ORDERS:
            raise DataError(f"data.predict_order must be one of {list(PREDICT_ORDERS)}, got {predict_order!r}.")
        settings = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        self._keep_settings(settings)
        self.window = WindowConfig(window_mode, window_size, window_period)

    def _keep_settings(self, settings: dict) -> None:
        self.hparams = Settings(settings)

    def prepare_config(self) -> PrepareConfig:
        hp = self.hparams
        args = dict(hp.loader_args or {})
        if hp.dataset == "files":
            args["_fingerprint"] = files_fingerprint(args)
        return PrepareConfig(dataset=hp.dataset, loader_args=args, window=self.window, split_seed=hp.split_seed,
                             future_frac=hp.future_frac, primary_source=None, text_encoder=hp.text_encoder,
                             buckets=hp.buckets)

    def data_warnings(self, meta: dict) -> list[str]:
        """What the preparation did that its user would not expect (:func:`~data_modules.prepare.lopsided`)."""
        from data_modules.prepare import lopsided

        return lopsided(meta, self.hparams.warn_no_history, self.hparams.warn_future_share)

    @property
    def prepared_dir(self) -> Path:
        return Path(self.hparams.cache_dir) / "prepared" / f"{self.hparams.dataset}-{self.prepare_config().key()}"

    def prepare_data(self, ranks: Ranks | None = None) -> dict:
        """Prepare once (validation, windows, texts, Arrow); reuse a valid cache.

        ``ranks``: the processes that share the work (``foundv2 data`` under torchrun or srun,
        :meth:`Ranks.from_env`); every one of them calls this. Lightning's own call (on one process
        per node) prepares alone.
        """
        out = self.prepared_dir
        meta = load_meta(out)
        if meta is not None:
            return meta
        from data_modules.text import build_text_encoder

        cfg = self.prepare_config()
        loader_args = {k: v for k, v in cfg.loader_args.items() if not k.startswith("_")}
        source = open_dataset(self.hparams.dataset, loader_args)
        if source.primary is not None and source.primary not in source.spec.sources:
            raise DataError(f"primary_source '{source.primary}' is not one of the declared sources "
                            f"{source.spec.sources}.")
        cfg.primary_source = source.primary
        return prepare_dataset(cfg, source, out, lambda: build_text_encoder(self.hparams.text_encoder),
                               Path(self.hparams.cache_dir) / "text", progress=self.hparams.progress, ranks=ranks)

