"""Checking a pipeline's config against the models its steps call, and completing it.

A pipeline's own config.yaml can only be checked for shape (which tensors connect);
whether the datatypes and shapes agree needs the step models' configs, so this runs
when the pipeline loads (and in `serverctl validate`), after its step models: first
`step_configs` finds the version each step calls, then `complete_pipeline` checks that they
connect.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from tiffin.protos.model_config import ModelConfig, PipelineStep, TensorConfig, dims_agree

#: What `step_configs` knows of a model a step calls: the configs of its versions that can
#: serve (loaded, or for `serverctl validate` those that would load), and why it has none if
#: that is known; None when there is no such model.
StepModel = tuple[Mapping[int, ModelConfig], str] | None


class StepNotReady(ValueError):
    """A step's model, or the version it pins, cannot serve; `model` names that model."""

    def __init__(self, message: str, model: str) -> None:
        super().__init__(message)
        self.model = model


def step_configs(config: ModelConfig, find: Callable[[str], StepModel]) -> dict[int, ModelConfig]:
    """The config of the model version each step of a pipeline calls, by step index: the
    version the step pins, or (version -1) the newest that can serve. `find(model)` tells what
    can serve. StepNotReady naming the step and the model when one cannot be called."""
    assert config.pipeline is not None, "step_configs() needs a pipeline config"
    configs = {}
    for i, step in enumerate(config.pipeline.steps):
        found = find(step.model)
        if found is None:
            raise StepNotReady(
                f"step {i + 1} calls model '{step.model}': no such model", step.model
            )
        versions, why = found
        version = max(versions) if step.version == -1 and versions else step.version
        if version not in versions:
            which = "no ready version" if step.version == -1 else f"no ready version {version}"
            raise StepNotReady(
                f"step {i + 1} calls model '{step.model}', which has {which}"
                + (f" ({why})" if why else ""),
                step.model,
            )
        configs[i] = versions[version]
    return configs


def _text(shape: list[int]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"


def _step_name(index: int, step: PipelineStep) -> str:
    return f"step {index + 1} (model '{step.model}')"


def _tensor(config: ModelConfig, name: str, kind: str) -> TensorConfig:
    tensors = config.inputs if kind == "input" else config.outputs
    for tensor in tensors:
        if tensor.name == name:
            return tensor
    names = ", ".join(t.name for t in tensors) or "none"
    raise ValueError(f"model '{config.name}' has no {kind} '{name}' (its {kind}s: {names})")


def complete_pipeline(config: ModelConfig, steps: Mapping[int, ModelConfig]) -> ModelConfig:
    """Returns `config` with max_batch_size, inputs and outputs filled in from the step
    models where it left them out, after checking that every connection agrees.

    `steps` maps each step's index to the config of the model version it will call.
    Raises ValueError with a sentence naming the step, the tensor and both sides.
    """
    pipeline = config.pipeline
    assert pipeline is not None, "complete_pipeline() needs a pipeline config"
    step_batching = [steps[i].batching for i in range(len(pipeline.steps))]

    max_batch_size = config.max_batch_size
    if max_batch_size is None:
        max_batch_size = min((steps[i].max_batch_size or 0) for i in range(len(pipeline.steps)))
    batching = bool(max_batch_size)
    if batching:
        for i, step in enumerate(pipeline.steps):
            limit = steps[i].max_batch_size or 0
            if limit < max_batch_size:
                raise ValueError(
                    f"{_step_name(i, step)} batches at most {limit} row(s), but the pipeline's "
                    f"max_batch_size is {max_batch_size}; lower the pipeline's or raise the model's"
                )

    # The full shape (with any batch dimension) and datatype of each pipeline tensor.
    known: dict[str, tuple[str, list[int], str]] = {}  # tensor -> (datatype, shape, where)
    for tensor in config.inputs:
        known[tensor.name] = (
            tensor.datatype,
            tensor.full_dims(batching),
            f"pipeline input '{tensor.name}'",
        )
    for i, step in enumerate(pipeline.steps):
        for step_output, tensor_name in step.outputs.items():
            try:
                found = _tensor(steps[i], step_output, "output")
            except ValueError as exc:
                raise ValueError(f"{_step_name(i, step)}: {exc}") from None
            known[tensor_name] = (
                found.datatype,
                found.full_dims(step_batching[i]),
                f"{_step_name(i, step)} output '{step_output}'",
            )

    inputs = list(config.inputs)
    declared_inputs = {t.name for t in inputs}
    for i, step in enumerate(pipeline.steps):
        model = steps[i]
        for step_input in model.inputs:
            if step_input.name not in step.inputs and not step_input.optional:
                raise ValueError(
                    f"{_step_name(i, step)}: the model's input '{step_input.name}' is not fed; "
                    "map it in the step's inputs"
                )
        for step_input, tensor_name in step.inputs.items():
            try:
                wanted = _tensor(model, step_input, "input")
            except ValueError as exc:
                raise ValueError(f"{_step_name(i, step)}: {exc}") from None
            wanted_shape = wanted.full_dims(step_batching[i])
            if tensor_name not in known:  # a pipeline input the config leaves to be derived
                known[tensor_name] = (
                    wanted.datatype,
                    wanted_shape,
                    f"pipeline input '{tensor_name}'",
                )
                if tensor_name not in declared_inputs:
                    dims = wanted_shape[1:] if batching else wanted_shape
                    inputs.append(
                        TensorConfig(name=tensor_name, datatype=wanted.datatype, dims=dims)
                    )
                    declared_inputs.add(tensor_name)
                continue
            datatype, shape, where = known[tensor_name]
            if datatype != wanted.datatype:
                raise ValueError(
                    f"{_step_name(i, step)} input '{step_input}' is {wanted.datatype}, but it "
                    f"reads '{tensor_name}', which is {datatype} ({where})"
                )
            if not dims_agree(shape, wanted_shape):
                raise ValueError(
                    f"{_step_name(i, step)} input '{step_input}' has shape "
                    f"{_text(wanted_shape)}, but it reads '{tensor_name}' with shape "
                    f"{_text(shape)} ({where})"
                )

    produced = pipeline.produced()
    consumed = pipeline.consumed()
    outputs = list(config.outputs)
    if not outputs:  # what no step reads is what the pipeline answers
        for tensor_name in produced:
            if tensor_name not in consumed:
                datatype, shape, _ = known[tensor_name]
                dims = shape[1:] if batching else shape
                outputs.append(TensorConfig(name=tensor_name, datatype=datatype, dims=dims))
    for tensor in outputs:
        datatype, shape, where = known[tensor.name]
        declared = tensor.full_dims(batching)
        if datatype != tensor.datatype or not dims_agree(shape, declared):
            raise ValueError(
                f"pipeline output '{tensor.name}' is declared {tensor.datatype} "
                f"{_text(declared)}, but {where} is {datatype} {_text(shape)}"
            )
    return config.model_copy(
        update={"max_batch_size": max_batch_size, "inputs": inputs, "outputs": outputs}
    )
