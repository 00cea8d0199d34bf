"""What load balancers and Kubernetes inference gateways read from a replica, against a live
server: /health/live (liveness), /health/ready and /health (readiness, 503 while draining), and
the vLLM-named metrics (`vllm:num_requests_waiting`, ...) equal to our own under load."""

from __future__ import annotations

import httpx
import trio
from conftest import running_server, server_config
from prometheus_client.parser import text_string_to_metric_families

# vLLM's name -> ours (the counters' samples carry the `_total` suffix in both)
PAIRS = {
    "vllm:num_requests_waiting": "bitnetd_requests_waiting",
    "vllm:num_requests_running": "bitnetd_requests_running",
    "vllm:kv_cache_usage_perc": "bitnetd_kv_cache_usage_ratio",
    "vllm:prefix_cache_queries_total": "bitnetd_prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total": "bitnetd_prefix_cache_hits_total",
}


def samples(text: str) -> dict[str, tuple[dict, float]]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = (s.labels, s.value)
    return out


async def scrape(c: httpx.AsyncClient) -> dict[str, tuple[dict, float]]:
    r = await c.get("/metrics")
    assert r.status_code == 200
    return samples(r.text)


async def test_liveness_and_readiness(server_model_path) -> None:
    async with running_server(server_config(server_model_path)) as s:
        async with httpx.AsyncClient(base_url=s.url) as c:
            for path in ("/health", "/health/ready", "/v1/health"):
                r = await c.get(path)
                assert (r.status_code, r.json()) == (200, {"status": "ok"}), path
                assert (await c.head(path)).status_code == 200
            r = await c.get("/health/live")
            assert (r.status_code, r.json()) == (200, {"status": "alive"})
            assert (await c.head("/health/live")).status_code == 200
            assert (await c.post("/health/live")).status_code == 405

            # The first stop signal: readiness says 503 at once (the balancer stops sending
            # work), liveness stays 200 (the orchestrator must not kill a draining replica).
            s.app.begin_drain(trio.current_time() + 30)  # type: ignore[attr-defined]
            for path in ("/health", "/health/ready"):
                r = await c.get(path)
                assert r.status_code == 503, path
                assert r.json()["status"] == "draining"
                assert r.headers["retry-after"] == "5"
            r = await c.get("/health/live")
            assert (r.status_code, r.json()) == (200, {"status": "alive"})
            r = await c.get("/metrics")
            text = r.text
    assert 'bitnetd_requests_total{endpoint="/health/live",status="200"}' in text
    assert 'bitnetd_requests_total{endpoint="/health/ready",status="503"}' in text


async def test_vllm_names_carry_the_model_name(server_model_path) -> None:
    async with running_server(server_config(server_model_path)) as s:
        async with httpx.AsyncClient(base_url=s.url) as c:
            got = await scrape(c)
    for vllm_name, ours in PAIRS.items():
        labels, value = got[vllm_name]
        assert labels == {"model_name": "server.gguf"}, vllm_name
        assert value == got[ours][1], vllm_name


async def test_vllm_gauges_equal_ours_under_load(server_model_path) -> None:
    """2 slots, 6 long streams: requests run and wait; every scrape shows vLLM's gauges equal
    to ours. Then the same prompt twice: the prefix cache counters move, equal in both."""
    config = server_config(server_model_path, model_parallel=2)
    seen_running = seen_waiting = 0.0
    scrapes = 0
    async with running_server(config) as s:
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:

            async def stream(i: int) -> None:
                body = {"prompt": f"client {i} says", "max_tokens": 3000, "ignore_eos": True,
                        "stream": True, "temperature": 0}
                async with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    async for _ in r.aiter_bytes():
                        pass

            async with trio.open_nursery() as nursery:
                for i in range(6):
                    nursery.start_soon(stream, i)
                await trio.sleep(0.05)
                while True:
                    got = await scrape(c)
                    scrapes += 1
                    for vllm_name, ours in PAIRS.items():
                        assert got[vllm_name][1] == got[ours][1], (vllm_name, got[vllm_name])
                    seen_running = max(seen_running, got["vllm:num_requests_running"][1])
                    seen_waiting = max(seen_waiting, got["vllm:num_requests_waiting"][1])
                    if got["bitnetd_requests_running"][1] == 0 and scrapes > 3:
                        break
                    await trio.sleep(0.02)

            before = await scrape(c)
            prompt = "a long shared prefix " * 20
            for _ in range(2):
                r = await c.post("/v1/completions",
                                 json={"prompt": prompt, "max_tokens": 1, "temperature": 0})
                assert r.status_code == 200
            after = await scrape(c)
    assert seen_running == 2 and seen_waiting >= 1, (seen_running, seen_waiting, scrapes)
    hits = after["vllm:prefix_cache_hits_total"][1] - before["vllm:prefix_cache_hits_total"][1]
    queries = (after["vllm:prefix_cache_queries_total"][1]
               - before["vllm:prefix_cache_queries_total"][1])
    assert queries > 2 * 20 and hits > 20  # the second request reused the first's prompt
    for vllm_name, ours in PAIRS.items():
        assert after[vllm_name][1] == after[ours][1], vllm_name
