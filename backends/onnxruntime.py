"""ONNX Runtime backend: CPU execution provider, CUDA execution provider on GPU instances.

Parameters (config.yaml `parameters`):
  intra_op_thread_count   threads inside one operator; 0 is ONNX Runtime's own default (every
                          core). Default: fitted to the cores this process may use
                          (`cpu_budget`), shared among the model's CPU instances
  inter_op_thread_count   threads across operators when execution_mode is parallel (default:
                          as intra_op_thread_count in parallel mode, unset otherwise)
  allow_spinning          whether idle pool threads spin ("1") or sleep ("0"); default: off
                          where the instances' threads and the frontend would share a core
  execution_mode          "sequential" (default) or "parallel"
  graph_optimization_level  "disable", "basic", "extended" or "all" (default)
  thread_defaults         written by Tiffin into the completed config: which of the three
                          thread settings it chose, and from what (a value given is replaced)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tiffin.protos.errors import InvalidInput
from tiffin.protos.model_config import ModelConfig, ParameterValue, TensorConfig, dims_within

from .base import Backend, Device, MissingDependency, reject_unknown_parameters
from .cpu_budget import (
    THREAD_NOTE,
    CpuBudget,
    announce,
    cpu_instances,
    read_cpu_budget,
    shares_cores,
    threads_per_instance,
)

log = logging.getLogger(__name__)

# ONNX type strings as onnxruntime reports them -> wire datatypes.
_ONNX_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}

PARAMETERS = (
    "intra_op_thread_count",
    "inter_op_thread_count",
    "allow_spinning",
    "execution_mode",
    "graph_optimization_level",
    "thread_defaults",
)

# Triton's ONNX Runtime backend completes max_batch_size to 4 for models whose
# every tensor has a variable first dimension; so do we.
DEFAULT_MAX_BATCH_SIZE = 4


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError as exc:
        raise MissingDependency(
            "the onnxruntime backend needs ONNX Runtime: pip install 'tiffin[cpu]' "
            f"(or 'tiffin[gpu]' for CUDA) (import onnxruntime: {exc})"
        ) from None
    return onnxruntime


def _check_cuda_provider(ort: Any) -> None:
    """MissingDependency unless this onnxruntime can run on CUDA."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        raise MissingDependency(
            "a GPU instance needs onnxruntime-gpu (pip install 'tiffin[gpu]'); the "
            f"installed onnxruntime offers {', '.join(ort.get_available_providers())}"
        )


def _dims(shape: list[Any]) -> list[int]:
    """ONNX shapes hold ints, symbolic names or None; the last two are variable (-1)."""
    return [d if isinstance(d, int) and d >= 0 else -1 for d in shape]


def _describe(args: list[Any], what: str) -> list[TensorConfig]:
    tensors = []
    for arg in args:
        if arg.type == "tensor(bfloat16)":
            raise ValueError(
                f"model {what} '{arg.name}' is bfloat16, which onnxruntime's Python API cannot "
                "exchange with numpy; export the model with FP16 or FP32 tensors"
            )
        if arg.type not in _ONNX_TYPES:
            raise ValueError(
                f"model {what} '{arg.name}' has type {arg.type}, which Tiffin cannot serve"
            )
        tensors.append(
            TensorConfig(name=arg.name, datatype=_ONNX_TYPES[arg.type], dims=_dims(arg.shape))
        )
    return tensors


def _complete_tensors(
    declared: list[TensorConfig],
    found: list[TensorConfig],
    batch: bool,
    what: str,
    require_all: bool,
) -> list[TensorConfig]:
    """Checks declared tensors against the model file and fills in what was left out."""
    by_name = {t.name: t for t in found}
    for t in declared:
        if t.name not in by_name:
            raise ValueError(
                f"{what} '{t.name}' is not in the model; the model's {what}s are "
                f"{', '.join(sorted(by_name))}"
            )
    declared_names = {t.name for t in declared}
    missing = [t.name for t in found if t.name not in declared_names]
    if declared and require_all and missing:
        raise ValueError(f"{what}s {', '.join(missing)} of the model are missing from the config")
    completed = []
    for model_t in found if not declared else [by_name[t.name] for t in declared]:
        model_dims = model_t.dims[1:] if batch else model_t.dims
        given = next((t for t in declared if t.name == model_t.name), None)
        if given is None:
            completed.append(model_t.model_copy(update={"dims": model_dims}))
            continue
        if given.datatype != model_t.datatype:
            raise ValueError(
                f"{what} '{given.name}' is declared {given.datatype} but the model has "
                f"{model_t.datatype}"
            )
        if not dims_within(given.dims, model_dims):
            shown = "[-1] + " if batch else ""
            raise ValueError(
                f"{what} '{given.name}' is declared with dims {given.dims} but the model's shape "
                f"is {model_t.dims} ({shown}dims expected to match {model_dims})"
            )
        completed.append(given)
    return completed


