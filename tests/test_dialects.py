"""The endpoint dialects as plain functions, without a server: each one's whole body, stream
event sequence, finish reasons and logprob format, on hand-made replies. The shapes asserted
are those the server tests check on the wire (tests/test_server_*.py)."""

from __future__ import annotations

import json

import pytest

from bitnetd_trio.api.dialects.base import Dialect
from bitnetd_trio.api.dialects.bitnet_generate import BitNetGenerate
from bitnetd_trio.api.dialects.llamacpp_completion import LlamaCppCompletion
from bitnetd_trio.api.dialects.openai_chat import OpenAIChat
from bitnetd_trio.api.dialects.openai_completions import OpenAICompletions
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import SchemaDefaults
from bitnetd_trio.api.sse import SSE_DONE
from bitnetd_trio.engine.inference import Job, Update
from bitnetd_trio.engine.sampling import SamplingParams

VOCAB = {1: b"He", 2: b"llo", 3: b" w", 4: b"orld", 5: b"\xe2", 6: b"!"}
DEFAULTS = SchemaDefaults(n_vocab=len(VOCAB) + 1, model_ids=frozenset({"m"}))
CHAT = {"messages": [{"role": "user", "content": "hi"}]}


def reply(
    dialect: Dialect,
    body: dict,
    choices: list[Choice],
    prompts: list[list[int]] | None = None,
    prompt_texts: list[str] | None = None,
) -> Reply:
    return Reply(
        request=dialect.parse(body, DEFAULTS),
        id=dialect.id_prefix + "abc",
        created=1700000000,
        model_id="m",
        fingerprint="bitnetd-trio-test-kernel",
        prompts=prompts or [[1, 2]],
        prompt_texts=prompt_texts or ["Hello"],
        choices=choices,
        token_bytes=VOCAB.__getitem__,
    )


def done(index: int = 0, text: str = "", finish: str = "length", **fields: object) -> Choice:
    c = Choice(index, text=[text] if text else [], finish_reason=finish)
    for k, v in fields.items():
        setattr(c, k, v)
    return c


def events(data: bytes) -> list[object]:
    """The SSE events of `data`: JSON objects, or the string "[DONE]"."""
    assert data == b"" or data.endswith(b"\n\n")
    out: list[object] = []
    for block in data.decode().split("\n\n")[:-1]:
        assert block.startswith("data: "), block
        payload = block[len("data: ") :]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


# ---- OpenAI chat (http-api §1.1, §1.5) -----------------------------------------------------


def test_chat_whole_body() -> None:
    d = OpenAIChat()
    r = reply(d, {**CHAT, "n": 2}, [done(0, "Hi", "stop", n_generated=1, n_cached=1),
                                    done(1, "Ho", "cancelled", n_generated=3, n_cached=1)])
    body = d.whole(r)
    assert body == {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "system_fingerprint": "bitnetd-trio-test-kernel",
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "Hi", "refusal": None}, "logprobs": None,
             "finish_reason": "stop"},
            # cut short by a deadline or a drain: OpenAI's "length"
            {"index": 1, "message": {"role": "assistant", "content": "Ho", "refusal": None}, "logprobs": None,
             "finish_reason": "length"},
        ],
        # the prompt counts once for both choices, so does its cache hit
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6,
                  "prompt_tokens_details": {"cached_tokens": 1}},
    }


def test_chat_logprobs_format() -> None:
    d = OpenAIChat()
    assert d.logprob_format == "openai-chat"
    c = done(0, "He\ufffd", tokens=[(1, -0.5, [(1, -0.5), (5, -1.5)]), (5, -2.0, [])])
    body = d.whole(reply(d, {**CHAT, "logprobs": True, "top_logprobs": 2}, [c]))
    assert body["choices"][0]["logprobs"] == {
        "content": [
            {"token": "He", "logprob": -0.5, "bytes": [72, 101], "top_logprobs": [
                {"token": "He", "logprob": -0.5, "bytes": [72, 101]},
                {"token": "bytes:\\xe2", "logprob": -1.5, "bytes": [226]},
            ]},
            {"token": "bytes:\\xe2", "logprob": -2.0, "bytes": [226], "top_logprobs": []},
        ],
        "refusal": None,  # required by OpenAI's schema beside content
    }


