"""Prometheus metrics of the daemon, on a private registry.

The families of the C bitnetd keep their names (`bitnetd_requests_total`, ...); the rest are what
operators compare LLM servers by (queue time, time to first token, inter-token latency, KV cache
use, work done for clients that already left). Updates are thread-safe (prometheus-client locks
each value), so the inference thread may update metrics directly.

Kubernetes inference gateways (Gateway API Inference Extension, llm-d) pick a replica from
gauges named as vLLM names them; `VllmNames` exports those names with a `model_name` label,
read from our own families at each scrape, so the two can never disagree.
"""

from __future__ import annotations

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.openmetrics import exposition as openmetrics

__all__ = ["CONTENT_TYPE_PLAIN_0_0_4", "ENDPOINTS", "Metrics"]

# The `_created` series double the output and no dashboard uses them. prometheus-client can only
# turn them off process-wide; the daemon's process has no other registry that would want them.
prometheus_client.disable_created_metrics()

# Label values for `endpoint`: fixed, so a client probing random URLs cannot create series.
ENDPOINTS = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/models",
        "/health",
        "/health/live",
        "/health/ready",
        "/metrics",
        "/tokenize",
        "/detokenize",
        "/tokenizer_info",
        "/apply-template",
        "/props",
        "/slots",
        "/generate",
        "/model_info",
        "/completion",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/responses",
        "/v1/responses/input_tokens",
        "/v1/chat/completions/input_tokens",
        "other",
    }
)

# Buckets (seconds) for CPU LLM serving: a tiny model answers in milliseconds, a 2B model on two
# cores takes seconds for a long prompt and minutes for a long answer.
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5,
               0.75, 1.0, 2.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                 120.0)