def _thread_count(params: dict[str, ParameterValue], name: str) -> int | None:
    """An explicit thread count, or None when the config leaves it out."""
    if name not in params:
        return None
    value = params[name]
    try:
        if isinstance(value, bool):
            raise ValueError
        count = int(value)
    except ValueError:
        count = -1
    if count < 0:
        raise ValueError(
            f"parameters.{name} must be a whole number >= 0 (0: ONNX Runtime's own default, "
            f"every core), got '{value}'"
        )
    return count


def _flag(params: dict[str, ParameterValue], name: str) -> bool | None:
    """An explicit on/off parameter ("1"/"0", true/false), or None when left out."""
    if name not in params:
        return None
    value = params[name]
    text = str(value).strip().lower()
    if text in ("1", "true"):
        return True
    if text in ("0", "false"):
        return False
    raise ValueError(f"parameters.{name} must be 1 or 0 (true or false), got '{value}'")


def thread_settings(
    config: ModelConfig, budget: CpuBudget
) -> tuple[dict[str, ParameterValue], str]:
    """`config.parameters` with the thread settings it leaves out chosen for `budget`, and a
    sentence saying what was chosen ("" when the config sets them all).

    intra_op_thread_count: `threads_per_instance(usable cores, CPU instances)`;
    inter_op_thread_count: the same in parallel execution mode (unset otherwise, where ONNX
    Runtime does not use it); allow_spinning: off when the instances' threads and the frontend
    would share a core. A GPU instance's CPU-side pool follows the same rule. Raises ValueError
    for a malformed explicit value.
    """
    params = {k: v for k, v in config.parameters.items() if k != THREAD_NOTE}
    instances = cpu_instances(config.instance_group)
    usable = budget.usable
    parallel = str(params.get("execution_mode", "sequential")) == "parallel"
    intra = _thread_count(params, "intra_op_thread_count")
    inter = _thread_count(params, "inter_op_thread_count")
    spinning = _flag(params, "allow_spinning")
    chosen: list[str] = []
    if intra is None:
        intra = threads_per_instance(usable, instances)
        params["intra_op_thread_count"] = str(intra)
        chosen.append("intra_op_thread_count")
    if inter is None and parallel:
        inter = threads_per_instance(usable, instances)
        params["inter_op_thread_count"] = str(inter)
        chosen.append("inter_op_thread_count")
    if spinning is None:
        # 0 means ONNX Runtime sizes the pool itself: about every core.
        busy = (intra or budget.affinity) + ((inter or budget.affinity) if parallel else 0)
        spinning = not shares_cores(usable, instances, busy)
        params["allow_spinning"] = "1" if spinning else "0"
        chosen.append("allow_spinning")
    if not chosen:
        return params, ""
    shared = f"shared by {instances} CPU instance{'s' if instances != 1 else ''} and the server"
    params[THREAD_NOTE] = f"{', '.join(chosen)} chosen by Tiffin: {budget.describe()}, {shared}"
    threads = f"{intra} intra-op thread{'s' if intra != 1 else ''}"
    if parallel:
        threads += f", {inter} inter-op thread{'s' if inter != 1 else ''}"
    explicit = [
        name
        for name in ("intra_op_thread_count", "inter_op_thread_count", "allow_spinning")
        if name in config.parameters
    ]
    sentence = (
        f"model '{config.name}': {threads} per instance ({usable} usable "
        f"core{'s' if usable != 1 else ''}, {instances} instance{'s' if instances != 1 else ''})"
        f", spinning {'on' if spinning else 'off'}"
    )
    if explicit:
        sentence += f"; from the config: {', '.join(explicit)}"
    return params, sentence


