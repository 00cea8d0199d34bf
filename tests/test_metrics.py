"""Prometheus metrics (bitnetd_trio.api.metrics): names, types, formats, isolation."""

from __future__ import annotations

import threading

from prometheus_client.parser import text_string_to_metric_families

from bitnetd_trio.api.metrics import Metrics, endpoint_label

# The C bitnetd's families keep their names; the others are the ones issue 3 asks for.
EXPECTED = {
    "bitnetd_requests": "counter",
    "bitnetd_tokens_generated": "counter",
    "bitnetd_errors": "counter",
    "bitnetd_active_connections": "gauge",
    "bitnetd_model_loaded": "gauge",
    "bitnetd_tokens_per_second": "gauge",
    "bitnetd_inference_seconds": "histogram",
    "bitnetd_prompt_tokens": "counter",
    "bitnetd_requests_running": "gauge",
    "bitnetd_requests_waiting": "gauge",
    "bitnetd_requests_cancelled": "counter",
    "bitnetd_tokens_after_disconnect": "counter",
    "bitnetd_time_to_first_token_seconds": "histogram",
    "bitnetd_inter_token_latency_seconds": "histogram",
    "bitnetd_request_queue_seconds": "histogram",
    "bitnetd_e2e_request_seconds": "histogram",
    "bitnetd_kv_cache_usage_ratio": "gauge",
    "bitnetd_prefix_cache_queries": "counter",
    "bitnetd_prefix_cache_hits": "counter",
    # vLLM's names, for inference gateways (issue 12)
    "vllm:num_requests_waiting": "gauge",
    "vllm:num_requests_running": "gauge",
    "vllm:kv_cache_usage_perc": "gauge",
    "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter",
}


def families(body: bytes) -> dict:
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def sample_value(body: bytes, name: str, labels: dict | None = None) -> float:
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            if s.name == name and (labels is None or s.labels == labels):
                return s.value
    raise AssertionError(f"no sample {name} {labels}")


def test_every_family_with_its_type():
    m = Metrics()
    m.requests_total.labels("/health", "200").inc()
    m.errors_total.labels("invalid_request_error").inc()
    body, ctype = m.render(None)
    assert ctype == "text/plain; version=0.0.4; charset=utf-8"
    fams = families(body)
    assert {name: f.type for name, f in fams.items()} == EXPECTED


def test_exact_series_names_in_text_format():
    m = Metrics()
    m.count_request("/v1/chat/completions", 200)
    m.tokens_generated_total.inc(3)
    body, _ = m.render(None)
    text = body.decode()
    for line in [
        'bitnetd_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0',
        "bitnetd_tokens_generated_total 3.0",
        "bitnetd_model_loaded 0.0",
        "# TYPE bitnetd_inference_seconds histogram",
        'bitnetd_time_to_first_token_seconds_bucket{le="0.005"} 0.0',
        'bitnetd_time_to_first_token_seconds_bucket{le="60.0"} 0.0',
        'bitnetd_inter_token_latency_seconds_bucket{le="0.001"} 0.0',
        'bitnetd_inter_token_latency_seconds_bucket{le="2.0"} 0.0',
        'bitnetd_e2e_request_seconds_bucket{le="0.05"} 0.0',
        'bitnetd_e2e_request_seconds_bucket{le="600.0"} 0.0',
    ]:
        assert line in text.splitlines(), line
    assert "_created" not in text


def test_openmetrics_on_request():
    m = Metrics()
    m.tokens_generated_total.inc()
    accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
    body, ctype = m.render(accept)
    assert ctype.startswith("application/openmetrics-text")
    text = body.decode()
    assert text.endswith("# EOF\n")
    assert "bitnetd_tokens_generated_total 1.0" in text
    assert "_created" not in text
    # A plain scraper or curl gets the 0.0.4 text format.
    body, ctype = m.render("text/plain;version=0.0.4,*/*;q=0.1")
    assert ctype.startswith("text/plain; version=0.0.4")
    assert "# EOF" not in body.decode()


def test_registries_are_private():
    a, b = Metrics(), Metrics()
    a.prompt_tokens_total.inc(5)
    assert sample_value(a.render()[0], "bitnetd_prompt_tokens_total") == 5
    assert sample_value(b.render()[0], "bitnetd_prompt_tokens_total") == 0
    # No process or platform collectors on the private registry.
    assert "process_cpu_seconds_total" not in a.render()[0].decode()


def test_helpers():
    m = Metrics()
    m.count_request("/v1/models/bitnet", 404, "invalid_request_error")
    m.count_request("/wp-admin.php", 404, "not_found_error")
    m.finish_generation(completion_tokens=11, decode_seconds=0.5, inference_seconds=0.7)
    body, _ = m.render()
    assert sample_value(body, "bitnetd_requests_total", {"endpoint": "/v1/models", "status": "404"}) == 1
    assert sample_value(body, "bitnetd_requests_total", {"endpoint": "other", "status": "404"}) == 1
    assert sample_value(body, "bitnetd_errors_total", {"type": "not_found_error"}) == 1
    assert sample_value(body, "bitnetd_tokens_generated_total") == 11
    assert sample_value(body, "bitnetd_tokens_per_second") == 20.0
    assert sample_value(body, "bitnetd_inference_seconds_count") == 1
    assert sample_value(body, "bitnetd_inference_seconds_bucket", {"le": "1.0"}) == 1
    assert sample_value(body, "bitnetd_inference_seconds_bucket", {"le": "0.5"}) == 0


def test_endpoint_label_is_bounded():
    assert endpoint_label("/v1/completions") == "/v1/completions"
    assert endpoint_label("/v1/models/x") == "/v1/models"
    assert endpoint_label("/v1/chat/completions/../../etc") == "other"


def test_updates_from_threads_are_not_lost():
    m = Metrics()

    def work():
        for _ in range(2000):
            m.tokens_generated_total.inc()
            m.inter_token_latency_seconds.observe(0.01)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    body, _ = m.render()
    assert sample_value(body, "bitnetd_tokens_generated_total") == 8000
    assert sample_value(body, "bitnetd_inter_token_latency_seconds_count") == 8000
