"""Post-processing: probabilities [n, classes] -> the top_k labels (BYTES) and scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tiffin.backends import Backend, Device
from tiffin.protos.model_config import ModelConfig


class TopLabels(Backend):
    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        self.labels = np.array(str(config.parameters["labels"]).split(","), dtype=np.object_)
        self.top_k = int(config.parameters["top_k"])

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        probabilities = inputs["probabilities"]
        # Stable sort on the negated scores: ties keep the label order.
        best = np.argsort(-probabilities, axis=1, kind="stable")[:, : self.top_k]
        return {
            "labels": self.labels[best],
            "scores": np.take_along_axis(probabilities, best, axis=1),
        }