def test_chat_stream_sequence_with_usage() -> None:
    d = OpenAIChat()
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    c = Choice(0)
    r = reply(d, body, [c])
    s = d.stream(r)
    out = s.opening() + s.piece(c, Piece("He")) + s.piece(c, Piece(""))
    c.text, c.n_generated, c.finish_reason = ["He", "llo"], 2, "length"
    out += s.finish(c, Piece("llo")) + s.closing()
    evs = events(out)
    assert evs[-1] == "[DONE]" and out.endswith(SSE_DONE)
    chunks = evs[:-1]
    assert all(ch["object"] == "chat.completion.chunk" and ch["id"] == "chatcmpl-abc"
               and ch["created"] == 1700000000 for ch in chunks)
    assert [ch["choices"] for ch in chunks] == [
        [{"index": 0, "delta": {"role": "assistant", "content": "", "refusal": None}, "logprobs": None,
          "finish_reason": None}],
        [{"index": 0, "delta": {"content": "He"}, "logprobs": None, "finish_reason": None}],
        # the final step's text comes before the finish chunk; an empty step sends nothing
        [{"index": 0, "delta": {"content": "llo"}, "logprobs": None, "finish_reason": None}],
        [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}],
        [],
    ]
    assert all(ch["usage"] is None for ch in chunks[:-1])
    assert chunks[-1]["usage"]["completion_tokens"] == 2


def test_chat_stream_without_usage_and_with_logprobs() -> None:
    d = OpenAIChat()
    c = Choice(0)
    s = d.stream(reply(d, {**CHAT, "stream": True, "logprobs": True}, [c]))
    # logprobs asked for: a step with tokens but no text yet (a partial character) is sent
    (ev,) = events(s.piece(c, Piece("", [(5, -1.0, [])])))
    assert "usage" not in ev
    assert ev["choices"][0]["delta"] == {"content": ""}
    assert ev["choices"][0]["logprobs"]["content"][0]["bytes"] == [226]
    c.finish_reason = "stop"
    assert events(s.finish(c, Piece()))[-1]["choices"][0]["finish_reason"] == "stop"
    assert s.closing() == SSE_DONE


def test_chat_stream_role_chunk_for_every_choice() -> None:
    d = OpenAIChat()
    s = d.stream(reply(d, {**CHAT, "n": 3, "stream": True}, [Choice(i) for i in range(3)]))
    assert [ev["choices"][0]["index"] for ev in events(s.opening())] == [0, 1, 2]


# ---- OpenAI completions (http-api §1.2, §1.5) --------------------------------------------------


def test_completions_whole_body_with_echo_and_several_prompts() -> None:
    d = OpenAICompletions()
    body = {"prompt": ["a", "b"], "n": 2, "echo": True}
    choices = [done(i, f"+{i}", "stop" if i % 2 else "length", n_generated=1) for i in range(4)]
    r = reply(d, body, choices, prompts=[[1], [2]], prompt_texts=["a", "b"])
    out = d.whole(r)
    assert out["id"] == "cmpl-abc" and out["object"] == "text_completion"
    assert [(ch["index"], ch["text"], ch["finish_reason"]) for ch in out["choices"]] == [
        (0, "a+0", "length"), (1, "a+1", "stop"), (2, "b+2", "length"), (3, "b+3", "stop")]
    assert all(ch["logprobs"] is None for ch in out["choices"])
    assert out["usage"]["prompt_tokens"] == 2 and out["usage"]["completion_tokens"] == 4


def test_completions_legacy_logprobs_with_echo() -> None:
    d = OpenAICompletions()
    assert d.logprob_format == "openai-legacy"
    c = done(0, " world", tokens=[(3, -0.1, [(3, -0.1)]), (4, -0.2, [(4, -0.2)])])
    # the prompt was not scored: its tokens come first, logprob None, no alternatives
    r = reply(d, {"prompt": "Hello", "echo": True, "logprobs": 1}, [c])
    assert d.whole(r)["choices"][0]["logprobs"] == {
        "tokens": ["He", "llo", " w", "orld"],
        "token_logprobs": [None, None, -0.1, -0.2],
        "top_logprobs": [None, None, {" w": -0.1}, {"orld": -0.2}],
        "text_offset": [0, 2, 5, 7],
    }
    # scored (max_tokens 0): the engine's prompt logprobs
    c = done(0, prompt_logprobs=[(1, None, []), (2, -3.0, [(2, -3.0)])])
    body = {"prompt": "Hello", "echo": True, "logprobs": 1, "max_tokens": 0}
    lp = d.whole(reply(d, body, [c]))["choices"][0]["logprobs"]
    assert lp["token_logprobs"] == [None, -3.0] and lp["top_logprobs"] == [None, {"llo": -3.0}]


def test_completions_stream_sequence() -> None:
    d = OpenAICompletions()
    body = {"prompt": "Hello", "echo": True, "logprobs": 0, "stream": True}
    c = Choice(0)
    s = d.stream(reply(d, body, [c]))
    out = s.opening()
    out += s.piece(c, Piece(" w", [(3, -0.1, [])], prompt_logprobs=[(1, None, []), (2, -3.0, [])]))
    c.finish_reason = "stop"
    out += s.finish(c, Piece("orld", [(4, -0.2, [])])) + s.closing()
    evs = events(out)
    assert evs[-1] == "[DONE]"
    chunks = evs[:-1]
    assert all(ch["object"] == "text_completion" and "usage" not in ch for ch in chunks)
    choices = [ch["choices"][0] for ch in chunks]
    # no role chunk: the echoed prompt first, then the text, then the finish chunk
    assert [(ch["text"], ch["finish_reason"]) for ch in choices] == [
        ("Hello", None), (" w", None), ("orld", None), ("", "stop")]
    assert choices[0]["logprobs"] is None and choices[3]["logprobs"] is None
    # the prompt's logprobs at offset 0, the generated text's after the echoed prompt
    assert choices[1]["logprobs"] == {
        "tokens": ["He", "llo", " w"],
        "token_logprobs": [None, -3.0, -0.1],
        "top_logprobs": [None, {}, {}],
        "text_offset": [0, 2, 5],
    }
    assert choices[2]["logprobs"]["text_offset"] == [7]


def test_completions_stream_usage_chunk() -> None:
    d = OpenAICompletions()
    body = {"prompt": "x", "stream": True, "stream_options": {"include_usage": True}}
    c = done(0, "y", n_generated=1)
    s = d.stream(reply(d, body, [c]))
    usage_chunk, end = events(s.closing())
    assert end == "[DONE]" and usage_chunk["choices"] == []
    assert usage_chunk["usage"]["completion_tokens"] == 1
    assert events(s.finish(c, Piece()))[0]["usage"] is None


# ---- llama.cpp /completion (http-api §3) --------------------------------------------------


@pytest.mark.parametrize(
    ("finish", "stop_type", "expected"),
    [("length", None, "limit"), ("cancelled", None, "limit"), ("stop", None, "eos"),
     ("stop", "word", "word")],
)
def test_llama_whole_body_and_stop_type(finish: str, stop_type: str | None, expected: str) -> None:
    d = LlamaCppCompletion()
    c = done(0, "Hi", finish, stop_type=stop_type, n_generated=4, n_cached=1,
             prompt_seconds=0.5, generation_seconds=2.0)
    body = d.whole(reply(d, {"prompt": "Hello", "n_predict": 4, "stop": ["x"]}, [c]))
    assert body["content"] == "Hi" and body["stop"] is True and body["id_slot"] == -1
    assert body["stop_type"] == expected and body["model"] == "m" and body["prompt"] == "Hello"
    assert (body["tokens_predicted"], body["tokens_evaluated"], body["tokens_cached"]) == (4, 2, 6)
    assert body["generation_settings"]["n_predict"] == 4
    assert body["generation_settings"]["stop"] == ["x"]
    t = body["timings"]
    assert (t["prompt_n"], t["prompt_ms"], t["predicted_n"], t["predicted_ms"]) == (1, 500, 4, 2000)
    assert (t["predicted_per_second"], t["predicted_per_token_ms"]) == (2.0, 500.0)
    assert "completion_probabilities" not in body


