"""Server metrics in the Prometheus text exposition format (version 0.0.4), thread-safe.

Counters, gauges and histograms with labels, written by the HTTP handlers and the engine thread and
read by `GET /metrics`. Histogram buckets are cumulative (`le`), with `_sum` and `_count`, as
Prometheus's `histogram_quantile` expects.
"""
from __future__ import annotations

import math
import threading

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def _labels(labels: dict) -> str:
    if not labels:
        return ""
    esc = lambda v: str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")  # noqa: E731
    return "{" + ",".join(f'{k}="{esc(v)}"' for k, v in sorted(labels.items())) + "}"


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if not float(x).is_integer() else str(int(x))


class Metrics:
    """name -> (type, help, {labels tuple: value or histogram state})."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._meta: dict[str, tuple[str, str, tuple]] = {}
        self._values: dict[str, dict[tuple, object]] = {}
        self.counter("moetune_requests_total", "HTTP requests answered, by endpoint and status code.")
        self.counter("moetune_prompt_tokens_total", "Prompt tokens of admitted requests.")
        self.counter("moetune_completion_tokens_total", "Generated tokens.")
        self.counter("moetune_cancelled_requests_total", "Requests whose client went away before they finished.")
        self.gauge("moetune_queue_depth", "Requests waiting for a batch slot.")
        self.gauge("moetune_active_sequences", "Sequences being decoded now.")
        self.histogram("moetune_batch_size", "Sequences decoded together per decode step.", BATCH_BUCKETS)
        self.histogram("moetune_request_latency_seconds", "Time from a request's arrival to its last token.",
                       LATENCY_BUCKETS)
        self.histogram("moetune_time_to_first_token_seconds", "Time from a request's arrival to its first token.",
                       LATENCY_BUCKETS)

    def _declare(self, name: str, kind: str, help_: str, buckets: tuple = ()) -> None:
        self._meta[name] = (kind, help_, tuple(buckets))
        self._values[name] = {}

    def counter(self, name: str, help_: str) -> None:
        self._declare(name, "counter", help_)

    def gauge(self, name: str, help_: str) -> None:
        self._declare(name, "gauge", help_)

    def histogram(self, name: str, help_: str, buckets: tuple) -> None:
        self._declare(name, "histogram", help_, buckets)

    def inc(self, name: str, value: float = 1.0, **labels) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            vals = self._values[name]
            vals[key] = vals.get(key, 0.0) + value

    def set(self, name: str, value: float, **labels) -> None:
        with self._lock:
            self._values[name][tuple(sorted(labels.items()))] = float(value)

    def observe(self, name: str, value: float, **labels) -> None:
        key = tuple(sorted(labels.items()))
        buckets = self._meta[name][2]
        with self._lock:
            h = self._values[name].setdefault(key, [[0] * len(buckets), 0.0, 0])
            for i, b in enumerate(buckets):
                if value <= b:
                    h[0][i] += 1
            h[1] += value
            h[2] += 1

    def value(self, name: str, **labels) -> float:
        """A counter's or gauge's value (0 when never set); a histogram's count."""
        with self._lock:
            v = self._values[name].get(tuple(sorted(labels.items())), 0.0)
        return float(v[2] if isinstance(v, list) else v)

    def render(self) -> str:
        lines = []
        with self._lock:
            for name, (kind, help_, buckets) in self._meta.items():
                lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
                vals = self._values[name]
                if kind != "histogram":
                    for key, v in sorted(vals.items()) or [((), 0.0)]:
                        lines.append(f"{name}{_labels(dict(key))} {_num(v)}")
                    continue
                for key, (counts, total, n) in sorted(vals.items()):
                    labels = dict(key)
                    for b, c in zip(buckets, counts):
                        lines.append(f"{name}_bucket{_labels({**labels, 'le': _num(b)})} {c}")
                    lines.append(f"{name}_bucket{_labels({**labels, 'le': '+Inf'})} {n}")
                    lines.append(f"{name}_sum{_labels(labels)} {_num(total)}")
                    lines.append(f"{name}_count{_labels(labels)} {n}")
        return "\n".join(lines) + "\n"