class OnnxRuntimeBackend(Backend):
    """Runs `model.onnx` with ONNX Runtime."""

    name = "onnxruntime"
    model_filenames = ("model.onnx",)
    may_run_inline = True  # its session runs no user code and computes without the GIL

    def __init__(self) -> None:
        self._session: Any = None
        self._string_inputs: set[str] = set()

    @classmethod
    def complete_config(cls, config: ModelConfig, model_path: Path) -> ModelConfig:
        ort = _import_ort()
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        options.intra_op_num_threads = 1
        options.log_severity_level = 4  # failures are reported below, once
        try:
            session = ort.InferenceSession(
                str(model_path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ValueError(f"onnxruntime cannot load {model_path}: {exc}") from None
        inputs = _describe(session.get_inputs(), "input")
        outputs = _describe(session.get_outputs(), "output")
        variable_first = all(t.dims and t.dims[0] == -1 for t in inputs + outputs)
        max_batch = config.max_batch_size
        if max_batch is None:
            max_batch = DEFAULT_MAX_BATCH_SIZE if variable_first else 0
        elif max_batch > 0 and not variable_first:
            fixed = [t.name for t in inputs + outputs if not t.dims or t.dims[0] != -1]
            raise ValueError(
                f"max_batch_size is {max_batch} but tensor(s) {', '.join(fixed)} of the model "
                "have no variable first dimension to batch on; set max_batch_size: 0"
            )
        batch = max_batch > 0
        reject_unknown_parameters(config, PARAMETERS, "onnxruntime")
        parameters, sentence = thread_settings(config, read_cpu_budget())
        announce(config.name, sentence)
        return config.model_copy(
            update={
                "backend": cls.name,
                "platform": config.platform or "onnxruntime_onnx",
                "max_batch_size": max_batch,
                "parameters": parameters,
                "inputs": _complete_tensors(
                    config.inputs, inputs, batch, "input", require_all=True
                ),
                "outputs": _complete_tensors(
                    config.outputs, outputs, batch, "output", require_all=False
                ),
            }
        )

    @classmethod
    def check_devices(cls, config: ModelConfig, devices: Sequence[Device]) -> None:
        """MissingDependency when an instance runs on a GPU and onnxruntime-gpu is missing."""
        if any(d.kind == "gpu" for d in devices):
            _check_cuda_provider(_import_ort())

    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        ort = _import_ort()
        options = ort.SessionOptions()
        # complete_config chose these already; a config that skipped it gets the same rule.
        params, _ = thread_settings(config, read_cpu_budget())
        options.intra_op_num_threads = int(params["intra_op_thread_count"])
        if "inter_op_thread_count" in params:
            options.inter_op_num_threads = int(params["inter_op_thread_count"])
        spinning = "1" if _flag(params, "allow_spinning") else "0"
        options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
        options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
        if str(params.get("execution_mode", "sequential")) == "parallel":
            options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        level = str(params.get("graph_optimization_level", "all"))
        levels = {
            "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        if level not in levels:
            raise ValueError(
                f"graph_optimization_level must be one of {', '.join(levels)}, got '{level}'"
            )
        options.graph_optimization_level = levels[level]
        if device.kind == "gpu":
            _check_cuda_provider(ort)
            providers: list[Any] = [("CUDAExecutionProvider", {"device_id": device.id})]
        else:
            providers = ["CPUExecutionProvider"]
        path = self.model_path(config, version_dir)
        self._session = ort.InferenceSession(str(path), options, providers=providers)
        if device.kind == "gpu" and "CUDAExecutionProvider" not in self._session.get_providers():
            raise RuntimeError(f"onnxruntime could not place the model on CUDA device {device.id}")
        self._string_inputs = {i.name for i in config.inputs if i.datatype == "BYTES"}

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        feed = {}
        for name, array in inputs.items():
            if name in self._string_inputs:
                array = _decode_strings(name, array)
            feed[name] = array
        results = self._session.run(outputs, feed)
        return dict(zip(outputs, results, strict=True))

    def unload(self) -> None:
        self._session = None


def _decode_strings(name: str, array: np.ndarray) -> np.ndarray:
    """onnxruntime string tensors take str; BYTES elements arrive as bytes."""
    decoded = np.empty(array.shape, dtype=np.object_)
    flat = decoded.reshape(-1)
    for i, item in enumerate(array.reshape(-1)):
        try:
            flat[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise InvalidInput(
                f"element {i} of input '{name}' is not valid UTF-8 text, which this "
                "ONNX model's string input needs"
            ) from None
    return decoded
