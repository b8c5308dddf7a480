"""Prometheus metrics of the service (served at ``GET /metrics``)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

REQUESTS = Counter("erc_http_requests_total", "HTTP requests by endpoint and status.", ["endpoint", "status"])
LATENCY = Histogram(
    "erc_http_request_duration_seconds",
    "HTTP request latency by endpoint and status.",
    ["endpoint", "status"],
    buckets=_LATENCY_BUCKETS,
)
PREDICTIONS = Counter("erc_predictions_total", "Predicted labels.", ["label_set", "label"])
RETRIEVAL_LATENCY = Histogram(
    "erc_retrieval_duration_seconds",
    "Demonstration retrieval (embedding + search) per request.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
INFLIGHT_TOKENS = Gauge("erc_inflight_prompt_tokens", "Prompt tokens admitted to the engine and not yet answered.")
ENGINE_WAITING = Gauge("erc_engine_waiting_requests", "Requests queued in the engine (last step).")
ENGINE_RUNNING = Gauge("erc_engine_running_requests", "Requests running in the engine (last step).")
ENGINE_BATCH = Histogram(
    "erc_engine_batch_size",
    "Requests scheduled per engine step.",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
)
PROMPT_TOKENS = Counter("erc_engine_prompt_tokens_total", "Prompt tokens submitted to the engine.")
PREFIX_QUERIES = Counter("erc_prefix_cache_queried_tokens_total", "Prompt tokens looked up in the prefix cache.")
PREFIX_HITS = Counter("erc_prefix_cache_hit_tokens_total", "Prompt tokens found in the prefix cache.")
PREFIX_HIT_RATE = Gauge("erc_prefix_cache_hit_rate", "Prefix-cache hits / queries since start.")
ENGINE_ALIVE = Gauge("erc_engine_alive", "1 while the engine runs, 0 before it starts or after it died.")
REJECTED = Counter(
    "erc_rejected_requests_total",
    "Requests answered with an error body, by its type (service/exceptions.py): overload and overload_tokens "
    "(429), deadline (504), client_gone, unauthorized (401), body_too_large (413), body_timeout (408), draining and "
    "unavailable (503), engine_failed (500), invalid_request, limit_exceeded, label_set_unavailable, "
    "prompt_too_long and too_many_tokens (422).",
    ["reason"],
)
INFLIGHT = Gauge("erc_inflight_requests", "Prediction requests being served.")
ENGINE_LATENCY = Histogram(
    "erc_engine_duration_seconds",
    "Time in the engine per request (all its prompts), the rest of a request being HTTP, validation, "
    "retrieval and templating.",
    buckets=_LATENCY_BUCKETS,
)
