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
                `kind: inline` that is the server process, shared by every inline torch model

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
"""

from __future__ import annotations

import contextlib
import json
import operator
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig, TensorConfig

from .base import Backend, Device

PARAMETERS = ("autocast", "num_threads")
AUTOCAST_DTYPES = ("float16", "bfloat16")

# As the onnxruntime backend (and Triton's): a batching model left without max_batch_size
# gets 4.
DEFAULT_MAX_BATCH_SIZE = 4

Format = Literal["torchscript", "export", "aoti"]

_PLATFORMS: dict[str, str] = {
    "torchscript": "pytorch_libtorch",
    "export": "torch_export",
    "aoti": "torch_export",
}

# torch dtype names (str(dtype) without "torch.") -> wire datatypes. BF16 crosses as its
# 16 bits (numpy has no bfloat16 of its own).
_WIRE_TYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
}
_TORCH_TYPES = {wire: name for name, wire in _WIRE_TYPES.items()}

# torch.from_numpy warns (once per process) for arrays numpy marks read-only. Inputs reach
# the backend that way over request bytes; see TorchBackend._tensor for why that is safe.
_READ_ONLY_WARNING = "The given NumPy array is not writable"


def _import_torch() -> Any:
    try:
        import torch
    except ImportError:
        raise RuntimeError("the torch backend needs PyTorch: pip install 'tiffin[torch]'") from None
    return torch


def model_format(path: Path) -> Format:
    """Which kind of PyTorch file `path` is, from the entries of its zip archive.

    Raises ValueError naming what the file is instead when it is none of the three.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(
            f"{path} is not a PyTorch archive ({exc}); save the model with torch.export.save "
            "(or torch.jit.save for TorchScript)"
        ) from None
    # Entries sit under one top folder named after the file when it was saved.
    entries = {name.split("/", 1)[1] for name in names if "/" in name}
    if any(e.startswith("data/aotinductor/") for e in entries):
        return "aoti"
    if any(e.startswith("models/") and e.endswith(".json") for e in entries):
        return "export"
    if "constants.pkl" in entries and any(e.startswith("code/") for e in entries):
        return "torchscript"
    if "data.pkl" in entries:
        raise ValueError(
            f"{path} was written by torch.save (weights or a pickled module), which holds no "
            "program to run; save the model with torch.export.save (or torch.jit.save)"
        )
    raise ValueError(
        f"{path} is a zip archive but neither a torch.export program, an AOTInductor package "
        "nor a TorchScript module"
    )


