"""The signature of a PyTorch model's forward: what it takes and returns, read from a
TorchScript module or a torch.export program (argument names, graph metadata, whether the
tensors share a batch dimension); config.yaml checked against it and, for a torch.export
program, completed from it (datatypes, dims, max_batch_size); and whether the forward writes
into its inputs.

Nothing here imports torch at import time; what needs it takes the module as an argument.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Literal

from tiffin.protos.model_config import ModelConfig, TensorConfig, dims_within

from .torch_formats import wire_type

# --- what a model's forward takes and returns --------------------------------------------


@dataclass(frozen=True)
class Argument:
    """One argument of the model's forward."""

    name: str
    required: bool  # no default value
    keyword: bool  # passed by name (else by position)
    tensor: TensorConfig | None = None  # datatype and full dims, where the file records them
    problem: str = ""  # why the backend cannot pass it (not a tensor), if it cannot


@dataclass(frozen=True)
class Returns:
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
class Signature:
    arguments: tuple[Argument, ...]
    returns: Returns
    batch: _Batch | None = None  # known for torch.export programs only


def torchscript_signature(torch: Any, module: Any) -> Signature:
    schema = module.forward.schema
    arguments = []
    for arg in schema.arguments[1:]:  # [0] is self
        kind = arg.type
        if isinstance(kind, torch.OptionalType):
            kind = kind.getElementType()
        problem = "" if isinstance(kind, torch.TensorType) else f"is {arg.type}, not a Tensor"
        arguments.append(
            Argument(arg.name, not arg.has_default_value(), keyword=True, problem=problem)
        )
    if len(schema.returns) != 1:
        raise ValueError(f"the model's forward returns {len(schema.returns)} values: {schema}")
    kind = schema.returns[0].type
    described = str(kind)
    tensor = torch.TensorType
    if isinstance(kind, tensor):
        returns = Returns("tensor", described, count=1)
    elif isinstance(kind, torch.TupleType) and all(isinstance(e, tensor) for e in kind.elements()):
        returns = Returns("sequence", described, count=len(kind.elements()))
    elif isinstance(kind, torch.ListType) and isinstance(kind.getElementType(), tensor):
        returns = Returns("sequence", described)
    elif (
        isinstance(kind, torch.DictType)
        and isinstance(kind.getKeyType(), torch.StringType)
        and isinstance(kind.getValueType(), tensor)
    ):
        returns = Returns("dict", described)
    else:
        raise ValueError(
            f"the model's forward returns {described}; the torch backend serves a Tensor, a "
            "tuple or list of Tensors, or a Dict[str, Tensor]"
        )
    return Signature(tuple(arguments), returns)


def returns_from_spec(spec: Any, tensors: tuple[TensorConfig, ...] = ()) -> Returns:
    """The output structure of an exported program or AOTInductor package (a pytree spec)."""
    if spec.is_leaf():
        return Returns("tensor", "a tensor", count=1, tensors=tensors)
    if any(not child.is_leaf() for child in spec.children()):
        raise ValueError(
            "the model returns nested structures; the torch backend serves a tensor, a tuple "
            "or list of tensors, or a dict of tensors"
        )
    if spec.type in (tuple, list):
        described = f"a {spec.type.__name__} of {spec.num_children} tensors"
        return Returns("sequence", described, count=spec.num_children, tensors=tensors)
    if spec.type is dict:
        keys = tuple(str(k) for k in spec.context)
        return Returns("dict", f"a dict with keys {', '.join(keys)}", keys=keys, tensors=tensors)
    raise ValueError(
        f"the model returns a {getattr(spec.type, '__name__', spec.type)}; the torch backend "
        "serves a tensor, a tuple or list of tensors, or a dict of tensors"
    )


def input_layout(in_spec: Any) -> tuple[int, list[str]]:
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


def export_signature(torch: Any, program: Any) -> Signature:
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    signature = program.graph_signature
    user_inputs = [s for s in signature.input_specs if s.kind == InputKind.USER_INPUT]
    positional, keywords = input_layout(program.call_spec.in_spec)
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
        datatype = wire_type(val.dtype, f"the program's {what} '{name}'")
        return TensorConfig(name=name, datatype=datatype, dims=_dims(val.shape))

    arguments = tuple(
        Argument(
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
    returns = returns_from_spec(
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
    return Signature(arguments, returns, batch)


# --- checking a config against a signature ----------------------------------------------


def check_inputs(declared: list[TensorConfig], arguments: tuple[Argument, ...]) -> None:
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


def check_outputs(declared: list[TensorConfig], returns: Returns) -> None:
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
    if not dims_within(given.dims, model_dims):
        shown = "[-1] + " if batch else ""
        raise ValueError(
            f"{what} '{given.name}' is declared with dims {given.dims} but the model's shape is "
            f"{found.dims} ({shown}dims expected to match {model_dims})"
        )
    return given


def complete_export(
    config: ModelConfig, signature: Signature, default_max_batch_size: int
) -> ModelConfig:
    """The config of a torch.export program, completed from its signature and checked against
    it; a batching program left without max_batch_size gets `default_max_batch_size` (or its
    batch dimension's upper bound if lower)."""
    batch = signature.batch or _Batch(False, reason="the model's shapes are unknown")
    max_batch = config.max_batch_size
    if max_batch is None:
        max_batch = min(default_max_batch_size, batch.upper or default_max_batch_size)
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
        check_inputs(config.inputs, signature.arguments)
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
        check_outputs(config.outputs, returns)
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


def torchscript_writes_inputs(module: Any) -> bool:
    """TorchScript's alias analysis: does anything write to an input or a view of one?"""
    try:
        graph = module.inlined_graph
        aliases = graph.alias_db()
        return any(aliases.has_writers(value) for value in list(graph.inputs())[1:])
    except (AttributeError, RuntimeError):  # no analysis available: assume it may
        return True


def export_writes_inputs(program: Any) -> bool:
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
