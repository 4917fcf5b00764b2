"""Drift monitoring: how far a model's sampled inputs and outputs have moved from a
reference profile.

A feature is one element position of a numeric tensor with fixed dims (its non-batch dims
flattened in C order), at most FEATURES_PER_TENSOR of them per tensor. The reference profile
holds, per feature, its decile bin edges and the share of the reference rows in each bin
(for the population stability index) and QUANTILES sorted quantiles (for the
Kolmogorov-Smirnov statistic). `serverctl profile` writes it from sample data; without one,
`capture_first` rows of traffic become it.

Requests pay one random draw each; a sampled batch's rows are copied (the capped features
only) onto a bounded queue, dropped when it is full. A background thread folds them into
fixed-size windows, and the scores are computed from those when statistics are read.
"""

from __future__ import annotations

import json
import logging
import queue
import random
import threading
import time
from collections.abc import Container, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tiffin.protos.model_config import ModelConfig, TensorConfig

from .request import InferenceRequest, ModelKey

log = logging.getLogger(__name__)

FEATURES_PER_TENSOR = 64  # element positions judged per tensor: bounds the metrics' labels
CLASSES_EXPORTED = 64  # the most frequent argmax classes exported per class output
QUANTILES = 101  # reference quantiles kept per feature (percentiles 0..100) for KS
DECILES = np.linspace(0.1, 0.9, 9)  # the inner edges of the ten PSI bins
QUEUE_BATCHES = 64  # sampled batches waiting for the background thread, at most
MIN_ROWS = 100  # rows a window needs before it is scored (or the whole window, if smaller)
EPSILON = 1e-4  # the share an empty bin counts as, so that PSI stays finite
REPORT_SECONDS = 1.0  # statistics read more often than this get the same report
PROFILE_FORMAT = "tiffin-profile/1"
NUMERIC = {"INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"} | {
    "FP16",
    "FP32",
    "FP64",
}


# The measures.


def bin_counts(edges: np.ndarray, values: np.ndarray) -> np.ndarray:
    """How many `values` fall in each of the len(edges) + 1 bins (bin i: edges[i-1] <= x <
    edges[i])."""
    return np.bincount(np.searchsorted(edges, values, side="right"), minlength=len(edges) + 1)


def psi(expected: np.ndarray, actual: np.ndarray) -> float:
    """Population stability index of `actual` bin counts (or shares) against the `expected`
    shares: sum of (a - e) * ln(a / e) over the bins, empty bins counted as EPSILON."""
    total = actual.sum()
    if total == 0:
        return 0.0
    a = np.maximum(actual / total, EPSILON)
    e = np.maximum(expected, EPSILON)
    return float(np.sum((a - e) * np.log(a / e)))


def ks(reference: np.ndarray, sample: np.ndarray) -> float:
    """The two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical
    distribution functions of `reference` and `sample` (0: alike, 1: apart)."""
    if not len(reference) or not len(sample):
        return 0.0
    reference, sample = np.sort(reference), np.sort(sample)
    points = np.concatenate([reference, sample])
    below_r = np.searchsorted(reference, points, side="right") / len(reference)
    below_s = np.searchsorted(sample, points, side="right") / len(sample)
    return float(np.max(np.abs(below_r - below_s)))


# The reference profile.


@dataclass(frozen=True)
class FeatureProfile:
    """One feature of the reference: PSI bins and the quantiles KS compares with."""

    edges: np.ndarray  # inner bin edges: the deciles, duplicates removed
    shares: np.ndarray  # share of the reference rows in each bin (len(edges) + 1)
    quantiles: np.ndarray  # QUANTILES sorted values, percentiles 0 to 100

    @classmethod
    def of(cls, values: np.ndarray) -> FeatureProfile:
        """The profile of one feature's reference values (finite ones)."""
        values = values[np.isfinite(values)]
        if not len(values):
            raise ValueError("a feature has no finite values to profile")
        edges = np.unique(np.quantile(values, DECILES))
        shares = bin_counts(edges, values) / len(values)
        quantiles = np.quantile(values, np.linspace(0, 1, QUANTILES))
        return cls(edges, shares, quantiles)

    def scores(self, values: np.ndarray) -> tuple[float, float]:
        """PSI and KS of a window's values against this reference."""
        values = values[np.isfinite(values)]
        return psi(self.shares, bin_counts(self.edges, values)), ks(self.quantiles, values)


