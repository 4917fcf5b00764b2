"""The four benchmark models, generated from fixed seeds, and the model repository that serves them.

ONNX opset 17, one FP32 input `INPUT0` and one FP32 output `OUTPUT0`, batch dimension first:

  mlp          [256]          3 x (Gemm 1024 + Relu), Gemm 16                  -> [16]
  cnn          [3, 64, 64]    3 x (Conv 3x3 pad 1, 32/64/128 ch + Relu + MaxPool 2x2),
                              GlobalAveragePool, Flatten, Gemm 10               -> [10]
  identity     [1024]         Identity (4 KiB per item)                        -> [1024]
  identity_1m  [262144]       Identity (1 MiB per item)                        -> [262144]
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

HELP = "Write the benchmark models and their config.yaml into a model repository."

OPSET = 17
# onnx 1.23 writes IR 14 by default, which onnxruntime 1.31 cannot load; opset 17 needs only 8.
IR_VERSION = 8
INPUT, OUTPUT = "INPUT0", "OUTPUT0"
DEFAULT_REPOSITORY = Path(__file__).resolve().parent / "models"
INSTANCE_KINDS = ("cpu", "inline")


@dataclass(frozen=True)
class ModelSpec:
    """What a client needs to know about a benchmark model: per-item input and output dims."""

    name: str
    input_dims: tuple[int, ...]
    output_dims: tuple[int, ...]
    seed: int

    def sample(self, batch: int = 1) -> np.ndarray:
        """A fixed FP32 input of `batch` items (seeded, so every client sends the same bytes)."""
        rng = np.random.default_rng(1000 + self.seed)
        return rng.standard_normal((batch, *self.input_dims)).astype(np.float32)

    @property
    def input_bytes(self) -> int:
        return 4 * int(np.prod(self.input_dims))


MODELS: dict[str, ModelSpec] = {
    "mlp": ModelSpec("mlp", (256,), (16,), seed=1),
    "cnn": ModelSpec("cnn", (3, 64, 64), (10,), seed=2),
    "identity": ModelSpec("identity", (1024,), (1024,), seed=3),
    "identity_1m": ModelSpec("identity_1m", (262144,), (262144,), seed=4),
}


def spec(name: str) -> ModelSpec:
    """The spec of a benchmark model; ValueError naming the known ones otherwise."""
    try:
        return MODELS[name]
    except KeyError:
        raise ValueError(f"unknown benchmark model '{name}'; known: {', '.join(MODELS)}") from None


def _onnx() -> Any:
    try:
        import onnx
    except ImportError:
        raise SystemExit(
            "generating the benchmark models needs onnx: pip install -e '.[bench]'"
        ) from None
    return onnx


def _he(rng: np.random.Generator, shape: tuple[int, ...], fan_in: int) -> np.ndarray:
    # He-scaled weights keep activations in a sane range through the Relu stack.
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)


def _mlp(rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    nodes, inits, prev, width = [], [], INPUT, 256
    for i, out in enumerate((1024, 1024, 1024, 16)):
        w, b = f"w{i}", f"b{i}"
        inits += [
            numpy_helper.from_array(_he(rng, (width, out), width), w),
            numpy_helper.from_array(np.zeros(out, np.float32) + 0.01, b),
        ]
        last = out == 16
        gemm_out = OUTPUT if last else f"gemm{i}"
        nodes.append(helper.make_node("Gemm", [prev, w, b], [gemm_out]))
        if not last:
            nodes.append(helper.make_node("Relu", [gemm_out], [f"relu{i}"]))
            prev = f"relu{i}"
        width = out
    return nodes, inits


def _cnn(rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    from onnx import helper, numpy_helper

    nodes, inits, prev, channels = [], [], INPUT, 3
    for i, out in enumerate((32, 64, 128)):
        w, b = f"conv{i}_w", f"conv{i}_b"
        inits += [
            numpy_helper.from_array(_he(rng, (out, channels, 3, 3), channels * 9), w),
            numpy_helper.from_array(np.zeros(out, np.float32), b),
        ]
        nodes += [
            helper.make_node(
                "Conv", [prev, w, b], [f"conv{i}"], kernel_shape=[3, 3], pads=[1, 1, 1, 1]
            ),
            helper.make_node("Relu", [f"conv{i}"], [f"relu{i}"]),
            helper.make_node(
                "MaxPool", [f"relu{i}"], [f"pool{i}"], kernel_shape=[2, 2], strides=[2, 2]
            ),
        ]
        prev, channels = f"pool{i}", out
    inits += [
        numpy_helper.from_array(_he(rng, (128, 10), 128), "fc_w"),
        numpy_helper.from_array(np.zeros(10, np.float32), "fc_b"),
    ]
    nodes += [
        helper.make_node("GlobalAveragePool", [prev], ["gap"]),
        helper.make_node("Flatten", ["gap"], ["flat"], axis=1),
        helper.make_node("Gemm", ["flat", "fc_w", "fc_b"], [OUTPUT]),
    ]
    return nodes, inits


def _identity(rng: np.random.Generator) -> tuple[list[Any], list[Any]]:
    from onnx import helper

    return [helper.make_node("Identity", [INPUT], [OUTPUT])], []


_BUILDERS = {"mlp": _mlp, "cnn": _cnn, "identity": _identity, "identity_1m": _identity}


def build(name: str) -> Any:
    """The ONNX ModelProto of a benchmark model; the same bytes on every call."""
    onnx = _onnx()
    from onnx import TensorProto, helper

    model_spec = spec(name)
    nodes, inits = _BUILDERS[name](np.random.default_rng(model_spec.seed))
    x = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["batch", *model_spec.input_dims])
    y = helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["batch", *model_spec.output_dims])
    graph = helper.make_graph(nodes, name, [x], [y], inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        ir_version=IR_VERSION,
        producer_name="tiffin-benchmarks",
    )
    onnx.checker.check_model(model)
    return model


@dataclass(frozen=True)
class RepositoryOptions:
    """The serving settings written into every model's config.yaml."""

    instance_kind: str = "cpu"
    instance_count: int = 1
    max_queue_delay_us: int = 0
    max_batch_size: int = 64
    thread_parameters: bool = True  # False: no intra_op_thread_count, the backend's default
    # True: exactly the config a user writes first (max_batch_size + dynamic_batching: {}),
    # everything else inferred or defaulted by the server; the fields above are then unused.
    user_config: bool = False


