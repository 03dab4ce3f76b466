"""The batch contract: what :class:`UserDataModule` hands each stage.

Batch kinds, all dicts of tensors, user-level (a user's windows stay together); the
DataModule picks one in ``setup`` from ``datamodule.BATCH_KINDS`` (kind → dataset, collate):

**Event batch** (kind ``events``, ``EventCollate``; stage 1 and the pooled extractor read it). B users,
E = the most history events of a user in the batch (after the ``max_events`` cap, which keeps
the *latest* events), W = the most windows, d = text-embedding width, F = tabular width::

    user_id      [B]        int64
    row          [B]        int64   the user's row in the prepared table
    split        [B]        int64   ``store.Split``: 0 train, 1 val, 2 test
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
    ref_day      [B]        int64   the data set's reference day (days since the epoch: the first
                                    day of the training users' history), the same for every user
    win_day      [B, W]     int64   each window's first day, days since ``ref_day`` (0 on padding)
    win_calendar [B, W, 2]  float32 absolute time per window (``prepare.window_calendar``): its
                                    position in the data set's calendar and the user's tenure at
                                    it, in units of the calendar span; zeros on padding and where
                                    the data has no calendar time. Models read it when
                                    ``UserDataModule.dims()['calendar_dim']`` is 2
    tabular      [B, F]     float32 standardised profile inputs (F may be 0)
    fut_item     [B, Ef]    int64   future items (0 = padding); used by probes, never by stages
    fut_text_emb [B, d]     float32 embedding of the templated future summary (zeros if none)
    has_fut_text [B]        bool    True only for *training* users: no val/test future leaks
    label/<name> [B] int64, or [B, C] float32 for multilabel

**Slice batch** (kind ``slices``, ``SliceCollate``, from ``features_dir``; the tokenizer reads
it): N = all (user, window, source) slices of the B users in the batch, flattened, D = feature
width::

    user_id      [B]  int64
    row          [B]  int64
    split        [B]  int64
    slice_user   [N]  int64   row in the batch of the slice's user
    slice_window [N]  int64   window number from the user's oldest kept window
    slice_source [N]  int64   source index (the profile source, if any, is the last index)
    slice_key    [N]  int64   the window key the prepared data assigned (``win_key`` of that
                              window); -1 for the profile slice
    feat         [N, D] float32

Every stage output (features, tokens) keeps ``user_id, row, split`` per user and
``slice_window, slice_source, slice_key`` per slice, so the next stage's batches carry them on.
"""