@dataclass(frozen=True)
class Profile:
    """A reference profile: each tensor's features, in element order."""

    tensors: dict[str, list[FeatureProfile]]
    rows: int  # reference rows it was made from

    @classmethod
    def of(cls, data: Mapping[str, np.ndarray]) -> Profile:
        """The profile of feature rows (tensor name -> rows x features)."""
        rows = min((len(a) for a in data.values()), default=0)
        if not rows:
            raise ValueError("the sample data holds no rows")
        tensors = {
            name: [FeatureProfile.of(a[:, i]) for i in range(a.shape[1])]
            for name, a in data.items()
        }
        return cls(tensors, rows)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": PROFILE_FORMAT,
                "rows": self.rows,
                "tensors": {
                    name: [
                        {
                            "edges": f.edges.tolist(),
                            "shares": f.shares.tolist(),
                            "quantiles": f.quantiles.tolist(),
                        }
                        for f in features
                    ]
                    for name, features in self.tensors.items()
                },
            },
            indent=1,
        )

    @classmethod
    def from_json(cls, text: str, source: str) -> Profile:
        """Reads a profile; ValueError naming `source` and what is wrong with it."""
        try:
            document = json.loads(text)
            if document.get("format") != PROFILE_FORMAT:
                raise ValueError(f"its format is not {PROFILE_FORMAT}")
            tensors = {}
            for name, features in document["tensors"].items():
                tensors[str(name)] = [_feature(f) for f in features]
            return cls(tensors, int(document["rows"]))
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{source} is not a drift profile: {exc}") from None


def _feature(document: dict) -> FeatureProfile:
    edges, shares, quantiles = (
        np.asarray(document[k], dtype=np.float64) for k in ("edges", "shares", "quantiles")
    )
    if len(shares) != len(edges) + 1 or not len(quantiles) or np.any(np.diff(edges) < 0):
        raise ValueError("a feature's edges, shares and quantiles do not agree")
    return FeatureProfile(edges, shares, np.sort(quantiles))


def monitored_tensors(config: ModelConfig) -> dict[str, TensorConfig]:
    """The tensors drift is judged on: numeric, with fixed dims (inputs, then outputs)."""
    return {
        t.name: t
        for t in [*config.inputs, *config.outputs]
        if t.datatype in NUMERIC and -1 not in t.dims
    }


def feature_count(tensor: TensorConfig) -> int:
    return min(int(np.prod(tensor.dims, dtype=np.int64)), FEATURES_PER_TENSOR)


def feature_rows(array: np.ndarray, batched: bool) -> np.ndarray:
    """The features of a tensor's rows: rows x (at most FEATURES_PER_TENSOR), float64, a
    copy. Without batching the whole tensor is one row."""
    rows = array.shape[0] if batched and array.ndim else 1
    return np.array(array.reshape(rows, -1)[:, :FEATURES_PER_TENSOR], dtype=np.float64)


# The monitor.


@dataclass
class DriftReport:
    """A version's drift at one moment, as the metrics export it."""

    samples: int = 0  # rows folded into the windows
    dropped: int = 0  # sampled batches dropped because the queue was full
    # (tensor, feature, psi, ks), for tensors the reference has, once enough rows are in.
    scores: list[tuple[str, int, float, float]] = field(default_factory=list)
    # (tensor, class, share of the window's rows whose argmax it is)
    class_shares: list[tuple[str, int, float]] = field(default_factory=list)


