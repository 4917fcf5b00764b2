"""The drift metrics: what each monitored version's DriftMonitor reports, as gauge and
counter families for the metrics endpoint (read at scrape time, never on a request).

Labels stay bounded: at most FEATURES_PER_TENSOR features per tensor and CLASSES_EXPORTED
classes per class output (scheduler/drift.py).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tiffin.scheduler.request import ModelKey
from tiffin.scheduler.statistics import ModelStatistics

# The common rule of thumb: a population stability index above this is drift worth acting on
# (below 0.1: no real change; 0.1 to 0.2: a moderate one).
PSI_DRIFTED = 0.2


@dataclass
class Family:
    """One metric: its name, type, help text and samples (labels, value)."""

    name: str
    kind: str
    what: str
    samples: list[tuple[dict[str, str], float]] = field(default_factory=list)


def drift_families(stats: Iterable[tuple[ModelKey, ModelStatistics]]) -> list[Family]:
    """The drift metrics of every version that has monitoring; none without any."""
    monitored = [(key, s.drift) for key, s in stats if s.drift is not None]
    if not monitored:
        return []
    samples = Family(
        "tiffin_drift_samples_total", "counter", "Sampled rows compared with the drift reference."
    )
    dropped = Family(
        "tiffin_drift_samples_dropped_total",
        "counter",
        "Sampled batches dropped because the drift monitor's queue was full.",
    )
    score = Family(
        "tiffin_drift_score",
        "gauge",
        f"Drift of a feature from its reference: PSI (above {PSI_DRIFTED:g}: drifted) or KS.",
    )
    shares = Family(
        "tiffin_output_class_share",
        "gauge",
        "Share of the sampled rows whose largest score is this class.",
    )
    for key, drift in monitored:
        version = {"model": key.name, "version": str(key.version)}
        samples.samples.append((version, drift.samples))
        dropped.samples.append((version, drift.dropped))
        for tensor, feature, psi, ks in drift.scores:
            where = {**version, "tensor": tensor, "feature": str(feature)}
            score.samples.append(({**where, "method": "psi"}, psi))
            score.samples.append(({**where, "method": "ks"}, ks))
        for tensor, label, share in drift.class_shares:
            shares.samples.append(({**version, "tensor": tensor, "class": str(label)}, share))
    return [samples, dropped, score, shares]
