"""N-gram (prompt lookup) drafts: the tokens that followed the most recent earlier occurrence of
a sequence's last n tokens, in its prompt or output, longest n first. Input-grounded tasks
(summaries, edits, code changes, extraction) copy long spans, which this drafts for free."""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

MAX_NGRAM = 3  # TGI's n-gram speculation and vLLM's prompt lookup both match short n-grams
_PAD = -1


def propose_ngram(histories: list[list[int]], num_drafts: int,
                  max_ngram: int = MAX_NGRAM) -> list[list[int]]:
    """Up to num_drafts tokens for each history ([] when its last tokens never occurred before).
    One vectorized search over the batch (histories right-aligned in one array), no loop over
    sequences or positions."""
    if not histories:
        return []
    width = max(len(h) for h in histories)
    tokens = np.full((len(histories), width), _PAD, dtype=np.int64)
    for row, history in enumerate(histories):  # right-aligned: the last token in the last column
        tokens[row, width - len(history):] = history
    found = np.full(len(histories), -1)        # column where the draft starts, -1: none yet
    for n in range(max_ngram, 0, -1):
        if width <= n:
            continue
        suffix = tokens[:, width - n:]
        # windows starting at 0 .. width - n - 1: every earlier occurrence, never the suffix
        windows = sliding_window_view(tokens, n, axis=1)[:, :width - n]
        hits = (windows == suffix[:, None, :]).all(axis=2) & (suffix[:, :1] != _PAD)
        last = np.where(hits.any(axis=1), width - n - 1 - np.argmax(hits[:, ::-1], axis=1), -1)
        take = (found < 0) & (last >= 0)
        found[take] = last[take] + n
    drafts = []
    for row, start in enumerate(found.tolist()):
        drafts.append(tokens[row, start:start + num_drafts].tolist() if start >= 0 else [])
    return drafts