def _wire_type(dtype: Any, what: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _WIRE_TYPES:
        raise ValueError(
            f"{what} is {name}, which has no wire datatype; the torch backend serves "
            f"{', '.join(_WIRE_TYPES)} tensors"
        )
    return _WIRE_TYPES[name]


def _torch_dtype(torch: Any, datatype: str, what: str) -> Any:
    if datatype not in _TORCH_TYPES:
        raise ValueError(
            f"{what} is declared {datatype}, which torch tensors cannot hold; declare one of "
            f"{', '.join(_TORCH_TYPES)}"
        )
    return getattr(torch, _TORCH_TYPES[datatype])


@dataclass(frozen=True)
class _Settings:
    """The parameters, validated."""

    autocast: str | None = None
    num_threads: int | None = None


def _settings(config: ModelConfig, fmt: Format) -> _Settings:
    params = config.parameters
    unknown = sorted(set(params) - set(PARAMETERS))
    if unknown:
        raise ValueError(
            f"parameters {', '.join(unknown)} are unknown to the torch backend; "
            f"it reads {', '.join(PARAMETERS)}"
        )
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


# --- what a model's forward takes and returns --------------------------------------------


@dataclass(frozen=True)
class _Argument:
    """One argument of the model's forward."""

    name: str
    required: bool  # no default value
    keyword: bool  # passed by name (else by position)
    tensor: TensorConfig | None = None  # datatype and full dims, where the file records them
    problem: str = ""  # why the backend cannot pass it (not a tensor), if it cannot


@dataclass(frozen=True)
class _Returns:
    """What the model's forward returns."""

    kind: Literal["tensor", "sequence", "dict"]
    described: str  # for messages, e.g. "Tuple[Tensor, Tensor]"
    count: int | None = None  # tensors in a sequence, where known before running
    keys: tuple[str, ...] | None = None  # keys of a dict, where known before running
    tensors: tuple[TensorConfig, ...] = ()  # named, with full dims, where the file records them


@dataclass(frozen=True)
class _Batch:
    """Whether every input and output shares one dynamic first dimension to batch on."""

    possible: bool
    upper: int | None = None  # the dimension's largest size, if bounded
    reason: str = ""  # why not, when not possible


@dataclass(frozen=True)
class _Signature:
    arguments: tuple[_Argument, ...]
    returns: _Returns
    batch: _Batch | None = None  # known for torch.export programs only


def _torchscript_signature(torch: Any, module: Any) -> _Signature:
    schema = module.forward.schema
    arguments = []
    for arg in schema.arguments[1:]:  # [0] is self
        kind = arg.type
        if isinstance(kind, torch.OptionalType):
            kind = kind.getElementType()
        problem = "" if isinstance(kind, torch.TensorType) else f"is {arg.type}, not a Tensor"
        arguments.append(
            _Argument(arg.name, not arg.has_default_value(), keyword=True, problem=problem)
        )
    if len(schema.returns) != 1:
        raise ValueError(f"the model's forward returns {len(schema.returns)} values: {schema}")
    kind = schema.returns[0].type
    described = str(kind)
    tensor = torch.TensorType
    if isinstance(kind, tensor):
        returns = _Returns("tensor", described, count=1)
    elif isinstance(kind, torch.TupleType) and all(isinstance(e, tensor) for e in kind.elements()):
        returns = _Returns("sequence", described, count=len(kind.elements()))
    elif isinstance(kind, torch.ListType) and isinstance(kind.getElementType(), tensor):
        returns = _Returns("sequence", described)
    elif (
        isinstance(kind, torch.DictType)
        and isinstance(kind.getKeyType(), torch.StringType)
        and isinstance(kind.getValueType(), tensor)
    ):
        returns = _Returns("dict", described)
    else:
        raise ValueError(
            f"the model's forward returns {described}; the torch backend serves a Tensor, a "
            "tuple or list of Tensors, or a Dict[str, Tensor]"
        )
    return _Signature(tuple(arguments), returns)


def _returns_from_spec(spec: Any, tensors: tuple[TensorConfig, ...] = ()) -> _Returns:
    """The output structure of an exported program or AOTInductor package (a pytree spec)."""
    if spec.is_leaf():
        return _Returns("tensor", "a tensor", count=1, tensors=tensors)
    if any(not child.is_leaf() for child in spec.children()):
        raise ValueError(
            "the model returns nested structures; the torch backend serves a tensor, a tuple "
            "or list of tensors, or a dict of tensors"
        )
    if spec.type in (tuple, list):
        described = f"a {spec.type.__name__} of {spec.num_children} tensors"
        return _Returns("sequence", described, count=spec.num_children, tensors=tensors)
    if spec.type is dict:
        keys = tuple(str(k) for k in spec.context)
        return _Returns("dict", f"a dict with keys {', '.join(keys)}", keys=keys, tensors=tensors)
    raise ValueError(
        f"the model returns a {getattr(spec.type, '__name__', spec.type)}; the torch backend "
        "serves a tensor, a tuple or list of tensors, or a dict of tensors"
    )


def _input_layout(in_spec: Any) -> tuple[int, list[str]]:
    """How many positional tensors a program's forward takes, and its keyword names."""
    args_spec, kwargs_spec = in_spec.children()
    if any(not c.is_leaf() for c in [*args_spec.children(), *kwargs_spec.children()]):
        raise ValueError(
            "the model's forward takes nested inputs (lists, tuples or dicts of tensors); the "
            "torch backend passes every input as one tensor argument"
        )
    return args_spec.num_children, [str(k) for k in kwargs_spec.context or []]


def _dims(shape: Any) -> list[int]:
    """Sizes of a fake tensor's shape; symbolic (dynamic) ones are -1."""
    return [d if isinstance(d, int) else -1 for d in shape]


def _bound(value: Any) -> int | None:
    """A finite range bound as an int; None for infinity."""
    if isinstance(value, int):
        return value
    # sympy integers; torch's int_oo is no Integer (and claims to be finite)
    return int(value) if getattr(value, "is_Integer", False) else None


def _export_batch(torch: Any, program: Any, tensors: list[tuple[str, Any]]) -> _Batch:
    """Whether the named fake tensors all start with the same dynamic dimension from 0 or 1."""

    def first(val: Any) -> Any:
        size = val.shape[0] if val.dim() else None
        return size.node.expr if isinstance(size, torch.SymInt) else None

    symbol = first(tensors[0][1]) if tensors else None
    if symbol is None or not symbol.is_Symbol:
        symbol = None
    without = [name for name, val in tensors if symbol is None or first(val) != symbol]
    if without:
        return _Batch(
            False,
            reason=f"tensor(s) {', '.join(without)} of the program have no dynamic first "
            "dimension shared with the other tensors to batch on",
        )
    ranges = program.range_constraints.get(symbol)
    lower = _bound(ranges.lower) if ranges is not None else 0
    upper = _bound(ranges.upper) if ranges is not None else None
    if lower is not None and lower > 1:
        return _Batch(
            False,
            reason=f"the program's first dimension starts at {lower}, so a batch of one cannot "
            "run; export it with torch.export.Dim(min=1)",
        )
    return _Batch(True, upper)


def _export_signature(torch: Any, program: Any) -> _Signature:
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    signature = program.graph_signature
    user_inputs = [s for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    positional, keywords = _input_layout(program.call_spec.in_spec)
    call_signature = program.module_call_graph[0].signature
    forward_names = call_signature.forward_arg_names if call_signature is not None else None
    if forward_names and len(forward_names) >= positional:
        names = list(forward_names[:positional]) + keywords
    else:  # placeholders are named after the arguments
        names = [s.arg.name for s in user_inputs[:positional]] + keywords
    values = {n.name: n.meta.get("val") for n in program.graph.nodes if n.op == "placeholder"}
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    for node in output_node.args[0]:
        if hasattr(node, "meta"):
            values[node.name] = node.meta.get("val")

    def tensor(name: str, arg: Any, what: str) -> TensorConfig:
        val = values.get(arg.name) if isinstance(arg, TensorArgument) else None
        if not isinstance(val, torch.Tensor):
            raise ValueError(
                f"the program's {what} '{name}' is not a tensor ({arg}); the torch backend "
                "passes tensors only"
            )
        datatype = _wire_type(val.dtype, f"the program's {what} '{name}'")
        return TensorConfig(name=name, datatype=datatype, dims=_dims(val.shape))

    arguments = tuple(
        _Argument(
            name,
            required=True,
            keyword=i >= positional,
            tensor=tensor(name, spec.arg, "input"),
        )
        for i, (name, spec) in enumerate(zip(names, user_inputs, strict=True))
    )
    out_spec = program.call_spec.out_spec
    user_outputs = [s for s in signature.output_specs if s.kind == OutputKind.USER_OUTPUT]
    out_names = (
        [str(k) for k in out_spec.context]
        if out_spec.type is dict
        else [f"OUTPUT__{i}" for i in range(len(user_outputs))]
    )
    returns = _returns_from_spec(
        out_spec,
        tuple(
            tensor(name, spec.arg, "output")
            for name, spec in zip(out_names, user_outputs, strict=True)
        ),
    )
    batch = _export_batch(
        torch,
        program,
        [(a.name, values[s.arg.name]) for a, s in zip(arguments, user_inputs, strict=True)]
        + [(n, values[s.arg.name]) for n, s in zip(out_names, user_outputs, strict=True)],
    )
    return _Signature(arguments, returns, batch)


# --- checking a config against a signature ----------------------------------------------


def _check_inputs(declared: list[TensorConfig], arguments: tuple[_Argument, ...]) -> None:
    names = [a.name for a in arguments]
    by_name = {a.name: a for a in arguments}
    for t in declared:
        if t.name not in by_name:
            raise ValueError(
                f"config input '{t.name}' is not an argument of the model's forward "
                f"(it takes: {', '.join(names) or 'nothing'})"
            )
        arg = by_name[t.name]
        if arg.problem:
            raise ValueError(f"config input '{t.name}': the model's argument {arg.problem}")
        if t.optional and arg.required:
            raise ValueError(
                f"config input '{t.name}' is optional, but the model's forward has no default "
                "for it"
            )
    declared_names = {t.name for t in declared}
    missing = [a.name for a in arguments if a.required and a.name not in declared_names]
    if missing:
        raise ValueError(
            f"the model's forward takes {', '.join(missing)}, which config.yaml does not "
            f"declare as input(s) (it declares: {', '.join(t.name for t in declared) or 'none'})"
        )


def _check_outputs(declared: list[TensorConfig], returns: _Returns) -> None:
    listed = ", ".join(t.name for t in declared) or "none"
    if returns.kind == "dict":
        if returns.keys is not None:
            for t in declared:
                if t.name not in returns.keys:
                    raise ValueError(
                        f"config output '{t.name}' is not a key of the dict the model returns "
                        f"(its keys: {', '.join(returns.keys)})"
                    )
        return
    if returns.count is not None and len(declared) != returns.count:
        raise ValueError(
            f"the model returns {returns.described}, matched to config outputs in declared "
            f"order, but config.yaml declares {len(declared)} output(s) ({listed})"
        )


def _fits(given: list[int], model: list[int]) -> bool:
    return len(given) == len(model) and all(
        m == -1 or g == m for g, m in zip(given, model, strict=True)
    )


def _complete_tensor(
    given: TensorConfig | None, found: TensorConfig, batch: bool, what: str, convertible: bool
) -> TensorConfig:
    """The config entry of one tensor of a torch.export program: the declared one, checked
    against the program, or the program's own."""
    model_dims = found.dims[1:] if batch else found.dims
    if given is None:
        return found.model_copy(update={"dims": model_dims})
    if given.datatype != found.datatype:
        floats = {"FP16", "FP32", "FP64", "BF16"}
        if not (convertible and {given.datatype, found.datatype} <= floats):
            raise ValueError(
                f"{what} '{given.name}' is declared {given.datatype} but the model has "
                f"{found.datatype}"
            )
    if not _fits(given.dims, model_dims):
        shown = "[-1] + " if batch else ""
        raise ValueError(
            f"{what} '{given.name}' is declared with dims {given.dims} but the model's shape is "
            f"{found.dims} ({shown}dims expected to match {model_dims})"
        )
    return given


def _complete_export(config: ModelConfig, signature: _Signature) -> ModelConfig:
    batch = signature.batch or _Batch(False, reason="the model's shapes are unknown")
    max_batch = config.max_batch_size
    if max_batch is None:
        max_batch = min(DEFAULT_MAX_BATCH_SIZE, batch.upper or DEFAULT_MAX_BATCH_SIZE)
        max_batch = max_batch if batch.possible else 0
    elif max_batch > 0 and not batch.possible:
        raise ValueError(f"max_batch_size is {max_batch} but {batch.reason}; set max_batch_size: 0")
    elif max_batch > 0 and batch.upper is not None and max_batch > batch.upper:
        raise ValueError(
            f"max_batch_size is {max_batch} but the program's batch dimension allows at most "
            f"{batch.upper}"
        )
    batching = max_batch > 0
    found = {a.name: a.tensor for a in signature.arguments if a.tensor is not None}
    if config.inputs:
        _check_inputs(config.inputs, signature.arguments)
        for t in config.inputs:
            if t.optional:
                raise ValueError(
                    f"config input '{t.name}' is optional, but a torch.export program takes "
                    "every input on every call"
                )
        inputs = [
            _complete_tensor(t, found[t.name], batching, "input", False) for t in config.inputs
        ]
    else:
        inputs = [_complete_tensor(None, t, batching, "input", False) for t in found.values()]
    returns = signature.returns
    if config.outputs:
        _check_outputs(config.outputs, returns)
        by_key = {t.name: t for t in returns.tensors}
        pairs = (
            [(t, by_key[t.name]) for t in config.outputs]  # a dict: by key
            if returns.kind == "dict"
            else list(zip(config.outputs, returns.tensors, strict=True))  # by position
        )
        outputs = [_complete_tensor(t, f, batching, "output", True) for t, f in pairs]
    else:
        outputs = [_complete_tensor(None, t, batching, "output", True) for t in returns.tensors]
    return config.model_copy(
        update={"max_batch_size": max_batch, "inputs": inputs, "outputs": outputs}
    )


# --- whether a model writes into its inputs ---------------------------------------------


def _torchscript_writes_inputs(module: Any) -> bool:
    """TorchScript's alias analysis: does anything write to an input or a view of one?"""
    try:
        graph = module.inlined_graph
        aliases = graph.alias_db()
        return any(aliases.has_writers(value) for value in list(graph.inputs())[1:])
    except (AttributeError, RuntimeError):  # no analysis available: assume it may
        return True


def _export_writes_inputs(program: Any) -> bool:
    """Does an op of the program write to a user input or to a view of one? (torch.export
    keeps in-place ops in the graph; ops record in their schema what they write to.)"""
    from torch.export.graph_signature import InputKind

    signature = program.graph_signature
    if signature.user_inputs_to_mutate:
        return True
    aliased = {s.arg.name for s in signature.input_specs if s.kind == InputKind.USER_INPUT}
    for node in program.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target is operator.getitem:
            if getattr(node.args[0], "name", None) in aliased:
                aliased.add(node.name)
            continue
        schema = getattr(node.target, "_schema", None)
        if schema is None:  # a higher-order op: its subgraphs are not analysed
            if any(getattr(a, "name", None) in aliased for a in node.all_input_nodes):
                return True
            continue
        values = dict(zip((a.name for a in schema.arguments), node.args, strict=False))
        values.update(node.kwargs)
        for arg in schema.arguments:
            value = values.get(arg.name)
            items = value if isinstance(value, (list, tuple)) else [value]
            touched = any(getattr(v, "name", None) in aliased for v in items)
            if not touched or arg.alias_info is None:
                continue
            if arg.alias_info.is_write:
                return True
            aliased.add(node.name)  # a view of an input
    return False


# --- the backend ------------------------------------------------------------------------


def _torch_device(torch: Any, device: Device) -> Any:
    if device.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else "no CUDA device is visible"
        raise RuntimeError(
            f"this instance runs on GPU {device.id}, but torch.cuda.is_available() is false "
            f"(torch {torch.__version__}: {build}); use kind: cpu or a CUDA build of PyTorch"
        )
    if device.id >= torch.cuda.device_count():
        raise RuntimeError(
            f"this instance runs on GPU {device.id}, but torch sees only "
            f"{torch.cuda.device_count()} CUDA device(s)"
        )
    return torch.device("cuda", device.id)


def _aoti_device_key(path: Path) -> str | None:
    """The device an AOTInductor package was compiled for ("cpu", "cuda"), from its metadata."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/data/aotinductor/model/" in name and name.endswith("wrapper_metadata.json"):
                key = json.loads(archive.read(name)).get("AOTI_DEVICE_KEY")
                return str(key) if key is not None else None
    return None


class TorchBackend(Backend):
    """Runs `model.pt2` (torch.export or AOTInductor) or `model.pt` (TorchScript) with
    PyTorch, in inference mode."""

    name = "torch"
    model_filenames = ("model.pt2", "model.pt")

    def __init__(self) -> None:
        self._torch: Any = None
        self._module: Any = None
        self._device: Any = None
        self._positional: list[str] = []
        self._keywords: list[str] = []
        self._returns: _Returns | None = None
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
        for t in [*config.inputs, *config.outputs]:
            if t.datatype not in _TORCH_TYPES:
                raise ValueError(
                    f"tensor '{t.name}' is declared {t.datatype}, which torch tensors cannot "
                    f"hold; declare one of {', '.join(_TORCH_TYPES)}"
                )
        update: dict[str, Any] = {
            "backend": cls.name,
            "platform": config.platform or _PLATFORMS[fmt],
        }
        torch = _import_torch()
        if fmt == "export":
            program = _load_program(torch, model_path)
            completed = _complete_export(config, _export_signature(torch, program))
            return completed.model_copy(update=update)
        kind = "a TorchScript module" if fmt == "torchscript" else "an AOTInductor package"
        if fmt == "torchscript":
            # Loading reads the weights too (no lighter way to the forward's signature), but
            # it is quick, and mismatches then show at repository read, not at first load.
            module = _load_torchscript(torch, model_path, "cpu")
            signature = _torchscript_signature(torch, module)
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
            _check_inputs(config.inputs, signature.arguments)
            _check_outputs(config.outputs, signature.returns)
        return config.model_copy(update={**update, "max_batch_size": config.max_batch_size or 0})

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
            signature = _torchscript_signature(torch, module)
            _check_inputs(config.inputs, signature.arguments)
            self._keywords = [t.name for t in config.inputs]
            self._may_write_inputs = _torchscript_writes_inputs(module)
        elif fmt == "export":
            from torch.export.passes import move_to_device_pass

            # Also rewrites devices burnt into the graph (a program exported on another device).
            program = move_to_device_pass(_load_program(torch, path), self._device)
            signature = _export_signature(torch, program)
            _check_inputs(config.inputs, signature.arguments)
            self._positional = [a.name for a in signature.arguments if not a.keyword]
            self._keywords = [a.name for a in signature.arguments if a.keyword]
            self._may_write_inputs = _export_writes_inputs(program)
            module = program.module()
        else:
            module, signature = self._load_aoti(torch, config, path, device)
            # Compiled code cannot be inspected for writes to its inputs: assume it may.
            self._may_write_inputs = True
        _check_outputs(config.outputs, signature.returns)
        self._module = module
        self._returns = signature.returns
        self._output_names = [t.name for t in config.outputs]
        self._datatypes = {t.name: t.datatype for t in [*config.inputs, *config.outputs]}
        self._dtypes = {
            t.name: _torch_dtype(torch, t.datatype, f"output '{t.name}'") for t in config.outputs
        }
        warnings.filterwarnings("ignore", message=_READ_ONLY_WARNING, category=UserWarning)

    def _load_aoti(
        self, torch: Any, config: ModelConfig, path: Path, device: Device
    ) -> tuple[Any, _Signature]:
        compiled_for = _aoti_device_key(path)
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
        positional, keywords = _input_layout(in_spec)
        by_position = [t.name for t in config.inputs if t.name not in keywords]
        if len(by_position) != positional:
            raise ValueError(
                f"the AOTInductor package's forward takes {positional} positional tensor(s), "
                f"which take the config inputs in declared order, but config.yaml declares "
                f"{len(by_position)} ({', '.join(by_position) or 'none'})"
            )
        self._positional, self._keywords = by_position, keywords
        arguments = tuple(
            _Argument(n, required=True, keyword=n in keywords) for n in by_position + keywords
        )
        return module, _Signature(arguments, _returns_from_spec(out_spec))

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Runs one batch in inference mode (under autocast if configured), inputs passed by
        name, outputs named as config.yaml declares them."""
        torch = self._torch
        tensors = {name: self._tensor(name, array) for name, array in inputs.items()}
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
        return {name: self._array(name, named[name]) for name in outputs}

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
