"""What `GET /metrics` tells Prometheus, in its text format (prometheus-client): the engine's load, the tokens
prefilled and generated, and the time to the first token and to the whole answer of each completion.

Each app has its own CollectorRegistry, not the library's global one, so that several servers in one process
(the tests) count apart, and nothing else registered in the process is exported.
"""

from __future__ import annotations

from typing import Any

# seconds; like vLLM's, spanning a one-token answer on a GPU to a long one on a CPU core
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0)
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0)


class Metrics:
    def __init__(self, engine: Any):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        running = Gauge("gpt2_dutch_requests_running", "Completion requests with sequences in the decoding batch",
                        registry=self.registry)
        running.set_function(lambda: engine.stats()["running_requests"])
        waiting = Gauge("gpt2_dutch_requests_waiting", "Completion requests waiting for a slot in the batch",
                        registry=self.registry)
        waiting.set_function(lambda: engine.stats()["waiting"])
        # exported as gpt2_dutch_prompt_tokens_total and gpt2_dutch_generation_tokens_total
        self.prompt_tokens = Counter("gpt2_dutch_prompt_tokens", "Prompt tokens of accepted completion requests",
                                     registry=self.registry)
        self.generation_tokens = Counter("gpt2_dutch_generation_tokens",
                                         "Tokens generated (those after a stop string not counted)",
                                         registry=self.registry)
        self.ttft = Histogram("gpt2_dutch_time_to_first_token_seconds",
                              "From a completion request's arrival to its first token (max_tokens 0: to its "
                              "scored prompt)", buckets=TTFT_BUCKETS, registry=self.registry)
        self.latency = Histogram("gpt2_dutch_e2e_request_latency_seconds",
                                 "From a completion request's arrival to its last byte, for those answered whole",
                                 buckets=LATENCY_BUCKETS, registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        """The exposition body and its content type."""
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST
