"""`serverctl profile MODEL_DIR --data FILE --output profile.json`: the reference profile that
drift monitoring (config.yaml `monitoring:`) compares traffic with, from sample data.

The data is rows of the model's tensors: an .npz holding arrays named as its inputs (and
outputs, to judge those too), or an .npy holding its only input. Each array is shaped
(rows, *dims). Per feature (element position, at most 64 per tensor) the profile keeps the
decile bin edges and the share of rows in each bin (for PSI) and 101 quantiles (for KS).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from tiffin.protos.model_config import ModelConfig
from tiffin.scheduler.drift import FEATURES_PER_TENSOR, Profile, monitored_tensors

from ..repository import read_model

HELP = "Write a drift reference profile of a model's tensors from sample data."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", type=Path, help="The model's folder (with config.yaml).")
    parser.add_argument(
        "--data",
        type=Path,
        required=True,
        help="Sample rows: an .npz of arrays named as the model's tensors, or an .npy of its "
        "only input; each shaped (rows, *dims).",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="Where to write the profile (default: profile.json in the model folder).",
    )


def run(args: argparse.Namespace) -> int:
    output = args.output or args.model_dir / "profile.json"
    try:
        config = _config(args.model_dir)
        profile = Profile.of(_feature_data(config, args.data))
    except ValueError as exc:
        print(f"error: {exc}")
        return 1
    output.write_text(profile.to_json())
    tensors = ", ".join(f"{n} ({len(f)} features)" for n, f in profile.tensors.items())
    print(f"wrote {output}: {profile.rows} rows of {tensors}")
    return 0


def _config(model_dir: Path) -> ModelConfig:
    """The newest readable version's config (completed from its model file)."""
    spec = read_model(model_dir)
    versions = [v for v in spec.versions if v.config is not None]
    if not versions:
        problems = spec.problems or spec.environment_problems
        raise ValueError(problems[0] if problems else f"{model_dir} has no version to profile")
    config = max(versions, key=lambda v: v.version).config
    assert config is not None
    return config


def _feature_data(config: ModelConfig, data: Path) -> dict[str, np.ndarray]:
    """Rows x features of each tensor in the data file, checked against the config."""
    tensors = monitored_tensors(config)
    try:
        if data.suffix == ".npz":
            with np.load(data, allow_pickle=False) as found:
                arrays = {name: found[name] for name in found.files}
        else:
            if len(config.inputs) != 1:
                raise ValueError(
                    f"{data}: an .npy file holds one tensor, and the model has "
                    f"{len(config.inputs)} inputs; use an .npz naming each"
                )
            arrays = {config.inputs[0].name: np.load(data, allow_pickle=False)}
    except OSError as exc:
        raise ValueError(f"cannot read {data}: {exc}") from None
    features = {}
    for name, array in arrays.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise ValueError(
                f"{data} holds '{name}', which is not a numeric tensor with fixed dims of the "
                f"model (those are: {', '.join(tensors) or 'none'})"
            )
        if list(array.shape[1:]) != tensor.dims or array.dtype.kind not in "iuf":
            raise ValueError(
                f"{data}: '{name}' is {array.dtype} {list(array.shape)}; it needs numbers "
                f"shaped [rows, {', '.join(map(str, tensor.dims))}]"
            )
        rows = len(array)
        features[name] = array.reshape(rows, -1)[:, :FEATURES_PER_TENSOR].astype(np.float64)
    if not features:
        raise ValueError(f"{data} holds no arrays")
    return features
