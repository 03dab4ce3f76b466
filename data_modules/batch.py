"""The batch contract: what :class:`UserDataModule` hands each stage.

Two batch kinds, both dicts of tensors, user-level (a user's windows stay together):

**Event batch** (``collate_events``; stage 1 and the pooled extractor read it). B users,
E = the most history events of a user in the batch (after the ``max_events`` cap, which keeps
the *latest* events), W = the most windows, d = text-embedding width, F = tabular width::

    user_id      [B]        int64
    split        [B]        int64   0 train, 1 val, 2 test
    ev_source    [B, E]     int64   source index into DatasetSpec.sources (0 on padding)
    ev_item      [B, E]     int64   global item index, 1..num_items; 0 = no item / padding
    ev_text      [B, E]     int64   row of the text table; -1 = no text / padding
    ev_text_emb  [B, E, d]  float32 the text embedding of that row (zeros where none)
    ev_value     [B, E]     float32
    ev_time      [B, E]     int64   seconds
    ev_category  [B, E]     int64   index into DatasetSpec.categories; -1 = none
    ev_window    [B, E]     int64   window ordinal 0..n_windows-1 (0 on padding)
    ev_mask      [B, E]     bool    True on real events
    win_key      [B, W]     int64   calendar key of each window (day or week number, or the
                                    event-chunk number); windows k apart in key are periodic
                                    partners when k is the data set's ``window_period``
    win_mask     [B, W]     bool
    tabular      [B, F]     float32 standardised profile inputs (F may be 0)
    fut_item     [B, Ef]    int64   future items (0 = padding); used by probes, never by stages
    fut_text_emb [B, d]     float32 embedding of the templated future summary (zeros if none)
    has_fut_text [B]        bool    True only for *training* users: no val/test future leaks
    label/<name> [B] int64, or [B, C] float32 for multilabel

**Slice batch** (``collate_slices``; the tokenizer reads it): N = all (user, window, source)
slices of the B users in the batch, flattened, D = feature width::

    user_id      [B]  int64
    slice_user   [N]  int64   row in the batch of the slice's user
    slice_window [N]  int64
    slice_source [N]  int64   source index (the profile source, if any, is the last index)
    feat         [N, D] float32
"""

from __future__ import annotations

SPLIT_NAMES = ("train", "val", "test")
