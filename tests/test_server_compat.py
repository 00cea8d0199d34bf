"""Client compatibility against the real server: the model's names and what is shown of its file
(http-api §1.3), OpenAI's required `refusal` fields (§1.1, §1.5), and the vLLM tokenizer
endpoints lm-evaluation-harness's remote tokenizer uses (§2.4)."""

from __future__ import annotations

import json

import httpx
import jinja2
import openai.types.chat as openai_chat
from conftest import running_server, server_config

ALIAS = "my-bitnet"


async def test_the_model_is_listed_once_and_answers_to_its_id_alias_and_stem(server_model_path):
    config = server_config(server_model_path, model_alias=ALIAS)
    async with running_server(config) as srv, httpx.AsyncClient(base_url=srv.url) as c:
        data = (await c.get("/v1/models")).json()["data"]
        assert [card["id"] for card in data] == ["server.gguf"]
        assert data[0]["aliases"] == [ALIAS, "server"]
        for name in ("server.gguf", ALIAS, "server"):
            r = await c.post("/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 1})
            assert r.status_code == 200, (name, r.text)
            assert (await c.get(f"/v1/models/{name}")).status_code == 200
        # The file's path is not a model name: the host's layout is not part of the API.
        for name in (str(server_model_path), str(server_model_path.with_suffix(""))):
            r = await c.post("/v1/completions", json={"model": name, "prompt": "a", "max_tokens": 1})
            assert r.status_code == 404, name
            assert r.json()["error"]["code"] == "model_not_found"


async def test_the_model_file_is_shown_by_name_unless_the_operator_exposes_its_path(
    server_model_path,
):
    for expose, shown in ((False, "server.gguf"), (True, str(server_model_path))):
        config = server_config(server_model_path, model_expose_path=expose)
        async with running_server(config) as srv, httpx.AsyncClient(base_url=srv.url) as c:
            assert (await c.get("/props")).json()["model_path"] == shown
            assert (await c.get("/model_info")).json()["model_path"] == shown
            assert (await c.get("/v1/models")).json()["data"][0]["meta"]["path"] == shown


def test_expose_path_is_a_model_key_defaulting_to_false(tmp_path, server_model_path):
    from bitnetd_trio.config import Config, load_config

    assert Config().model.expose_path is False
    conf = tmp_path / "bitnetd.conf"
    conf.write_text(f"[model]\npath = {server_model_path}\nexpose_path = yes\n")
    assert load_config(str(conf)).model.expose_path is True


def _set_fields(model) -> set[str]:
    return set(model.model_fields_set)


async def test_chat_bodies_and_chunks_carry_the_refusal_fields_openai_requires(server):
    """OpenAI's schema requires `message.refusal` and `logprobs.refusal` (nullable); the SDK's
    types name them, and `model_fields_set` shows whether the server sent them."""
    request = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
               "logprobs": True, "top_logprobs": 1, "temperature": 0}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        body = (await c.post("/v1/chat/completions", json=request)).json()
        completion = openai_chat.ChatCompletion.model_validate(body)
        (choice,) = completion.choices
        assert {"role", "content", "refusal"} <= _set_fields(choice.message)
        assert choice.message.refusal is None
        assert {"content", "refusal"} <= _set_fields(choice.logprobs)
        assert choice.logprobs.refusal is None and choice.logprobs.content

        async with c.stream("POST", "/v1/chat/completions",
                            json={**request, "stream": True}) as r:
            events = [line[6:] async for line in r.aiter_lines() if line.startswith("data: ")]
    chunks = [openai_chat.ChatCompletionChunk.model_validate(json.loads(e))
              for e in events if e != "[DONE]"]
    role = chunks[0].choices[0]
    assert role.delta.role == "assistant" and "refusal" in _set_fields(role.delta)
    with_logprobs = [ch.choices[0].logprobs for ch in chunks if ch.choices[0].logprobs]
    assert with_logprobs
    for lp in with_logprobs:
        assert {"content", "refusal"} <= _set_fields(lp) and lp.refusal is None


async def test_lm_eval_remote_tokenizer_round_trip(server):
    """What lm-evaluation-harness's `tokenizer_backend=remote` does: read /tokenizer_info,
    find the EOS id by tokenizing its text in vLLM's spelling, decode reading `prompt`, and
    render chats itself with the served chat template."""
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        r = await c.get("/tokenizer_info")
        assert r.status_code == 200
        info = r.json()
        props = (await c.get("/props")).json()
        assert info["tokenizer_class"]
        assert info["eos_token"] == props["eos_token"] and info["bos_token"] == props["bos_token"]
        assert info["model_max_length"] == props["default_generation_settings"]["n_ctx"]

        def tokenize(**fields):
            return c.post("/tokenize", json=fields)

        eos = (await tokenize(prompt=info["eos_token"], add_special_tokens=False)).json()
        llama_eos = (await tokenize(content=info["eos_token"])).json()
        assert eos["tokens"] == llama_eos["tokens"] and len(eos["tokens"]) == 1
        assert eos["count"] == 1

        plain = (await tokenize(prompt="hello world", add_special_tokens=False)).json()["tokens"]
        with_bos = (await tokenize(prompt="hello world")).json()["tokens"]  # vLLM: BOS default
        assert with_bos[1:] == plain and len(with_bos) == len(plain) + 1
        assert (await tokenize(content="hello world")).json()["tokens"] == plain
        r = await c.post("/detokenize", json={"tokens": plain})
        assert r.json()["prompt"] == r.json()["content"] == "hello world"

        r = await tokenize(content="a", prompt="a")
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        r = await tokenize(prompt="a", add_special=True, add_special_tokens=True)
        assert r.status_code == 400 and r.json()["error"]["param"] == "add_special_tokens"

        messages = [{"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi {{ there }}"}]
        template = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(
            info["chat_template"])
        for add_generation_prompt in (True, False):
            served = (await c.post("/apply-template", json={
                "messages": messages, "add_generation_prompt": add_generation_prompt,
            })).json()["prompt"]
            assert template.render(messages=messages,
                                   add_generation_prompt=add_generation_prompt) == served
