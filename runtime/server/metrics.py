"""The server's counters and histograms, rendered in the Prometheus text exposition format (version 0.0.4).

Written out by hand rather than with prometheus_client: the format is a few lines of text,
and an edge server's install stays at onnxruntime + tokenizers + numpy + the ASGI stack.
Everything is updated from the event loop and from worker threads, hence the lock.
"""
from __future__ import annotations

import threading
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500)


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, str, str], int] = defaultdict(int)   # (model, endpoint, status)
        self._latency = _Histogram(LATENCY_BUCKETS)                            # by model
        self._batch_size = _Histogram(BATCH_BUCKETS)                           # by model
        self._queue_depth: dict[str, callable] = {}                            # model -> () -> int
        self._generated: dict[str, int] = defaultdict(int)                    # model -> tokens streamed
        self._streams_cancelled: dict[str, int] = defaultdict(int)            # model -> streams cut short
        self._in_flight = 0
        # continuous batching (text-generation)
        self._sequences: dict[str, callable] = {}                              # model -> () -> (running, waiting)
        self._step_tokens = _Histogram(BATCH_BUCKETS)                          # tokens decoded per step, by model
        self._first_token = _Histogram(LATENCY_BUCKETS)                        # arrival -> first token, by model
        self._tokens_per_s = _Histogram(RATE_BUCKETS)                          # per finished request, by model

    def watch_sequences(self, model: str, counts) -> None:
        """Read `counts()` -> (running sequences, waiting requests, prompt tokens joined, those a known prefix
        gave) at scrape time."""
        self._sequences[model] = counts

    def generation_step(self, model: str, tokens: int) -> None:
        with self._lock:
            self._step_tokens.observe(model, tokens)

    def first_token(self, model: str, seconds: float) -> None:
        with self._lock:
            self._first_token.observe(model, seconds)

    def request_generated(self, model: str, tokens: int, seconds: float) -> None:
        with self._lock:
            if seconds > 0:
                self._tokens_per_s.observe(model, tokens / seconds)

    def watch_queue(self, model: str, depth) -> None:
        """Read `depth()` at scrape time: the queue itself is the truth, not a copy of it."""
        self._queue_depth[model] = depth

    def request_started(self) -> None:
        with self._lock:
            self._in_flight += 1

    def request_finished(self, model: str, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self._in_flight -= 1
            self._requests[(model, endpoint, str(status))] += 1
            if status < 400:
                self._latency.observe(model, seconds)

    def batch_ran(self, model: str, size: int) -> None:
        with self._lock:
            self._batch_size.observe(model, size)

    def stream_ended(self, model: str, tokens: int, cancelled: bool) -> None:
        with self._lock:
            self._generated[model] += tokens
            if cancelled:
                self._streams_cancelled[model] += 1

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP onnxpipe_requests_total Requests answered, by model, endpoint and HTTP status.",
                     "# TYPE onnxpipe_requests_total counter"]
            for (model, endpoint, status), n in sorted(self._requests.items()):
                lines.append(f'onnxpipe_requests_total{{model="{_esc(model)}",endpoint="{_esc(endpoint)}",'
                             f'status="{status}"}} {n}')
            lines += ["# HELP onnxpipe_request_duration_seconds Time from request received to answer, successful "
                      "requests.", "# TYPE onnxpipe_request_duration_seconds histogram"]
            lines += self._latency.render("onnxpipe_request_duration_seconds")
            lines += ["# HELP onnxpipe_batch_size Inputs gathered into one batch (run in groups of similar length).",
                      "# TYPE onnxpipe_batch_size histogram"]
            lines += self._batch_size.render("onnxpipe_batch_size")
            lines += ["# HELP onnxpipe_queue_depth Requests waiting for a worker, by model.",
                      "# TYPE onnxpipe_queue_depth gauge"]
            lines += [f'onnxpipe_queue_depth{{model="{_esc(m)}"}} {depth()}' for m, depth in sorted(self._queue_depth.items())]
            lines += ["# HELP onnxpipe_stream_tokens_total Tokens generated for streamed requests.",
                      "# TYPE onnxpipe_stream_tokens_total counter"]
            lines += [f'onnxpipe_stream_tokens_total{{model="{_esc(m)}"}} {n}' for m, n in sorted(self._generated.items())]
            lines += ["# HELP onnxpipe_streams_cancelled_total Streams stopped early because the client went away.",
                      "# TYPE onnxpipe_streams_cancelled_total counter"]
            lines += [f'onnxpipe_streams_cancelled_total{{model="{_esc(m)}"}} {n}'
                      for m, n in sorted(self._streams_cancelled.items())]
            counts = {m: f() for m, f in sorted(self._sequences.items())}
            lines += ["# HELP onnxpipe_running_sequences Sequences decoding together (continuous batching).",
                      "# TYPE onnxpipe_running_sequences gauge"]
            lines += [f'onnxpipe_running_sequences{{model="{_esc(m)}"}} {c[0]}' for m, c in counts.items()]
            lines += ["# HELP onnxpipe_waiting_requests Generation requests not yet decoding (queued or joining).",
                      "# TYPE onnxpipe_waiting_requests gauge"]
            lines += [f'onnxpipe_waiting_requests{{model="{_esc(m)}"}} {c[1]}' for m, c in counts.items()]
            lines += ["# HELP onnxpipe_prompt_tokens_total Prompt tokens of requests that joined the running batch.",
                      "# TYPE onnxpipe_prompt_tokens_total counter"]
            lines += [f'onnxpipe_prompt_tokens_total{{model="{_esc(m)}"}} {c[2]}' for m, c in counts.items()]
            lines += ["# HELP onnxpipe_prompt_tokens_cached_total Prompt tokens taken from the prefix cache, not "
                      "prefilled again.", "# TYPE onnxpipe_prompt_tokens_cached_total counter"]
            lines += [f'onnxpipe_prompt_tokens_cached_total{{model="{_esc(m)}"}} {c[3]}' for m, c in counts.items()]
            for name, hist, text in (
                    ("onnxpipe_tokens_per_step", self._step_tokens, "Tokens decoded by one engine step."),
                    ("onnxpipe_time_to_first_token_seconds", self._first_token, "Request received to first token."),
                    ("onnxpipe_request_tokens_per_second", self._tokens_per_s,
                     "New tokens per second of each finished generation request.")):
                lines += [f"# HELP {name} {text}", f"# TYPE {name} histogram"] + hist.render(name)
            lines += ["# HELP onnxpipe_requests_in_flight Requests received and not yet answered.",
                      "# TYPE onnxpipe_requests_in_flight gauge", f"onnxpipe_requests_in_flight {self._in_flight}"]
        return "\n".join(lines) + "\n"


class _Histogram:
    """Cumulative buckets per model label, as Prometheus histograms are exposed."""

    def __init__(self, bounds):
        self.bounds = bounds
        self.counts: dict[str, list[int]] = {}
        self.sums: dict[str, float] = defaultdict(float)

    def observe(self, model: str, value: float) -> None:
        counts = self.counts.setdefault(model, [0] * (len(self.bounds) + 1))
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[model] += value

    def render(self, name: str) -> list[str]:
        lines = []
        for model, counts in sorted(self.counts.items()):
            label = f'model="{_esc(model)}"'
            for bound, n in zip(self.bounds, counts):
                lines.append(f'{name}_bucket{{{label},le="{_fmt(bound)}"}} {n}')
            lines.append(f'{name}_bucket{{{label},le="+Inf"}} {counts[-1]}')
            lines.append(f"{name}_sum{{{label}}} {self.sums[model]!r}")
            lines.append(f"{name}_count{{{label}}} {counts[-1]}")
        return lines


def _fmt(bound) -> str:
    return repr(float(bound))


def _esc(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
