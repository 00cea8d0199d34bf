"""POST /v1/chat/completions (http-api §1.1): `chat.completion` bodies and
`chat.completion.chunk` streams with a role delta first; chat logprobs (`logprobs.content`);
tool calls (http-api §1.7) read out of the text with the chat template's tool syntax, as
`message.tool_calls` or streamed `delta.tool_calls`, finish_reason "tool_calls"; thinking
(templates that mark it with `<think>`, engine/reasoning.py) as `message.reasoning_content` or
streamed `delta.reasoning_content`, apart from the content."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import AnswerReader, Dialect
from bitnetd_trio.api.dialects.openai_common import (
    OpenAIStream,
    chunk_identity,
    finish_reason,
    whole_body,
)
from bitnetd_trio.api.json_body import Fields, invalid
from bitnetd_trio.api.logprobs import chat_content, chat_logprobs
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.response_format import parse_response_format
from bitnetd_trio.api.schema import (
    INT32_MAX,
    MAX_STOP,
    MAX_TOP_LOGPROBS_CHAT,
    GenerationRequest,
    SchemaDefaults,
    parse_grammar_constraint,
    parse_messages,
    parse_model,
    parse_n,
    parse_openai_common,
    parse_reasoning_effort,
    parse_template_kwargs,
)
from bitnetd_trio.api.sse import ChatChunks, sse_event
from bitnetd_trio.api.tools import call_id, message_tool_calls, parse_tools

__all__ = ["OpenAIChat", "parse_chat_completion"]


def _chat_finish_reason(choice: Choice, called: bool) -> str:
    reason = finish_reason(choice)
    return "tool_calls" if called and reason == "stop" else reason


class OpenAIChat(Dialect):
    """The OpenAI chat completions dialect."""

    name = "chat"
    id_prefix = "chatcmpl-"
    logprob_format = "openai-chat"

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_chat_completion(body, defaults)

    def whole(self, reply: Reply) -> dict:
        logprobs = reply.request.logprobs
        choices = []
        for c in reply.choices:
            reader = AnswerReader(reply)
            events = reader.read("".join(c.text))
            content = "".join(e[1] for e in events if e[0] == "content")
            # `refusal` is required by OpenAI's schema (nullable); this server never refuses.
            message: dict = {"role": "assistant", "content": content, "refusal": None}
            if reader.splitter is not None:
                message["reasoning_content"] = reader.reasoning
            if reader.calls:
                message["content"] = content or None
                message["tool_calls"] = message_tool_calls(reader.calls)
            choices.append(
                {
                    "index": c.index,
                    "message": message,
                    "logprobs": chat_logprobs(chat_content(c.tokens, reply.token_bytes))
                    if logprobs
                    else None,
                    "finish_reason": _chat_finish_reason(c, bool(reader.calls)),
                }
            )
        return whole_body(reply, "chat.completion", choices)

    def stream(self, reply: Reply) -> _ChatStream:
        return _ChatStream(reply)


class _ChatStream(OpenAIStream):
    def __init__(self, reply: Reply) -> None:
        self.chat = ChatChunks(*chunk_identity(reply))
        super().__init__(reply, self.chat)
        readers = {c.index: AnswerReader(reply) for c in reply.choices}
        # plain text goes out as generated (OpenAIStream); thinking and tool calls are read
        self.readers = {i: r for i, r in readers.items() if not r.plain}

    def opening(self) -> bytes:
        # Every choice starts with its role delta, before any content (http-api §1.5).
        return b"".join(sse_event(self.chat.role(c.index)) for c in self.reply.choices)

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        lps = None
        if self.reply.request.logprobs:
            lps = chat_content(piece.tokens, self.reply.token_bytes)
        reader = self.readers.get(choice.index)
        if reader is None:
            return sse_event(self.chat.content(choice.index, piece.text, lps))
        return self._events(choice, reader.feed(piece.text), lps)

    def _events(self, choice: Choice, events: list[tuple], lps: list | None) -> bytes:
        """Deltas of the reader's events; the piece's logprobs go with the first reasoning or
        content delta (on an empty content delta when the piece's text was held back or
        went into tool calls)."""
        out = bytearray()
        i = choice.index
        for ev in events:
            if ev[0] == "reasoning":
                out += sse_event(self.chat.reasoning(i, ev[1], lps))
                lps = None
            elif ev[0] == "content":
                out += sse_event(self.chat.content(i, ev[1], lps))
                lps = None
            elif ev[0] == "call":
                out += sse_event(self.chat.tool_call(i, ev[1], call_id=call_id(), name=ev[2]))
            else:
                out += sse_event(self.chat.tool_call(i, ev[1], arguments=ev[2]))
        if lps:
            out += sse_event(self.chat.content(i, "", lps))
        return bytes(out)

    def finish(self, choice: Choice, last: Piece) -> bytes:
        reader = self.readers.get(choice.index)
        if reader is None:
            return super().finish(choice, last)
        out = self.piece(choice, last) + self._events(choice, reader.finish(), None)
        reason = _chat_finish_reason(choice, bool(reader.calls))
        return out + sse_event(self.chat.finish(choice.index, reason))


# ---- the request -------------------------------------------------------------------------------


def parse_chat_completion(d: dict, defaults: SchemaDefaults | None = None) -> GenerationRequest:
    """POST /v1/chat/completions."""
    defaults = defaults or SchemaDefaults()
    f = Fields(d)
    model = parse_model(f, defaults)
    messages = parse_messages(d)
    tools = parse_tools(d, defaults.max_grammar_size)
    constraint = parse_grammar_constraint(d, defaults) or parse_response_format(
        d.get("response_format"), defaults.max_grammar_size
    )
    if constraint is not None and tools is not None and tools.calls_possible:
        raise invalid(constraint.param, "cannot be combined with tools (unless tool_choice is "
                                        "'none')")

    # max_completion_tokens replaces the deprecated max_tokens; the newer name wins.
    name = "max_completion_tokens" if f.present("max_completion_tokens") else "max_tokens"
    max_tokens = f.int(name, 1, INT32_MAX, defaults.max_tokens_default)

    logprobs = f.bool("logprobs")
    top_logprobs = f.int("top_logprobs", 0, MAX_TOP_LOGPROBS_CHAT, 0)
    if top_logprobs and not logprobs:
        raise invalid("top_logprobs", "requires 'logprobs' to be true")

    return GenerationRequest(
        endpoint="chat",
        model=model,
        messages=messages,
        max_tokens=max_tokens,
        n=parse_n(f, defaults),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        constraint=constraint,
        tools=tools,
        template_kwargs=parse_template_kwargs(
            d, parse_reasoning_effort(d.get("reasoning_effort"))
        ),
        **parse_openai_common(f, defaults, max_tokens, MAX_STOP),
    )