def test_llama_logprob_format() -> None:
    d = LlamaCppCompletion()
    assert d.logprob_format == "llama.cpp"
    c = done(0, "He", tokens=[(1, -0.5, [(1, -0.5), (2, -1.0)])])
    body = d.whole(reply(d, {"prompt": "Hello", "n_probs": 2}, [c]))
    assert body["generation_settings"]["n_predict"] == -1  # until the context is full
    assert body["completion_probabilities"] == [
        {"id": 1, "token": "He", "bytes": [72, 101], "logprob": -0.5, "top_logprobs": [
            {"id": 1, "token": "He", "bytes": [72, 101], "logprob": -0.5},
            {"id": 2, "token": "llo", "bytes": [108, 108, 111], "logprob": -1.0},
        ]}
    ]


def test_llama_stream_sequence() -> None:
    d = LlamaCppCompletion()
    c = Choice(0)
    s = d.stream(reply(d, {"prompt": "Hello", "stream": True, "n_probs": 1}, [c]))
    c.n_generated = 1
    out = s.opening() + s.piece(c, Piece("He", [(1, -0.5, [])]))
    c.n_generated, c.finish_reason = 2, "stop"
    out += s.finish(c, Piece("llo", [(2, -0.7, [])])) + s.closing()
    first, last = events(out)  # no [DONE]: llama.cpp's stream ends with the stop event
    assert {k: first[k] for k in ("content", "stop", "id_slot", "tokens_predicted",
                                  "tokens_evaluated")} == {
        "content": "He", "stop": False, "id_slot": -1, "tokens_predicted": 1,
        "tokens_evaluated": 2}
    assert [p["id"] for p in first["completion_probabilities"]] == [1]
    # the stop event carries only the last step's text and tokens
    assert last["stop"] is True and last["content"] == "llo" and last["tokens_predicted"] == 2
    assert [p["id"] for p in last["completion_probabilities"]] == [2]


# ---- /generate of the BitNet servers (http-api §3) --------------------------------------------


def test_generate_whole_and_stream() -> None:
    d = BitNetGenerate()
    assert d.logprob_format is None
    c = done(0, "Hi there", n_generated=3)
    r = reply(d, {"prompt": "Hello", "conversation_mode": False}, [c])
    assert d.whole(r) == {"generated_text": "Hi there", "tokens_generated": 3,
                          "tokens_processed": 5}
    s = d.stream(r)
    assert s.opening() == s.piece(c, Piece("Hi")) == s.closing() == b""
    assert events(s.finish(c, Piece(" there"))) == [d.whole(r)]


# ---- shared --------------------------------------------------------------------------------


def test_choice_applies_engine_updates() -> None:
    job = Job(prompt=[1], params=SamplingParams(), max_tokens=4, sink=None)
    c = Choice(0)
    c.apply(Update(job, text="He", tokens=[(1, -0.1, [])], n_generated=1))
    assert not c.done
    c.apply(Update(job, text="llo", n_generated=2, finish_reason="stop", stop_type="word",
                   stopping_word="!", n_cached=1))
    assert c.done and c.text == ["He", "llo"] and c.tokens == [(1, -0.1, [])]
    assert (c.n_generated, c.stop_type, c.stopping_word, c.n_cached) == (2, "word", "!", 1)
    piece = Piece.of(Update(job, text="x"))
    assert piece == Piece("x") and not Piece().carries_anything(True)
    assert Piece("", [(1, -0.1, [])]).carries_anything(True)
    assert not Piece("", [(1, -0.1, [])]).carries_anything(False)


def test_id_prefixes() -> None:
    assert [d.id_prefix for d in (OpenAIChat(), OpenAICompletions(), LlamaCppCompletion(),
                                  BitNetGenerate())] == ["chatcmpl-", "cmpl-", "cmpl-", "cmpl-"]
