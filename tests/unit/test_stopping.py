"""StopSequenceMatcher over streamed deltas."""
import random

import pytest

from textgen_backend.serving.stopping import StopSequenceMatcher

pytestmark = pytest.mark.unit


def feed_all(matcher, deltas):
    """[(emitted, stop)] for each delta, then the flushed text."""
    return [matcher.feed(delta) for delta in deltas], matcher.flush()


def test_partial_match_is_held_then_released_on_mismatch():
    matcher = StopSequenceMatcher(["</end>"])
    assert matcher.feed("Hello </") == ("Hello ", None)
    assert matcher.feed("en") == ("", None)
    assert matcher.feed("x and more") == ("</enx and more", None)
    assert matcher.flush() == ""


def test_match_across_many_deltas():
    matcher = StopSequenceMatcher(["<|stop|>"])
    results, flushed = feed_all(matcher, ["ab<", "|st", "op", "|", ">tail", "more"])
    assert results == [("ab", None), ("", None), ("", None), ("", None),
                       ("<|stop|>", "<|stop|>"), ("", None)]
    assert flushed == ""


@pytest.mark.parametrize("include, emitted", [(True, "Answer: 42\n\n"), (False, "Answer: 42")])
def test_include_or_exclude_the_stop_sequence(include, emitted):
    matcher = StopSequenceMatcher(["\n\n"], include_stop_sequence=include)
    results, flushed = feed_all(matcher, ["Answer: 4", "2\n", "\nQuestion: next", "?"])
    assert "".join(text for text, _ in results) == emitted
    assert [stop for _, stop in results] == [None, None, "\n\n", None]
    assert flushed == ""


@pytest.mark.parametrize("stops", [["STOP", "END"], ["END", "STOP"]])
def test_earliest_match_in_the_text_wins_whatever_the_list_order(stops):
    matcher = StopSequenceMatcher(stops)
    assert matcher.feed("xx END yy STOP zz") == ("xx END", "END")


@pytest.mark.parametrize("include, emitted", [(True, "xab"), (False, "x")])
def test_overlapping_prefixes_the_shorter_ends_first(include, emitted):
    matcher = StopSequenceMatcher(["abc", "ab"], include_stop_sequence=include)
    assert matcher.feed("xa") == ("x", None)
    assert matcher.feed("bc") == (emitted[1:], "ab")


def test_on_a_tie_the_longer_match_wins():
    # "abc" and "bc" both end at the same character: "abc" starts first.
    matcher = StopSequenceMatcher(["bc", "abc"], include_stop_sequence=False)
    assert matcher.feed("zab") == ("z", None)
    assert matcher.feed("cd") == ("", "abc")


def test_can_stop_false_emits_everything_and_matches_nothing():
    matcher = StopSequenceMatcher(["STOP"])
    assert matcher.feed("a ST") == ("a ", None)
    assert matcher.feed("OP b", can_stop=False) == ("STOP b", None)
    assert matcher.feed("STO", can_stop=False) == ("STO", None)
    # Text already emitted is never matched again; new text still is.
    assert matcher.feed("P c") == ("P c", None)
    assert matcher.feed(" STOP d") == (" STOP", "STOP")


def test_flush_releases_the_held_back_text():
    matcher = StopSequenceMatcher(["end of text"])
    assert matcher.feed("this is the end of") == ("this is the ", None)
    assert matcher.flush() == "end of"
    assert matcher.flush() == ""


def test_unicode_stop_sequences():
    matcher = StopSequenceMatcher(["。", "👋🏽"], include_stop_sequence=False)
    assert matcher.feed("Bye 👋") == ("Bye ", None)
    assert matcher.feed("🏽 then。") == ("", "👋🏽")


def test_no_stop_sequences_pass_everything_through():
    matcher = StopSequenceMatcher([])
    assert matcher.feed("anything at all") == ("anything at all", None)
    assert matcher.flush() == ""


def test_empty_stop_sequence_is_rejected():
    with pytest.raises(ValueError, match="empty string"):
        StopSequenceMatcher(["ok", ""])


def reference(text, stops, include):
    """The first prefix of text that ends with a stop sequence (longest stop on a tie)."""
    for end in range(1, len(text) + 1):
        for stop in sorted(stops, key=len, reverse=True):
            if text[:end].endswith(stop):
                return (text[:end] if include else text[:end - len(stop)]), stop
    return text, None


@pytest.mark.parametrize("include", [True, False])
def test_random_splits_agree_with_the_reference(include):
    rng = random.Random(1234)
    stops = ["ab", "abc", "bca", "cc", "abab"]
    for _ in range(500):
        text = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 30)))
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        deltas = [text[i:j] for i, j in zip([0] + cuts, cuts + [len(text)])]
        results, flushed = feed_all(StopSequenceMatcher(stops, include), deltas)
        emitted = "".join(chunk for chunk, _ in results) + flushed
        matched = [stop for _, stop in results if stop is not None]
        expected_text, expected_stop = reference(text, stops, include)
        assert (emitted, matched) == (expected_text, [expected_stop] if expected_stop else [])
