"""streaming.py: stop-string matching across token boundaries, SSE framing, chunk shapes."""

from __future__ import annotations

import json
import random

import pytest

from bitnetd_trio.streaming import (
    SSE_DONE,
    ChatChunks,
    CompletionChunks,
    StopMatcher,
    chat_logprob_entry,
    sse_event,
    token_text,
    usage_object,
)


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


def test_sse_event_framing_and_utf8() -> None:
    ev = sse_event({"t": "héllo ✓"})
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n")
    assert json.loads(ev[6:-2]) == {"t": "héllo ✓"}
    assert "✓".encode() in ev  # sent as UTF-8, not \\u escapes
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_chat_chunks_share_id_and_created() -> None:
    c = ChatChunks("chatcmpl-1", 123, "m", "fp", include_usage=True)
    chunks = [c.role(0), c.content(0, "hi"), c.finish(0, "stop"), c.usage(usage_object(3, 2))]
    assert {ch["id"] for ch in chunks} == {"chatcmpl-1"}
    assert {ch["created"] for ch in chunks} == {123}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[1]["choices"][0]["delta"] == {"content": "hi"}
    assert chunks[2]["choices"][0]["delta"] == {}
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert all(ch["usage"] is None for ch in chunks[:3])
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 5
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)


def test_chat_chunks_without_usage_have_no_usage_key() -> None:
    c = ChatChunks("x", 1, "m", "fp", include_usage=False)
    assert "usage" not in c.content(0, "a")


def test_completion_chunks_shape() -> None:
    c = CompletionChunks("cmpl-1", 5, "m", "fp", include_usage=False)
    ch = c.text(1, "abc")
    assert ch["object"] == "text_completion"
    assert ch["choices"] == [{"index": 1, "text": "abc", "logprobs": None, "finish_reason": None}]
    assert c.finish(1, "length")["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"abc", "abc"), ("é".encode(), "é"), (b"\xc3", "bytes:\\xc3")],
)
def test_token_text(data: bytes, expected: str) -> None:
    assert token_text(data) == expected


def test_chat_logprob_entry() -> None:
    e = chat_logprob_entry(b" hi", -0.5, [(b" hi", -0.5), (b"\xe2", -2.0)])
    assert e == {
        "token": " hi",
        "logprob": -0.5,
        "bytes": [32, 104, 105],
        "top_logprobs": [
            {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105]},
            {"token": "bytes:\\xe2", "logprob": -2.0, "bytes": [226]},
        ],
    }
