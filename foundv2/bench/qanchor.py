"""The bench's Query-as-Anchor rows: for a trained :class:`~foundv2.stages.qanchor.QAnchorStage`
(a checkpoint, or the ``model`` folder of a pipeline ``qanchor`` step) three representations,
each task probed on its own features:

- ``<name>``: base, each task's own query (:func:`task_query`);
- ``<name>_tuned``: the task's query with its scenario prompt (``QAnchorStage.tune_scenario``:
  ``prompt_tokens`` learned tokens after the query and one prototype per class, trained on the
  *training* users' labels with everything else frozen; saved alone per task under
  ``<output_dir>/prompts/<name>/<task>``). A task without classes (multi-label, ranking) has no
  prototypes to tune: it gets the base features, and the bench notes say so;
- ``<name>_noquery``: the ablation, one embedding with an empty query for every task.

Every user is embedded for all these queries in one cached pass per batch (the prefix encoded
once). Storage: with the token prefix, the user's tokens (the model's weights are shared by all
users, as for stage 3); with the soft prefix, the embedding itself (float32 × emb_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_modules.schema import DataError
from data_modules.store import Split

CHECKPOINT_NAME = "stage.ckpt"  # the checkpoint inside a qanchor step's model folder
#: the query a task is asked with, by task name (``bench.qanchor_queries`` overrides or adds)
TASK_QUERIES = {
    "gender": "Is this user a woman or a man?",
    "age": "How old is this user?",
    "occupation": "What is this user's occupation?",
    "future_genres": "Which genres will this user watch next?",
    "future_categories": "Which categories will this user choose next?",
    "next_items": "Which items will this user choose next?",
    "segment": "What kind of user is this?",
    "churn": "Will this user stop being active?",
    "spender": "How much does this user spend?",
}
TUNABLE = ("binary", "multiclass")  # task kinds with classes to put prototypes on


def task_query(task: str, queries: dict[str, str] | None = None) -> str:
    """The query of a task: ``queries[task]``, else :data:`TASK_QUERIES`, else a question made
    from the task's name."""
    given = {**TASK_QUERIES, **(queries or {})}
    return given.get(task, f"What is this user's {task.replace('_', ' ')}?")


def checkpoint_path(given: str | Path) -> Path:
    """A QAnchorStage checkpoint, or a qanchor step's model folder holding one."""
    path = Path(given)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise DataError(f"{given}: no Q-Anchor checkpoint there; give a QAnchorStage checkpoint (.ckpt) or the "
                        f"model folder of a pipeline qanchor step (with {CHECKPOINT_NAME}).")
    return path


@dataclass
class QAnchorRows:
    """The features of one checkpoint's three rows, built on first use (one embedding pass)."""

    name: str
    checkpoint: str
    dm: object  # the bench's UserDataModule (event batches)
    tasks: list  # the bench's Task list
    output_dir: Path
    tokens_dir: str | None = None
    queries: dict[str, str] | None = None
    tune_steps: int = 300
    prompt_tokens: int = 6
    seed: int = 0
    features: dict = field(default_factory=dict)  # row name → task → [U, emb_dim]
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        from foundv2.stages.qanchor import QAnchorStage

        self.path = checkpoint_path(self.checkpoint)
        self.stage = QAnchorStage.load_from_checkpoint(self.path, map_location="cpu").eval()
        self.prefix = self.stage.hparams.prefix
        if self.prefix == "tokens" and not self.tokens_dir:
            raise DataError(f"{self.path}: a Q-Anchor model with the token prefix reads the users' tokens: give "
                            "bench.tokens_dir (the tokens dataset it was trained on).")

    @property
    def row_names(self) -> list[str]:
        return [self.name, f"{self.name}_tuned", f"{self.name}_noquery"]

    def bytes_per_user(self, token_bytes: float | None) -> tuple[float | None, str, str]:
        """(bytes, row kind, storage text) of these rows."""
        if self.prefix == "tokens":
            return token_bytes, "tokens", "the tokens as stored (the model's weights are shared by all users)"
        return None, "representation", "float32 × emb_dim"

    def _datamodule(self):
        if self.prefix != "tokens":
            return self.dm
        from data_modules.datamodule import UserDataModule

        hp = {k: v for k, v in dict(self.dm.hparams).items() if k != "questions"}
        dm = UserDataModule(**{**hp, "tokens_dir": self.tokens_dir})
        dm.prepare_data()
        dm.setup("predict")
        return dm

    def build(self) -> dict:
        if self.features:
            return self.features
        dm = self._datamodule()
        labelled = [t for t in self.tasks if t.y is not None]
        tuned = {}
        for t in labelled:
            if t.kind not in TUNABLE:
                continue
            classes = [str(c) for c in range(int(t.y.max()) + 1)]
            y = np.where(dm.split == Split.TRAIN, t.y, -1)  # only training users' labels reach the prompt
            scen = self.stage.tune_scenario(dm.predict_dataloader(), y, task_query(t.name, self.queries), classes,
                                            name=t.name, n_tokens=self.prompt_tokens, steps=self.tune_steps,
                                            seed=self.seed)
            scen.save(self.output_dir / "prompts" / self.name / t.name)
            tuned[t.name] = scen
        untuned = [t.name for t in self.tasks if t.name not in tuned]
        if untuned:
            self.notes.append(f"{self.name}_tuned: {', '.join(untuned)} have no classes to tune prototypes on; "
                              "their features are the base query's.")
        names = [t.name for t in self.tasks]
        queries = [task_query(n, self.queries) for n in names] + [""] + [tuned[n].query for n in tuned]
        prompts = [None] * (len(names) + 1) + list(tuned.values())
        n_rows = len(dm.split)
        out = np.zeros((n_rows, len(queries), self.stage.head_config.emb_dim), np.float32)
        import torch

        with torch.no_grad():
            for batch in dm.predict_dataloader():
                out[batch["row"].numpy()] = self.stage.embed_users(batch, queries, prompts).float().numpy()
        base = {n: out[:, i] for i, n in enumerate(names)}
        noquery = out[:, len(names)]
        tuned_x = {n: out[:, len(names) + 1 + i] for i, n in enumerate(tuned)}
        self.features = {self.name: base, f"{self.name}_noquery": {n: noquery for n in names},
                         f"{self.name}_tuned": {n: tuned_x.get(n, base[n]) for n in names}}
        return self.features
