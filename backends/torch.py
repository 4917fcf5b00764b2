"""PyTorch backend: TorchScript modules, torch.export programs and AOTInductor packages, on
the CPU or one CUDA device.

Formats, told apart by what the file's zip archive holds (not by its name):
  model.pt2   a `torch.export.save` archive (recommended), loaded with `torch.export.load`,
              or an AOTInductor package (`torch._inductor.aoti_compile_and_package`)
  model.pt    a TorchScript module (`torch.jit.save`; deprecated upstream)

Parameters (config.yaml `parameters`):
  autocast      "float16" or "bfloat16": run the model under `torch.autocast` with that dtype
                (not for AOTInductor packages, whose kernels are compiled already); outputs
                are converted back to the datatypes config.yaml declares
  num_threads   `torch.set_num_threads` in the process running the instance; for
                `kind: inline` that is the server process, shared by every inline torch model.
                Left out, it follows the cores the server may use (backends/cpu_budget.py),
                shared by the model's CPU instances and the server, and ModelConfig shows it

Inputs are passed to the model's forward by argument name. Outputs: a returned tensor is the
one config output; a tuple or list fills the config outputs in their declared order; a dict
fills them by key. AOTInductor packages record no argument names, so their positional inputs
take the config inputs in declared order.

Completing config.yaml: for a torch.export program, what the config leaves out is read from the
program: input datatypes and dims (dynamic dims as -1), outputs named by their dict keys or
else OUTPUT__0, OUTPUT__1, ... (Triton's libtorch convention), and max_batch_size: a program
whose every input and output has the same dynamic first dimension batches, with
max_batch_size DEFAULT_MAX_BATCH_SIZE (or the dimension's exported upper bound if lower).
The first dimension must start at 0 or 1 (`torch.export.Dim("batch", min=1)`). What the config
declares is checked against the program: names, datatypes, and dims (fixed sizes must agree).
TorchScript modules and AOTInductor packages record no shapes: their config must declare
inputs and outputs, and max_batch_size defaults to 0; TorchScript names are still checked
against the forward's arguments.

Datatypes: BOOL, UINT8..64, INT8..64, FP16, FP32, FP64 and BF16 (as 16-bit words) cross
without conversion; BYTES has no torch tensor and is refused. An output may be declared with
another floating-point datatype than the model returns (FP32 for a bfloat16 or autocast
output): it is converted.

This module loads and runs models; torch_formats.py tells the file formats apart and holds the
datatype tables, torch_signature.py reads a model's signature and checks and completes
config.yaml against it.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig

from .base import Backend, BatchResult, Device, MissingDependency, reject_unknown_parameters
from .cpu_budget import (
    THREAD_NOTE,
    announce,
    cpu_instances,
    read_cpu_budget,
    threads_per_instance,
)
from .torch_formats import (
    PLATFORMS,
    TORCH_TYPES,
    Format,
    aoti_device_key,
    model_format,
    torch_dtype,
)
from .torch_signature import (
    Argument,
    Returns,
    Signature,
    check_inputs,
    check_outputs,
    complete_export,
    export_signature,
    export_writes_inputs,
    input_layout,
    returns_from_spec,
    torchscript_signature,
    torchscript_writes_inputs,
)

PARAMETERS = ("autocast", "num_threads", THREAD_NOTE)
AUTOCAST_DTYPES = ("float16", "bfloat16")

# As the onnxruntime backend (and Triton's): a batching model left without max_batch_size
# gets 4.
DEFAULT_MAX_BATCH_SIZE = 4

# torch.from_numpy warns (once per process) for arrays numpy marks read-only. Inputs reach
# the backend that way over request bytes; see TorchBackend._tensor for why that is safe.
_READ_ONLY_WARNING = "The given NumPy array is not writable"


def _import_torch() -> Any:
    try:
        import torch
    except ImportError as exc:
        raise MissingDependency(
            f"the torch backend needs PyTorch: pip install 'tiffin[torch]' (import torch: {exc})"
        ) from None
    return torch


@dataclass(frozen=True)
class _Settings:
    """The parameters, validated."""

    autocast: str | None = None
    num_threads: int | None = None


def _settings(config: ModelConfig, fmt: Format) -> _Settings:
    params = config.parameters
    reject_unknown_parameters(config, PARAMETERS, "torch")
    autocast = None
    if "autocast" in params:
        autocast = str(params["autocast"])
        if autocast not in AUTOCAST_DTYPES:
            raise ValueError(
                f"parameters.autocast must be one of {', '.join(AUTOCAST_DTYPES)}, "
                f"got '{params['autocast']}'"
            )
        if fmt == "aoti":
            raise ValueError(
                "parameters.autocast has no effect on an AOTInductor package, whose kernels are "
                "compiled already; compile it from a model in the dtype you want"
            )
    num_threads = None
    if "num_threads" in params:
        value = params["num_threads"]
        if isinstance(value, bool) or not str(value).isdigit() or int(value) < 1:
            raise ValueError(f"parameters.num_threads must be a whole number >= 1, got '{value}'")
        num_threads = int(value)
    return _Settings(autocast, num_threads)


# --- the backend ------------------------------------------------------------------------


def _check_device(torch: Any, device: Device) -> None:
    """MissingDependency when this torch cannot run on `device`."""
    if device.kind == "cpu":
        return
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise MissingDependency(
            f"this instance runs on GPU {device.id}, but torch.cuda.is_available() is false "
            f"(torch {torch.__version__}: {build}); use kind: cpu or a CUDA build of PyTorch"
        )
    if device.id >= torch.cuda.device_count():
        raise MissingDependency(
            f"this instance runs on GPU {device.id}, but torch sees only "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )


def _torch_device(torch: Any, device: Device) -> Any:
    _check_device(torch, device)
    return torch.device("cpu") if device.kind == "cpu" else torch.device("cuda", device.id)


def _thread_defaults(config: ModelConfig) -> ModelConfig:
    """`config` with num_threads chosen for the cores its instances may use, when it leaves
    it out: torch's own default is every core of the machine, which fights the other
    instances and the server on a smaller share of it."""
    params = {k: v for k, v in config.parameters.items() if k != THREAD_NOTE}
    if "num_threads" in params:
        return config.model_copy(update={"parameters": params})
    budget = read_cpu_budget()
    instances = cpu_instances(config.instance_group)
    threads = threads_per_instance(budget.usable, instances)
    params["num_threads"] = str(threads)
    plural = "s" if instances != 1 else ""
    params[THREAD_NOTE] = (
        f"num_threads chosen by Tiffin: {budget.describe()}, shared by {instances} CPU "
        f"instance{plural} and the server"
    )
    announce(
        config.name,
        f"model '{config.name}': {threads} torch thread{'s' if threads != 1 else ''} per "
        f"instance ({budget.usable} usable core{'s' if budget.usable != 1 else ''}, "
        f"{instances} instance{plural})",
    )
    return config.model_copy(update={"parameters": params})


class TorchBackend(Backend):
    """Runs `model.pt2` (torch.export or AOTInductor) or `model.pt` (TorchScript) with
    PyTorch, in inference mode."""

    name = "torch"
    model_filenames = ("model.pt2", "model.pt")
    may_run_inline = True  # exported programs run no user code; kernels compute without the GIL

    def __init__(self) -> None:
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._positional: list[str] = []
        self._keywords: list[str] = []
        self._returns: Returns | None = None
        self._output_names: list[str] = []
        self._datatypes: dict[str, str] = {}
        self._dtypes: dict[str, Any] = {}
        self._autocast: str | None = None
        self._may_write_inputs = True

    @classmethod
    def complete_config(cls, config: ModelConfig, model_path: Path) -> ModelConfig:
        """Fills what a torch.export program records (see the module docstring) and checks the
        config against the file; TorchScript and AOTInductor configs must declare their
        tensors. Raises ValueError naming both sides of a mismatch."""
        fmt = model_format(model_path)
        _settings(config, fmt)
        config = _thread_defaults(config)
        for t in [*config.inputs, *config.outputs]:
            if t.datatype not in TORCH_TYPES:
                raise ValueError(
                    f"tensor '{t.name}' is declared {t.datatype}, which torch tensors cannot "
                    f"hold; declare one of {', '.join(TORCH_TYPES)}"
                )
        update: dict[str, Any] = {
            "backend": cls.name,
            "platform": config.platform or PLATFORMS[fmt],
        }
        torch = _import_torch()
        if fmt == "export":
            program = _load_program(torch, model_path)
            signature = export_signature(torch, program)
            completed = complete_export(config, signature, DEFAULT_MAX_BATCH_SIZE)
            return completed.model_copy(update=update)
        kind = "a TorchScript module" if fmt == "torchscript" else "an AOTInductor package"
        if fmt == "torchscript":
            # Loading reads the weights too (no lighter way to the forward's signature), but
            # it is quick, and mismatches then show at repository read, not at first load.
            module = _load_torchscript(torch, model_path, "cpu")
            signature = torchscript_signature(torch, module)
            takes = ", ".join(a.name for a in signature.arguments)
            returns = signature.returns.described
        else:
            takes = returns = "unrecorded"
        for what, tensors, shown in (
            ("inputs", config.inputs, f"its forward takes: {takes}"),
            ("outputs", config.outputs, f"its forward returns: {returns}"),
        ):
            if not tensors:
                raise ValueError(
                    f"{model_path.name} is {kind}, which records no tensor shapes or datatypes, "
                    f"so config.yaml must declare its {what} (name, datatype, dims; {shown}); "
                    "a torch.export program (torch.export.save) would let them be read instead"
                )
        if fmt == "torchscript":
            check_inputs(config.inputs, signature.arguments)
            check_outputs(config.outputs, signature.returns)
        return config.model_copy(update={**update, "max_batch_size": config.max_batch_size or 0})

    @classmethod
    def check_devices(cls, config: ModelConfig, devices: Sequence[Device]) -> None:
        """MissingDependency when an instance runs on a GPU that this torch cannot use."""
        if any(d.kind == "gpu" for d in devices):
            torch = _import_torch()
            for device in devices:
                _check_device(torch, device)

    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        """Loads the model onto the CPU or `cuda:<id>` and checks its signature against the
        config once more (AOTInductor packages are only checked here)."""
        torch = self._torch = _import_torch()
        path = self.model_path(config, version_dir)
        fmt = model_format(path)
        settings = _settings(config, fmt)
        self._device = _torch_device(torch, device)
        if settings.num_threads is not None:
            torch.set_num_threads(settings.num_threads)
        self._autocast = settings.autocast
        if fmt == "torchscript":
            module = _load_torchscript(torch, path, self._device)
            signature = torchscript_signature(torch, module)
            check_inputs(config.inputs, signature.arguments)
            self._keywords = [t.name for t in config.inputs]
            self._may_write_inputs = torchscript_writes_inputs(module)
        elif fmt == "export":
            from torch.export.passes import move_to_device_pass

            # Also rewrites devices burnt into the graph (a program exported on another device).
            program = move_to_device_pass(_load_program(torch, path), self._device)
            signature = export_signature(torch, program)
            check_inputs(config.inputs, signature.arguments)
            self._positional = [a.name for a in signature.arguments if not a.keyword]
            self._keywords = [a.name for a in signature.arguments if a.keyword]
            self._may_write_inputs = export_writes_inputs(program)
            module = program.module()
        else:
            module, signature = self._load_aoti(torch, config, path, device)
            # Compiled code cannot be inspected for writes to its inputs: assume it may.
            self._may_write_inputs = True
        check_outputs(config.outputs, signature.returns)
        self._module = module
        self._returns = signature.returns
        self._output_names = [t.name for t in config.outputs]
        self._datatypes = {t.name: t.datatype for t in [*config.inputs, *config.outputs]}
        self._dtypes = {
            t.name: torch_dtype(torch, t.datatype, f"output '{t.name}'") for t in config.outputs
        }
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)

    def _load_aoti(
        self, torch: Any, config: ModelConfig, path: Path, device: Device
    ) -> tuple[Any, Signature]:
        compiled_for = aoti_device_key(path)
        wanted = "cpu" if device.kind == "cpu" else "cuda"
        if compiled_for is not None and compiled_for != wanted:
            raise ValueError(
                f"{path.name} is an AOTInductor package compiled for {compiled_for}, but this "
                f"instance runs on {self._device}; compile it for {wanted} or change the "
                "instance group's kind"
            )
        from torch._inductor import aoti_load_package
        from torch.utils import _pytree as pytree

        index = self._device.index if self._device.type == "cuda" else -1
        module = aoti_load_package(str(path), device_index=index)
        in_spec, out_spec = (pytree.treespec_loads(s) for s in module.loader.get_call_spec())
        positional, keywords = input_layout(in_spec)
        by_position = [t.name for t in config.inputs if t.name not in keywords]
        if len(by_position) != positional:
            raise ValueError(
                f"the AOTInductor package's forward takes {positional} positional tensor(s), "
                f"which take the config inputs in declared order, but config.yaml declares "
                f"{len(by_position)} ({', '.join(by_position) or 'none'})"
            )
        self._positional, self._keywords = by_position, keywords
        arguments = tuple(
            Argument(n, required=True, keyword=n in keywords) for n in by_position + keywords
        )
        return module, Signature(arguments, returns_from_spec(out_spec))

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Runs one batch in inference mode (under autocast if configured), inputs passed by
        name, outputs named as config.yaml declares them."""
        return self.infer_batch(inputs, outputs, []).outputs

    def infer_batch(
        self, inputs: dict[str, np.ndarray], outputs: list[str], rows: list[int]
    ) -> BatchResult:
        """`infer`, telling apart the time spent moving tensors onto the device and back
        (on a GPU, the host-device copies that Triton counts as compute input and output)."""
        torch = self._torch
        on_gpu = self._device.type == "cuda"
        start = time.perf_counter_ns()
        tensors = {name: self._tensor(name, array) for name, array in inputs.items()}
        if on_gpu:  # copies may still be in flight: what follows must not wait for them
            torch.cuda.synchronize(self._device)
        copied_in = time.perf_counter_ns()
        missing = [n for n in self._positional if n not in tensors]
        if missing:
            raise ValueError(f"input(s) {', '.join(missing)} are missing from the request")
        args = [tensors[n] for n in self._positional]
        kwargs = {n: tensors[n] for n in self._keywords if n in tensors}
        autocast: Any = (
            torch.autocast(self._device.type, dtype=getattr(torch, self._autocast))
            if self._autocast
            else contextlib.nullcontext()
        )
        with torch.inference_mode(), autocast:
            result = self._module(*args, **kwargs)
        named = self._name_outputs(result, outputs)
        if on_gpu:  # kernels run asynchronously: the copy back would otherwise wait for them
            torch.cuda.synchronize(self._device)
        computed = time.perf_counter_ns()
        arrays = {name: self._array(name, named[name]) for name in outputs}
        done = time.perf_counter_ns()
        return BatchResult(arrays, input_ns=copied_in - start, output_ns=done - computed)

    def _tensor(self, name: str, array: np.ndarray) -> Any:
        """One input as a tensor on the instance's device: the same memory on the CPU, one
        host-to-device copy on a GPU."""
        torch = self._torch
        on_cpu = self._device.type == "cpu"
        # Arrays numpy marks read-only view request bytes the server does not own as a
        # buffer to write (protobuf's); writable ones belong to this batch. torch has no
        # read-only tensors, so a read-only array is shared only with a model that never
        # writes to its inputs (checked at load), and copied for one that may.
        if on_cpu and self._may_write_inputs and not array.flags.writeable:
            array = array.copy()
        if self._datatypes.get(name) == "BF16":  # 16-bit words (or ml_dtypes) to bfloat16
            tensor = torch.from_numpy(array.view(np.uint16)).view(torch.bfloat16)
        else:
            tensor = torch.from_numpy(array)
        return tensor if on_cpu else tensor.to(self._device)

    def _name_outputs(self, result: Any, requested: list[str]) -> dict[str, Any]:
        assert self._returns is not None, "infer() before load()"
        names = self._output_names
        if self._returns.kind == "tensor":
            return {names[0]: result}
        if self._returns.kind == "sequence":
            if not isinstance(result, (tuple, list)) or len(result) != len(names):
                count = len(result) if isinstance(result, (tuple, list)) else 1
                raise ValueError(
                    f"the model returned {count} value(s), matched to config outputs in "
                    f"declared order, but config.yaml declares {len(names)} ({', '.join(names)})"
                )
            return dict(zip(names, result, strict=True))
        if not isinstance(result, dict):
            raise ValueError(f"the model returned a {type(result).__name__}, not a dict")
        by_key = {str(k): v for k, v in result.items()}
        missing = [n for n in requested if n not in by_key]
        if missing:
            raise ValueError(
                f"the dict the model returned has no key {', '.join(missing)} "
                f"(its keys: {', '.join(by_key)})"
            )
        return by_key

    def _array(self, name: str, value: Any) -> np.ndarray:
        """One output as a numpy array of its declared datatype: the same memory on the CPU
        when the dtypes agree, one device-to-host copy from a GPU."""
        torch = self._torch
        if not isinstance(value, torch.Tensor):
            raise ValueError(
                f"the model's output '{name}' is a {type(value).__name__}, not a tensor"
            )
        wanted = self._dtypes[name]
        if value.dtype != wanted:
            # Autocast leaves float16/bfloat16 where the model declares float32: convert.
            if not (value.dtype.is_floating_point and wanted.is_floating_point):
                raise ValueError(
                    f"the model's output '{name}' is {str(value.dtype).removeprefix('torch.')} "
                    f"but config.yaml declares {self._datatypes[name]}"
                )
            value = value.to(wanted)
        value = value.detach().cpu()  # no-ops for CPU inference tensors
        if wanted == torch.bfloat16:
            return value.view(torch.uint16).numpy().view(DATATYPES["BF16"].numpy)
        array: np.ndarray = value.numpy()
        return array

    def unload(self) -> None:
        self._module = None
        if self._device is not None and self._device.type == "cuda":
            self._torch.cuda.empty_cache()


def _load_torchscript(torch: Any, path: Path, device: Any) -> Any:
    try:
        module = torch.jit.load(str(path), map_location=device)
    except Exception as exc:  # torch raises RuntimeError and friends for unreadable files
        raise ValueError(f"torch.jit.load cannot read {path}: {exc}") from None
    return module.eval()


def _load_program(torch: Any, path: Path) -> Any:
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # deserialisation raises several exception types
        raise ValueError(f"torch.export.load cannot read {path}: {exc}") from None
