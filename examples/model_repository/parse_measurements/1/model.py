"""Pre-processing: JSON text such as {"sepal_length": 5.1, "sepal_width": 3.5,
"petal_length": 1.4, "petal_width": 0.2} -> FP32 features [4], one row per request row."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tiffin.backends import Backend, Device
from tiffin.protos.model_config import ModelConfig

FIELDS = ("sepal_length", "sepal_width", "petal_length", "petal_width")


class ParseMeasurements(Backend):
    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        pass  # nothing to load: the parsing is the model

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        rows = []
        for text in inputs["json"].reshape(-1):
            record = json.loads(text)  # a ValueError here fails only this request
            missing = [f for f in FIELDS if f not in record]
            if missing:
                raise ValueError(f"the measurements lack {', '.join(missing)}")
            rows.append([float(record[f]) for f in FIELDS])
        return {"features": np.asarray(rows, dtype=np.float32)}