def endpoint_label(path: str) -> str:
    """The `endpoint` label for a request path (`/v1/models/{id}` counts as /v1/models)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models"
    return "other"


class Metrics:
    """Every metric of the daemon on its own `CollectorRegistry` (no process-global state)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)

        # ---- the C bitnetd's families (names kept) ----
        self.requests_total = Counter(
            "bitnetd_requests_total", "HTTP requests answered, by endpoint and status code",
            ["endpoint", "status"], registry=r)
        self.tokens_generated_total = Counter(
            "bitnetd_tokens_generated_total", "Tokens generated (completion tokens)", registry=r)
        self.errors_total = Counter(
            "bitnetd_errors_total", "Error responses, by OpenAI error type", ["type"], registry=r)
        self.active_connections = Gauge(
            "bitnetd_active_connections", "HTTP requests being served", registry=r)
        self.model_loaded = Gauge(
            "bitnetd_model_loaded", "1 when a model is loaded and serving, else 0", registry=r)
        self.tokens_per_second = Gauge(
            "bitnetd_tokens_per_second",
            "Decode speed of the last finished generation (tokens per second)", registry=r)
        self.inference_seconds = Histogram(
            "bitnetd_inference_seconds",
            "Engine time per generation, prompt processing and decoding",
            buckets=E2E_BUCKETS, registry=r)

        # ---- added families ----
        self.prompt_tokens_total = Counter(
            "bitnetd_prompt_tokens_total", "Prompt tokens processed", registry=r)
        self.requests_running = Gauge(
            "bitnetd_requests_running", "Generation requests holding an engine sequence",
            registry=r)
        self.requests_waiting = Gauge(
            "bitnetd_requests_waiting", "Generation requests waiting for a free sequence",
            registry=r)
        self.requests_cancelled_total = Counter(
            "bitnetd_requests_cancelled_total",
            "Generation requests ended early because the client left or time ran out",
            registry=r)
        self.tokens_after_disconnect_total = Counter(
            "bitnetd_tokens_after_disconnect_total",
            "Tokens generated for a request after its client had disconnected (should stay ~0)",
            registry=r)
        self.time_to_first_token_seconds = Histogram(
            "bitnetd_time_to_first_token_seconds",
            "From request arrival to the first generated token", buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency_seconds = Histogram(
            "bitnetd_inter_token_latency_seconds",
            "Time between consecutive generated tokens of one request", buckets=ITL_BUCKETS,
            registry=r)
        self.request_queue_seconds = Histogram(
            "bitnetd_request_queue_seconds", "Time a request waited for a free sequence",
            buckets=QUEUE_BUCKETS, registry=r)
        self.e2e_request_seconds = Histogram(
            "bitnetd_e2e_request_seconds", "From request arrival to its last byte",
            buckets=E2E_BUCKETS, registry=r)
        self.kv_cache_usage_ratio = Gauge(
            "bitnetd_kv_cache_usage_ratio",
            "Fraction of the KV cache (all sequences) holding tokens", registry=r)
        self.prefix_cache_queries_total = Counter(
            "bitnetd_prefix_cache_queries", "Prompt tokens looked up in the slots' cached tokens",
            registry=r)
        self.prefix_cache_hits_total = Counter(
            "bitnetd_prefix_cache_hits",
            "Prompt tokens found in a slot's cached tokens (not computed again)", registry=r)

        # ---- vLLM's names, for inference gateways ----
        self.model_name = ""  # the served model id (the app sets it when it serves a model)
        r.register(VllmNames(self))

        self.model_loaded.set(0)

    # ---- convenience for the handlers ----

    def count_request(self, path: str, status: int, error_type: str | None = None) -> None:
        """One answered request; `error_type` (the envelope's type) also counts an error."""
        self.requests_total.labels(endpoint_label(path), str(status)).inc()
        if error_type is not None:
            self.errors_total.labels(error_type).inc()

    def finish_generation(
        self, completion_tokens: int, decode_seconds: float, inference_seconds: float
    ) -> None:
        """Record a finished generation: token count, engine time and decode speed."""
        self.tokens_generated_total.inc(completion_tokens)
        self.inference_seconds.observe(inference_seconds)
        if completion_tokens > 1 and decode_seconds > 0:
            # The first token belongs to prompt processing; speed is over the decoded ones.
            self.tokens_per_second.set((completion_tokens - 1) / decode_seconds)

    def render(self, accept_header: str | None = None) -> tuple[bytes, str]:
        """The exposition body and its content type (OpenMetrics only when the client asks)."""
        if accept_header and "application/openmetrics-text" in accept_header.lower():
            # The default escaping ("underscores") turns the colons of vllm:... sample names
            # into underscores but not those of their TYPE lines; names with colons are valid
            # legacy names and need no escaping. Every other name is unchanged by this.
            data = openmetrics.generate_latest(self.registry, escaping="allow-utf-8")
            return data, openmetrics.CONTENT_TYPE_LATEST
        return generate_latest(self.registry), CONTENT_TYPE_PLAIN_0_0_4


def _value(metric: Gauge | Counter) -> float:
    """The current value of an unlabelled gauge or counter (a counter's `_total` sample)."""
    samples = metric.collect()[0].samples
    return next(s.value for s in samples if not s.name.endswith("_created"))


class VllmNames:
    """vLLM's metric names over our values: `vllm:num_requests_waiting`,
    `vllm:num_requests_running`, `vllm:kv_cache_usage_perc` (a fraction, 0..1, as in vLLM) and
    the `vllm:prefix_cache_queries` / `vllm:prefix_cache_hits` token counters, each with the
    `model_name` label. A custom collector: read at scrape time from the families the engine
    updates, so they equal ours at every scrape."""

    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self):  # noqa: ANN201 - prometheus-client's collector protocol
        m = self._m
        labels = [m.model_name]
        families = (
            (GaugeMetricFamily, "vllm:num_requests_waiting",
             "Requests waiting for a free sequence (bitnetd)", m.requests_waiting),
            (GaugeMetricFamily, "vllm:num_requests_running",
             "Requests holding an engine sequence (bitnetd)", m.requests_running),
            (GaugeMetricFamily, "vllm:kv_cache_usage_perc",
             "KV cache usage, 1 = 100% (bitnetd)", m.kv_cache_usage_ratio),
            (CounterMetricFamily, "vllm:prefix_cache_queries",
             "Prompt tokens looked up in the prefix cache (bitnetd)", m.prefix_cache_queries_total),
            (CounterMetricFamily, "vllm:prefix_cache_hits",
             "Prompt tokens found in the prefix cache (bitnetd)", m.prefix_cache_hits_total),
        )
        for kind, name, doc, source in families:
            family = kind(name, doc, labels=["model_name"])
            family.add_metric(labels, _value(source))
            yield family
