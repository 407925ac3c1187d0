"""Text stop sequences over streamed text deltas."""
from __future__ import annotations

from collections.abc import Sequence


class StopSequenceMatcher:
    """Finds stop sequences in streamed text and tells which text is safe to emit.

    The longest suffix of the unemitted text that is a prefix of some stop sequence is held back
    until the text completes it or moves past it, so a partial stop sequence is never emitted.
    On a match the emitted text ends right after the stop sequence (include_stop_sequence=True,
    the TGI/TGIS default) or right before it, and nothing after it is ever emitted. The match
    that ends first wins (on a tie, the longer one): the outcome is the same however the text is
    split into deltas.
    """

    def __init__(self, stop_sequences: Sequence[str], include_stop_sequence: bool = True):
        if any(not stop for stop in stop_sequences):
            raise ValueError(f"stop_sequences must not contain an empty string: {list(stop_sequences)!r}")
        self._stops = tuple(dict.fromkeys(stop_sequences))
        self._include = include_stop_sequence
        self._partials = frozenset(stop[:n] for stop in self._stops for n in range(1, len(stop)))
        self._max_partial_len = max(map(len, self._stops), default=1) - 1
        # Invariant: the unemitted text is a held partial stop sequence, at most
        # _max_partial_len characters, so each feed looks back no further than that.
        self._pending = ""
        self._stopped = False

    def feed(self, delta: str, can_stop: bool = True) -> tuple[str, str | None]:
        """Adds a delta; returns (text safe to emit now, matched stop sequence or None).

        can_stop=False (min_tokens not reached yet): no matching, everything pending is emitted.
        After a match, feed returns ("", None) and flush "".
        """
        if self._stopped:
            return "", None
        text = self._pending + delta
        self._pending = ""
        if not can_stop:
            return text, None
        match = self._earliest_match(text)
        if match is not None:
            stop, end = match
            self._stopped = True
            return text[:end if self._include else end - len(stop)], stop
        held = self._held_len(text)
        self._pending = text[len(text) - held:]
        return text[:len(text) - held], None

    def flush(self) -> str:
        """At the end of generation without a match: the held-back text."""
        text, self._pending = self._pending, ""
        return text

    def _earliest_match(self, text: str) -> tuple[str, int] | None:
        """(stop sequence, end index) of the match that ends first in text, or None."""
        best = None
        for stop in self._stops:
            start = text.find(stop)
            if start < 0:
                continue
            end = start + len(stop)
            if best is None or end < best[1] or (end == best[1] and len(stop) > len(best[0])):
                best = (stop, end)
        return best

    def _held_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop sequence."""
        for n in range(min(len(text), self._max_partial_len), 0, -1):
            if text[-n:] in self._partials:
                return n
        return 0
