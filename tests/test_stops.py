"""engine/stops.py: stop-string matching across token boundaries."""

from __future__ import annotations

import random

from bitnetd_trio.engine.stops import StopMatcher


def run_matcher(stops: list[str], pieces: list[str]) -> tuple[list[str], bool]:
    """Feed pieces; return what was emitted per push (plus the flush) and whether it hit."""
    m = StopMatcher(stops)
    out = []
    for p in pieces:
        emit, hit = m.push(p)
        out.append(emit)
        if hit:
            return out, True
    out.append(m.flush())
    return out, False


def test_no_stops_passes_text_through() -> None:
    out, hit = run_matcher([], ["a", "b", "c"])
    assert out == ["a", "b", "c", ""] and not hit


def test_stop_inside_one_piece_cuts_before_it() -> None:
    out, hit = run_matcher(["END"], ["hello END world"])
    assert hit and out == ["hello "]


def test_stop_split_over_three_pieces_is_withheld_then_dropped() -> None:
    out, hit = run_matcher(["<|stop|>"], ["Hi <|", "st", "op|> trailing"])
    assert hit
    # nothing of the stop string ever leaves the matcher
    assert out == ["Hi ", "", ""]
    assert "".join(out) == "Hi "


def test_false_start_is_released_when_disproved() -> None:
    out, hit = run_matcher(["STOP"], ["ab ST", "AR", "t"])
    assert not hit
    assert out[0] == "ab "  # "ST" held back: it could begin "STOP"
    assert "".join(out) == "ab STARt"


def test_held_prefix_released_by_flush() -> None:
    out, hit = run_matcher(["\n\n"], ["line\n"])
    assert not hit and out == ["line", "\n"]


def test_earliest_of_several_stops_wins_and_is_reported() -> None:
    m = StopMatcher(["world", "lo w"])
    emit, hit = m.push("hello world")
    assert hit and emit == "hel" and m.matched == "lo w"


def test_overlapping_prefix_candidates() -> None:
    # "aab": after "aa" both "aa" and "a" could start it
    out, hit = run_matcher(["aab"], ["xa", "a", "a", "b"])
    assert hit and "".join(out) == "xa"


def test_push_after_hit_emits_nothing() -> None:
    m = StopMatcher(["x"])
    assert m.push("ax") == ("a", True)
    assert m.push("more") == ("", True)
    assert m.flush() == ""


def test_empty_stop_strings_are_ignored() -> None:
    out, hit = run_matcher(["", "Z"], ["abc"])
    assert not hit and "".join(out) == "abc"


def test_random_splits_agree_with_whole_text() -> None:
    rng = random.Random(7)
    alphabet = "ab\n<|>é"
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30)))
        stops = [
            "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 4)))
            for _ in range(rng.randint(1, 3))
        ]
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(0, 6))))
        pieces, last = [], 0
        for c in cuts + [len(text)]:
            pieces.append(text[last:c])
            last = c
        out, hit = run_matcher(stops, pieces)
        found = [i for i in (text.find(s) for s in stops) if i >= 0]
        if found:
            assert hit and "".join(out) == text[: min(found)], (text, stops, pieces)
        else:
            assert not hit and "".join(out) == text, (text, stops, pieces)
