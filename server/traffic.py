"""Traffic between versions: weighted choice, sticky callers, and automatic rollback.

A model whose config has `traffic` gets a `TrafficRouter`. A request that names no version
is given one by weight among the versions ready now (a request naming its version bypasses
the split). With a sticky key, the caller's key is hashed to a point on [0, 1), and the
versions own consecutive stretches of it in version order, sized by weight: the same key
always lands on the same version, and when weights change only the callers in the stretch
that moved change version.

With a rollback rule, each canary's last `window` answers are kept (status and latency); when
their error ratio or p99 passes the rule, the canary's weight drops to 0 at once, the
registry records why, and it stays out until an operator sets the weights again (a reload,
or an admin call).
"""

from __future__ import annotations

import hashlib
import logging
import random
import threading
import time
from collections import deque
from collections.abc import Callable

import numpy as np

from tiffin.protos.model_config import Traffic

log = logging.getLogger(__name__)

# Statuses that are the server's or the model's fault; a client's bad request is not.
SERVER_FAULTS = {"INTERNAL", "UNKNOWN", "UNAVAILABLE", "DEADLINE_EXCEEDED", "DATA_LOSS"}


def sticky_point(key: str) -> float:
    """Where a sticky key lands on [0, 1): the same everywhere and across restarts."""
    digest = hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def same_answer(
    primary: dict[str, np.ndarray], shadow: dict[str, np.ndarray], rtol: float, atol: float
) -> str:
    """ "" when two answers agree (the same outputs and shapes; numbers within tolerance,
    anything else equal), else what differs first."""
    if primary.keys() != shadow.keys():
        return f"outputs {sorted(shadow)} instead of {sorted(primary)}"
    for name, expected in primary.items():
        got = shadow[name]
        if got.shape != expected.shape:
            return f"output '{name}' has shape {list(got.shape)} instead of {list(expected.shape)}"
        numeric = expected.dtype.kind in "biuf" and got.dtype.kind in "biuf"
        if numeric:
            if not np.allclose(got, expected, rtol=rtol, atol=atol, equal_nan=True):
                worst = float(np.max(np.abs(got.astype(np.float64) - expected)))
                return f"output '{name}' differs by up to {worst:.3g}"
        elif not np.array_equal(got, expected):
            return f"output '{name}' differs"
    return ""


class TrafficRouter:
    """Chooses versions for one model and watches its canaries."""

    def __init__(self, model: str, traffic: Traffic, on_rollback: Callable[[int, str], None]):
        self.model = model
        self.traffic = traffic
        self.weights = dict(traffic.weights)
        self.rolled_back: dict[int, str] = {}
        self._on_rollback = on_rollback
        self._lock = threading.Lock()
        rule = traffic.rollback
        self._window = rule.window if rule else 0
        # version -> its last answers: (server fault?, latency in seconds)
        self._recent: dict[int, deque[tuple[bool, float]]] = {}
        self._since_check: dict[int, int] = {}
        # The shadow candidate's comparisons: outcome -> count (match, mismatch, error).
        self.shadowed: dict[str, int] = {"match": 0, "mismatch": 0, "error": 0}
        self._mismatch_logged = 0.0

    def set_weights(self, weights: dict[int, int]) -> None:
        """An operator's new weights: they replace the live ones and clear rollbacks."""
        with self._lock:
            self.weights = dict(weights)
            self.rolled_back.clear()
            self._recent.clear()

    def choose(self, ready: list[int], sticky: str | None) -> int | None:
        """The version for a request naming none; None when no weighted version is ready."""
        shares = [
            (v, w)
            for v, w in sorted(self.weights.items())
            if w > 0 and v in ready and v not in self.rolled_back
        ]
        if not shares:
            return None
        total = sum(w for _, w in shares)
        point = (sticky_point(sticky) if sticky is not None else random.random()) * total
        for version, weight in shares:
            point -= weight
            if point < 0:
                return version
        return shares[-1][0]

    def shadow_for(self, version: int, ready: list[int]) -> int | None:
        """The candidate to mirror a request served by `version` to, for a share of them."""
        shadow = self.traffic.shadow
        if shadow is None or shadow.version == version or shadow.version not in ready:
            return None
        return shadow.version if random.random() < shadow.share else None

    def compared(self, difference: str | None) -> None:
        """One mirrored request's outcome: None (the candidate failed), "" (the same
        answer) or what differed."""
        outcome = "error" if difference is None else ("mismatch" if difference else "match")
        with self._lock:
            self.shadowed[outcome] += 1
            # At most one line a minute: a candidate that always differs must not flood logs.
            loud = difference and time.monotonic() - self._mismatch_logged > 60
            if loud:
                self._mismatch_logged = time.monotonic()
        if loud:
            log.warning(
                "model '%s' shadow version %d answered differently: %s (%d of %d compared)",
                self.model,
                self.traffic.shadow.version if self.traffic.shadow else 0,
                difference,
                self.shadowed["mismatch"],
                sum(self.shadowed.values()),
            )

    def watches(self, version: int) -> bool:
        return bool(self._window) and version in self.traffic.canaries()

    def observe(self, version: int, status: str, latency_s: float) -> None:
        """One answer of a watched version; rolls it back when the rule says so."""
        rule = self.traffic.rollback
        if rule is None:
            return
        with self._lock:
            if version in self.rolled_back:
                return
            recent = self._recent.setdefault(version, deque(maxlen=self._window))
            recent.append((status in SERVER_FAULTS, latency_s))
            # Judged once the window is full, then every tenth of it (sorting a window for
            # its p99 on every answer would cost more than the answer).
            seen = self._since_check.get(version, 0) + 1
            self._since_check[version] = seen
            if len(recent) < self._window or seen < max(1, self._window // 10):
                return
            self._since_check[version] = 0
            errors = sum(1 for fault, _ in recent if fault)
            ratio = errors / len(recent)
            latencies = sorted(latency for _, latency in recent)
            p99_ms = latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] * 1000
            reason = ""
            if rule.max_error_ratio is not None and ratio > rule.max_error_ratio:
                reason = (
                    f"error ratio {ratio:.3f} over its last {len(recent)} requests, above "
                    f"{rule.max_error_ratio:g}"
                )
            elif rule.max_p99_ms is not None and p99_ms > rule.max_p99_ms:
                reason = (
                    f"p99 {p99_ms:.1f} ms over its last {len(recent)} requests, above "
                    f"{rule.max_p99_ms:g} ms"
                )
            if not reason:
                return
            self.rolled_back[version] = reason
        log.error("model '%s' version %d rolled back: %s", self.model, version, reason)
        self._on_rollback(version, reason)
