"""The token-counting endpoints (http-api §4.2, §5.2): a request of a chat-shaped API in,
the number of prompt tokens its conversation makes with the served model's chat template out.
Nothing is generated and no slot is used; a conversation longer than the context is counted
all the same (counting is how a client finds out that it is too long)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import Request
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults
from bitnetd_trio.api.serving import ServingApp
from bitnetd_trio.engine.chat import ChatTemplateError
from bitnetd_trio.engine.inference import InferenceThread

__all__ = ["conversation_tokens", "counting_handler"]

Parse = Callable[[dict, SchemaDefaults], GenerationRequest]


def conversation_tokens(engine: InferenceThread, g: GenerationRequest) -> int:
    """How many tokens the prompt of `g`'s messages is (chat template applied, with the
    request's tool definitions, as generation renders them)."""
    tools = g.tools.tools if g.tools is not None else None
    try:
        return len(
            engine.chat_template.render_tokens(
                g.messages or [], engine.tokenizer, tools=tools, extra=g.template_kwargs
            )
        )
    except ChatTemplateError as exc:
        raise ApiError(
            400, f"the chat template failed on these messages: {exc}", param="messages"
        ) from None


def counting_handler(
    parse: Parse, answer: Callable[[int], dict]
) -> Callable[[ServingApp, Request], Awaitable[None]]:
    """A route handler: validate with `parse`, count, answer `answer(count)`."""

    async def handle(app: ServingApp, req: Request) -> None:
        engine = app.require_engine()
        defaults = app.schema_defaults(engine)

        def count() -> int:
            return conversation_tokens(engine, parse(req.json(), defaults))

        # a long conversation is request-sized CPU work: off the Trio thread, as generation's
        n = await app.cpu.run(len(req.body), count)
        await req.resp.send_json(200, answer(n))

    return handle