class _Ring:
    """The newest `capacity` rows of a tensor's features (their order does not matter)."""

    def __init__(self, capacity: int, width: int) -> None:
        self.data = np.zeros((capacity, width))
        self.filled = 0
        self._next = 0

    def add(self, rows: np.ndarray) -> None:
        capacity = len(self.data)
        rows = rows[-capacity:]
        end = self._next + len(rows)
        if end <= capacity:
            self.data[self._next : end] = rows
        else:
            split = capacity - self._next
            self.data[self._next :] = rows[:split]
            self.data[: end - capacity] = rows[split:]
        self._next = end % capacity
        self.filled = min(self.filled + len(rows), capacity)

    def values(self) -> np.ndarray:
        return self.data[: self.filled].copy()


@dataclass
class _Sample:
    """A sampled batch's rows: features by tensor, argmax classes by class output."""

    features: dict[str, np.ndarray]
    classes: dict[str, np.ndarray]
    rows: int


class DriftMonitor:
    """One model version's drift: `offer` on the hot path, a thread folding what it
    samples, and `report()` for the statistics."""

    def __init__(self, key: ModelKey, config: ModelConfig, model_dir: Path) -> None:
        assert config.monitoring is not None
        self.key = key
        self._settings = config.monitoring
        self._model_dir = model_dir
        self._batched = config.batching
        self._tensors = monitored_tensors(config)
        self._inputs = {t.name for t in config.inputs} & self._tensors.keys()
        self._outputs = {t.name for t in config.outputs}
        self._rate = self._settings.sample_rate
        self._queue: queue.Queue[_Sample | None] = queue.Queue(maxsize=QUEUE_BATCHES)
        self._lock = threading.Lock()  # guards what the thread folds, read by report()
        self._windows: dict[str, _Ring] = {}
        self._classes: dict[str, _Ring] = {}
        self._capture: dict[str, _Ring] = {}
        self._reference: Profile | None = None
        self._samples = 0
        self.dropped = 0  # counted on the hot path's thread only
        self._thread: threading.Thread | None = None
        self._report: tuple[float, DriftReport] | None = None

    def start(self) -> None:
        """Reads the reference (or prepares to capture it) and starts the folding thread.
        ValueError, in a sentence, when the reference does not fit the model."""
        settings = self._settings
        for name in settings.class_outputs:
            if name not in self._outputs:
                raise ValueError(f"monitoring.class_outputs names '{name}', which is not an output")
        path = self._model_dir / settings.reference
        if path.is_file():
            if not path.resolve().is_relative_to(self._model_dir.resolve()):
                raise ValueError(f"monitoring reference {path} leads out of the model folder")
            self._reference = Profile.from_json(path.read_text(), str(path))
            self._check(self._reference, str(path))
        elif not settings.capture_first:
            raise ValueError(
                f"monitoring reference {path} does not exist (write it with serverctl profile, "
                "or set monitoring.capture_first to take it from the first requests)"
            )
        else:
            self._capture = {
                name: _Ring(settings.capture_first, feature_count(t))
                for name, t in self._tensors.items()
            }
        window = settings.window
        self._windows = {name: _Ring(window, feature_count(t)) for name, t in self._tensors.items()}
        self._classes = {name: _Ring(window, 1) for name in settings.class_outputs}
        self._thread = threading.Thread(
            target=self._fold_all, name=f"drift-{self.key}", daemon=True
        )
        self._thread.start()

    def _check(self, profile: Profile, source: str) -> None:
        for name, features in profile.tensors.items():
            tensor = self._tensors.get(name)
            if tensor is None:
                raise ValueError(
                    f"{source} profiles '{name}', which is not a numeric tensor with fixed dims "
                    f"of model '{self.key.name}'"
                )
            if len(features) != feature_count(tensor):
                raise ValueError(
                    f"{source} profiles {len(features)} features of '{name}', which has "
                    f"{feature_count(tensor)} (dims {tensor.dims}, at most {FEATURES_PER_TENSOR})"
                )

    def stop(self) -> None:
        """Stops the folding thread (what is queued is folded first)."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def offer(
        self,
        requests: Sequence[InferenceRequest],
        outputs: Mapping[str, np.ndarray],
        failed: Container[int] = (),
    ) -> None:
        """A finished batch (its requests, the outputs of all its rows, the indexes of the
        requests that failed): the requests drawn at `sample_rate` are copied and queued,
        or dropped when the queue is full. Called by the thread that ran the batch: never blocks."""
        draw = random.random
        chosen = [i for i in range(len(requests)) if draw() < self._rate and i not in failed]
        if not chosen:
            return
        rows_of = self._batched  # whether each tensor's first dim is its rows
        chosen_rows: np.ndarray | slice = slice(None)  # the chosen requests' rows of outputs
        if rows_of and len(requests) > 1:
            starts = np.cumsum([0, *(r.batch_size for r in requests)])
            # Outputs without a row per item failed their requests.
            outputs = {n: a for n, a in outputs.items() if a.shape[:1] == (starts[-1],)}
            if len(chosen) < len(requests):
                chosen_rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in chosen])
        features: dict[str, np.ndarray] = {}
        for name in self._inputs:
            arrays = [requests[i].inputs[name] for i in chosen if name in requests[i].inputs]
            if arrays:
                if rows_of:
                    features[name] = feature_rows(np.concatenate(arrays), True)
                else:
                    features[name] = np.concatenate([feature_rows(a, False) for a in arrays])
        classes: dict[str, np.ndarray] = {}
        for name, array in outputs.items():
            array = array[chosen_rows]  # a copy when some rows are left out
            if name in self._tensors:
                features[name] = feature_rows(array, rows_of)
            if name in self._classes:
                flat = array.reshape(len(array) if rows_of else 1, -1)
                classes[name] = np.argmax(flat, axis=1)[:, None]
        rows = max((len(a) for a in features.values()), default=0)
        sample = _Sample(features, classes, rows)
        try:
            self._queue.put_nowait(sample)
        except queue.Full:
            self.dropped += 1

    def _fold_all(self) -> None:
        while (sample := self._queue.get()) is not None:
            try:
                self._fold(sample)
            except Exception:  # a bug here must not stop the monitoring
                log.exception("%s: drift sample could not be folded", self.key)

    def _fold(self, sample: _Sample) -> None:
        with self._lock:
            for name, rows in sample.features.items():
                window = self._windows.get(name)
                if window is not None and rows.shape[1] == window.data.shape[1]:
                    window.add(rows)
            for name, found in sample.classes.items():
                self._classes[name].add(found.astype(np.float64))
            self._samples += sample.rows
            if self._reference is None and self._capture:
                for name, rows in sample.features.items():
                    if name in self._capture:
                        self._capture[name].add(rows)
                if min(r.filled for r in self._capture.values()) >= self._settings.capture_first:
                    data = {name: r.values() for name, r in self._capture.items()}
                    self._capture = {}
                    self._reference = Profile.of(data)
                    log.info(
                        "%s: drift reference captured from %d rows",
                        self.key,
                        self._settings.capture_first,
                    )

    def report(self) -> DriftReport:
        """Counts, scores and class shares now (computed at most once per REPORT_SECONDS)."""
        now = time.monotonic()
        if self._report is not None and now - self._report[0] < REPORT_SECONDS:
            return self._report[1]  # its counts and scores agree: read at the same moment
        with self._lock:  # copies only: the measures are computed outside the lock
            reference = self._reference
            windows = {n: w.values() for n, w in self._windows.items()}
            classes = {n: w.values()[:, 0].astype(np.int64) for n, w in self._classes.items()}
            samples = self._samples
        report = DriftReport(samples, self.dropped)
        needed = min(MIN_ROWS, self._settings.window)
        for name, features in (reference.tensors if reference else {}).items():
            values = windows.get(name)
            if values is None or len(values) < needed:
                continue
            for i, feature in enumerate(features):
                report.scores.append((name, i, *feature.scores(values[:, i])))
        for name, found in classes.items():
            if not len(found):
                continue
            counts = np.bincount(found)
            top = np.argsort(-counts, kind="stable")[:CLASSES_EXPORTED]
            report.class_shares += [
                (name, int(c), counts[c] / len(found)) for c in sorted(top) if counts[c]
            ]
        self._report = (now, report)
        return report