# What `run --side-by-side` serves as `tiffin` (the config a user writes) and as
# `tiffin-tuned` (the hand-tuned one: the model runs in the server process, one thread).
USER_CONFIG = RepositoryOptions(user_config=True)
TUNED_CONFIG = RepositoryOptions(instance_kind="inline")


def config_yaml(options: RepositoryOptions) -> str:
    """A model's config.yaml; the model file supplies inputs and outputs."""
    if options.user_config:
        # The backend is told from model.onnx; the batcher's delay and the threads default.
        return f"max_batch_size: {options.max_batch_size}\ndynamic_batching: {{}}\n"
    if options.instance_kind not in INSTANCE_KINDS:
        raise ValueError(
            f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, "
            f"got '{options.instance_kind}'"
        )
    parameters = "parameters:\n  intra_op_thread_count: 1\n" if options.thread_parameters else ""
    return (
        "backend: onnxruntime\n"
        f"max_batch_size: {options.max_batch_size}\n"
        "dynamic_batching:\n"
        f"  max_queue_delay_microseconds: {options.max_queue_delay_us}\n"
        "instance_group:\n"
        f"  - kind: {options.instance_kind}\n"
        f"    count: {options.instance_count}\n"
        f"{parameters}"
    )


def write_repository(
    root: Path, names: list[str], options: RepositoryOptions | None = None
) -> Path:
    """Writes `root/<name>/config.yaml` and `root/<name>/1/model.onnx` for each model.

    Model files are rewritten only when their bytes differ, so a repeated run leaves
    them alone; config.yaml always follows `options`.
    """
    options = options or RepositoryOptions()
    for name in names:
        data = build(name).SerializeToString()
        folder = root / name
        model_path = folder / "1" / "model.onnx"
        model_path.parent.mkdir(parents=True, exist_ok=True)
        if not model_path.exists() or model_path.read_bytes() != data:
            model_path.write_bytes(data)
        (folder / "config.yaml").write_text(config_yaml(options))
    return root


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated model names")
    parser.add_argument(
        "--model-repository", type=Path, default=DEFAULT_REPOSITORY, help="where to write"
    )
    add_repository_arguments(parser)


def add_repository_arguments(parser: argparse.ArgumentParser) -> None:
    """The config.yaml flags, shared with `run`."""
    parser.add_argument(
        "--instance-kind",
        choices=INSTANCE_KINDS,
        default="cpu",
        help="cpu: a worker process per instance; inline: the model runs in the server process",
    )
    parser.add_argument("--instance-count", type=int, default=1, help="instances per model")
    parser.add_argument(
        "--max-queue-delay-us",
        type=int,
        default=0,
        help="dynamic_batching.max_queue_delay_microseconds",
    )
    parser.add_argument(
        "--default-threads",
        action="store_true",
        help="leave intra_op_thread_count: 1 out of config.yaml, as a user's first config "
        "does: the backend chooses the threads (the limit then uses its choice too)",
    )


def repository_options(args: argparse.Namespace) -> RepositoryOptions:
    return RepositoryOptions(
        instance_kind=args.instance_kind,
        instance_count=args.instance_count,
        max_queue_delay_us=args.max_queue_delay_us,
        thread_parameters=not args.default_threads,
    )


def parse_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    for name in names:
        spec(name)
    return names


def main(args: argparse.Namespace) -> int:
    root = write_repository(
        args.model_repository, parse_names(args.models), repository_options(args)
    )
    print(root)
    return 0
