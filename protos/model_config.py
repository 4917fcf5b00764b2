"""The schema of a model's config.yaml, mirroring Triton's model_config.proto in snake_case.

Validated once when the repository is read and never mutated afterwards: a backend
that completes a config from the model file returns a new one (`model_copy`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator, model_validator

from .datatypes import DATATYPES, datatype

ParameterValue = str | bool | int | float


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)


class TensorConfig(_Frozen):
    """One model input or output."""

    name: str = Field(description="Tensor name, as the model file and clients know it.")
    datatype: str = Field(
        validation_alias=AliasChoices("datatype", "data_type"),
        description="Wire datatype such as FP32 or BYTES (Triton's TYPE_FP32 is accepted too).",
    )
    dims: list[int] = Field(
        description="Shape without the batch dimension when max_batch_size > 0; -1 is variable."
    )
    optional: bool = Field(False, description="An input that requests may leave out.")

    def full_dims(self, batching: bool) -> list[int]:
        """The dims a request's shape is checked against: with a leading -1 when batching."""
        return [-1, *self.dims] if batching else list(self.dims)

    @field_validator("datatype")
    @classmethod
    def _known_datatype(cls, value: str) -> str:
        try:
            return datatype(value.upper()).name
        except KeyError:
            raise ValueError(
                f"unknown datatype '{value}'; expected one of {', '.join(DATATYPES)}"
            ) from None

    @field_validator("dims")
    @classmethod
    def _valid_dims(cls, value: list[int]) -> list[int]:
        bad = [d for d in value if d < -1]
        if bad:
            raise ValueError(f"dims must be -1 (variable) or >= 0, got {bad[0]}")
        return value


class LatestPolicy(_Frozen):
    """Serve the newest `num_versions` versions."""

    num_versions: int = Field(1, ge=1, description="How many of the newest versions to serve.")


class AllPolicy(_Frozen):
    """Serve every version found."""


class SpecificPolicy(_Frozen):
    """Serve exactly the listed versions."""

    versions: list[int] = Field(min_length=1, description="Version numbers to serve.")


class VersionPolicy(_Frozen):
    """Which version folders are served; exactly one of latest, all, specific."""

    latest: LatestPolicy | None = Field(None, description="Serve the newest N versions.")
    all: AllPolicy | None = Field(None, description="Serve every version.")
    specific: SpecificPolicy | None = Field(None, description="Serve the listed versions.")

    @model_validator(mode="before")
    @classmethod
    def _exactly_one(cls, data: object) -> object:
        if not isinstance(data, dict):
            return data
        policies = ("latest", "all", "specific")
        chosen = [k for k in policies if data.get(k) is not None]
        if not chosen and "all" in data:
            chosen = ["all"]  # `all:` with nothing after it reads as None in YAML
        if len(chosen) > 1:
            raise ValueError(f"give only one of latest, all, specific (got {', '.join(chosen)})")
        # Unset policies (None, as model_dump writes them) are dropped; other keys are kept
        # so that a misspelt one is still rejected.
        rest = {k: v for k, v in data.items() if k not in policies}
        choice = chosen[0] if chosen else "latest"
        return {**rest, choice: data.get(choice) or {}}

    def select(self, available: list[int]) -> list[int]:
        """The versions to serve among those found on disk, ascending."""
        ordered = sorted(available)
        if self.all is not None:
            return ordered
        if self.specific is not None:
            return [v for v in ordered if v in set(self.specific.versions)]
        latest = self.latest or LatestPolicy()
        return ordered[-latest.num_versions :]


InstanceKind = Literal["auto", "cpu", "gpu", "inline"]


class InstanceGroup(_Frozen):
    """A group of identical model instances on one kind of device."""

    name: str = Field("", description="Group name, for logs.")
    count: int = Field(1, ge=1, description="Instances in this group (per GPU for kind gpu).")
    kind: InstanceKind = Field(
        "auto",
        description="cpu or gpu (a worker process each), auto (gpu when one is present, else "
        "cpu), or inline (on the CPU inside the server process: no IPC, for tiny models).",
    )
    gpus: list[int] = Field(default_factory=list, description="GPU ids for kind gpu/auto.")

    @field_validator("kind", mode="before")
    @classmethod
    def _normalise_kind(cls, value: object) -> object:
        # Accept Triton's KIND_GPU spelling as well as plain gpu.
        if isinstance(value, str):
            value = value.lower().removeprefix("kind_")
        return value


class QueuePolicy(_Frozen):
    """How a priority level's queue treats waiting requests."""

    timeout_action: Literal["REJECT", "DELAY"] = Field(
        "REJECT", description="What happens to a request whose timeout expires in the queue."
    )
    default_timeout_microseconds: int = Field(
        0, ge=0, description="Queue timeout for requests that set none; 0 means none."
    )
    allow_timeout_override: bool = Field(
        False, description="Whether a request's `timeout` parameter may shorten the timeout."
    )
    max_queue_size: int = Field(0, ge=0, description="Queue length limit; 0 means unbounded.")


class DynamicBatching(_Frozen):
    """Combine requests into batches on the server (Triton's dynamic_batching)."""

    preferred_batch_size: list[int] = Field(
        default_factory=list, description="Batch sizes to dispatch as soon as they are reached."
    )
    max_queue_delay_microseconds: int = Field(
        0, ge=0, description="How long the first request of a batch may wait for others."
    )
    preserve_ordering: bool = Field(False, description="Answer in arrival order.")
    priority_levels: int = Field(0, ge=0, description="Number of priority levels; 0 means one.")
    default_priority_level: int = Field(
        0, ge=0, description="Level of requests that set no priority."
    )
    default_queue_policy: QueuePolicy = Field(
        default_factory=QueuePolicy, description="Queue policy of every level not listed below."
    )
    priority_queue_policy: dict[int, QueuePolicy] = Field(
        default_factory=dict, description="Queue policy per priority level."
    )

    @model_validator(mode="after")
    def _levels_in_range(self) -> DynamicBatching:
        if self.priority_levels and self.default_priority_level > self.priority_levels:
            raise ValueError(
                f"default_priority_level {self.default_priority_level} is above "
                f"priority_levels {self.priority_levels}"
            )
        for level in self.priority_queue_policy:
            if not 1 <= level <= max(self.priority_levels, 1):
                raise ValueError(
                    f"priority_queue_policy level {level} is outside 1..{self.priority_levels}"
                )
        return self


class PipelineStep(_Frozen):
    """One model call in a pipeline, with how its tensors connect to the pipeline's."""

    model: str = Field(
        validation_alias=AliasChoices("model", "model_name"), description="Model this step calls."
    )
    version: int = Field(
        -1,
        ge=-1,
        validation_alias=AliasChoices("version", "model_version"),
        description="Version of that model; -1 means its newest ready version at each call.",
    )
    inputs: dict[str, str] = Field(
        validation_alias=AliasChoices("inputs", "input_map"),
        description="Each input of the step's model -> the pipeline tensor that feeds it "
        "(a pipeline input or an earlier step's output).",
    )
    outputs: dict[str, str] = Field(
        validation_alias=AliasChoices("outputs", "output_map"),
        description="Each output of the step's model that is used -> the pipeline tensor it "
        "becomes (read by later steps, or a pipeline output).",
    )


class Pipeline(_Frozen):
    """Models called in turn for each request (Triton's ensemble_scheduling)."""

    steps: list[PipelineStep] = Field(
        min_length=1,
        validation_alias=AliasChoices("steps", "step"),
        description="The steps; each runs as soon as the tensors it reads exist.",
    )

    def order(self) -> list[list[int]]:
        """Step indexes in waves: each wave reads only pipeline inputs and earlier waves'
        outputs, so its steps can run at the same time. Raises ValueError on a cycle or a
        tensor that nothing produces."""
        produced = {t: i for i, step in enumerate(self.steps) for t in step.outputs.values()}
        waves: list[list[int]] = []
        done: set[int] = set()
        while len(done) < len(self.steps):
            wave = [
                i
                for i, step in enumerate(self.steps)
                if i not in done
                and all(produced.get(t) in done or t not in produced for t in step.inputs.values())
            ]
            if not wave:
                stuck = [i + 1 for i in range(len(self.steps)) if i not in done]
                raise ValueError(
                    f"steps {stuck} read each other's outputs in a cycle; a step may only read "
                    "pipeline inputs and outputs of steps that do not depend on it"
                )
            waves.append(wave)
            done.update(wave)
        return waves

    def produced(self) -> dict[str, tuple[int, str]]:
        """Pipeline tensor -> (step index, step output) that produces it."""
        return {
            tensor: (i, output)
            for i, step in enumerate(self.steps)
            for output, tensor in step.outputs.items()
        }

    def consumed(self) -> dict[str, list[tuple[int, str]]]:
        """Pipeline tensor -> every (step index, step input) that reads it."""
        readers: dict[str, list[tuple[int, str]]] = {}
        for i, step in enumerate(self.steps):
            for step_input, tensor in step.inputs.items():
                readers.setdefault(tensor, []).append((i, step_input))
        return readers

    @model_validator(mode="after")
    def _connected(self) -> Pipeline:
        seen: dict[str, int] = {}
        for i, step in enumerate(self.steps):
            for tensor in step.outputs.values():
                if tensor in seen:
                    raise ValueError(
                        f"pipeline tensor '{tensor}' is produced by both step {seen[tensor] + 1} "
                        f"and step {i + 1}; each tensor must have one producer"
                    )
                seen[tensor] = i
            if not step.outputs:
                raise ValueError(f"step {i + 1} (model '{step.model}') maps no outputs")
        self.order()
        return self


class WarmupInput(_Frozen):
    """The data one input of a warm-up sample carries: zeros, random values, or a file's bytes."""

    data_type: str = Field(
        "", description="The input's datatype (optional: it must match the config's)."
    )
    dims: list[int] = Field(
        default_factory=list,
        description="Shape without the batch dimension; default: the input's dims (all fixed).",
    )
    zero_data: bool = Field(False, description="All zeros (empty strings for BYTES).")
    random_data: bool = Field(False, description="Random values (seeded, so runs repeat).")
    input_data_file: str = Field(
        "", description="Raw bytes of the tensor, a file in the model folder's warmup/."
    )

    @model_validator(mode="after")
    def _one_source(self) -> WarmupInput:
        sources = [self.zero_data, self.random_data, bool(self.input_data_file)]
        if sum(sources) != 1:
            raise ValueError("give exactly one of zero_data, random_data or input_data_file")
        name = self.input_data_file
        if name and (name in (".", "..") or "/" in name or "\\" in name):
            raise ValueError(f"input_data_file '{name}' must be a file name in warmup/")
        if any(d < 0 for d in self.dims):
            raise ValueError(f"warm-up dims must be fixed sizes, got {self.dims}")
        return self


class WarmupSample(_Frozen):
    """A request the server sends a version before it takes traffic (Triton's model_warmup)."""

    name: str = Field(description="Named in logs and in the reason when it fails.")
    batch_size: int = Field(1, ge=0, description="Rows of the sample (0 or 1 without batching).")
    inputs: dict[str, WarmupInput] = Field(description="Data for each input, by name.")
    count: int = Field(1, ge=1, le=1000, description="How many times it is sent.")


class RollbackRule(_Frozen):
    """When a canary is taken out of the traffic split, judged over its last `window`
    requests: their error ratio above `max_error_ratio`, or their p99 latency above
    `max_p99_ms`."""

    max_error_ratio: float | None = Field(
        None, ge=0, le=1, description="Errors (the server's fault) over requests answered."
    )
    max_p99_ms: float | None = Field(None, gt=0, description="p99 of request latency, in ms.")
    window: int = Field(100, ge=10, le=100_000, description="Requests judged, the newest.")

    @model_validator(mode="after")
    def _a_limit(self) -> RollbackRule:
        if self.max_error_ratio is None and self.max_p99_ms is None:
            raise ValueError("a rollback rule needs max_error_ratio, max_p99_ms or both")
        return self


class ShadowRule(_Frozen):
    """Mirror a share of the traffic to a candidate version: its answers are compared with
    those the clients got, counted, and never returned."""

    version: int = Field(ge=1, description="The candidate version (loaded, any weight).")
    share: float = Field(gt=0, le=1, description="Share of requests mirrored to it.")
    rtol: float = Field(1e-5, ge=0, description="Relative tolerance of the comparison.")
    atol: float = Field(1e-6, ge=0, description="Absolute tolerance of the comparison.")


class Traffic(_Frozen):
    """How requests that name no version are shared among the loaded versions.

    `traffic: {1: 90, 2: 10}` is short for `traffic: {weights: {1: 90, 2: 10}}`."""

    weights: dict[int, int] = Field(description="Share of each version, by version number.")
    sticky_key: str = Field(
        "",
        description="A request parameter or header whose value keeps a caller on one version.",
    )
    rollback: RollbackRule | None = Field(
        None, description="Takes a canary (a version below the largest weight) out when it fails."
    )
    shadow: ShadowRule | None = Field(
        None, description="Mirrors a share of requests to a candidate, answers compared only."
    )

    @model_validator(mode="before")
    @classmethod
    def _short_form(cls, data: object) -> object:
        if (
            isinstance(data, dict)
            and data
            and all(isinstance(k, int) or (isinstance(k, str) and k.isdigit()) for k in data)
        ):
            return {"weights": data}
        return data

    @model_validator(mode="after")
    def _weights(self) -> Traffic:
        bad = [v for v, w in self.weights.items() if v < 1 or w < 0]
        if bad:
            raise ValueError(
                f"weights need version numbers of at least 1 and weights of at least 0 "
                f"(version {bad[0]}: {self.weights[bad[0]]})"
            )
        if not sum(self.weights.values()):
            raise ValueError("weights must give some version a share above 0")
        return self

    def canaries(self) -> set[int]:
        """The versions a rollback rule watches: those below the largest weight."""
        top = max(self.weights.values())
        return {v for v, w in self.weights.items() if w < top}


class Monitoring(_Frozen):
    """Drift monitoring: a sample of requests' inputs and outputs compared with a reference
    profile (population stability index and a KS statistic per feature)."""

    reference: str = Field(
        "profile.json",
        description="The reference profile (`serverctl profile`), a file in the model folder.",
    )
    sample_rate: float = Field(
        0.1, gt=0, le=1, description="Share of requests whose tensors are sampled."
    )
    window: int = Field(
        1000, ge=10, le=100_000, description="Sampled rows each feature is judged on, the newest."
    )
    capture_first: int = Field(
        0,
        ge=0,
        le=100_000,
        description="Without a reference file: take the first N sampled rows as the reference.",
    )
    class_outputs: list[str] = Field(
        default_factory=list,
        description="Outputs that are per-class scores: the shares of their argmax are exported.",
    )

    @field_validator("reference")
    @classmethod
    def _in_model_folder(cls, value: str) -> str:
        parts = value.replace("\\", "/").split("/")
        if not value or value.startswith("/") or ".." in parts:
            raise ValueError(f"reference '{value}' must be a file inside the model folder")
        return value


class ModelConfig(_Frozen):
    """A model's config.yaml. Fields a backend can read from the model file may be omitted."""

    name: str = Field("", description="Model name; must match its folder (defaults to it).")
    backend: str = Field("", description="Backend that runs the model, e.g. onnxruntime.")
    platform: str = Field("", description="Triton platform name; informational.")
    max_batch_size: int | None = Field(
        None, ge=0, description="Largest batch; 0 means the model does not batch."
    )
    inputs: list[TensorConfig] = Field(
        default_factory=list, validation_alias=AliasChoices("inputs", "input")
    )
    outputs: list[TensorConfig] = Field(
        default_factory=list, validation_alias=AliasChoices("outputs", "output")
    )
    version_policy: VersionPolicy = Field(
        default_factory=VersionPolicy, description="Which versions to serve (latest 1)."
    )
    instance_group: list[InstanceGroup] = Field(
        default_factory=lambda: [InstanceGroup()], description="Where instances run."
    )
    dynamic_batching: DynamicBatching | None = Field(
        None, description="Server-side batching; absent means requests run one by one."
    )
    parameters: dict[str, ParameterValue] = Field(
        default_factory=dict, description="Backend settings, e.g. intra_op_thread_count."
    )
    default_model_filename: str = Field(
        "", description="Model file inside each version folder (the backend's default if empty)."
    )
    pipeline: Pipeline | None = Field(
        None,
        validation_alias=AliasChoices("pipeline", "ensemble_scheduling"),
        description="Makes this model a pipeline of other models instead of a model file.",
    )
    traffic: Traffic | None = Field(
        None, description="Weights of the loaded versions for requests naming no version."
    )
    model_warmup: list[WarmupSample] = Field(
        default_factory=list,
        description="Requests each version must answer before it is READY and takes traffic.",
    )
    monitoring: Monitoring | None = Field(
        None, description="Drift monitoring of inputs and outputs; absent means none."
    )

    @model_validator(mode="after")
    def _cross_checks(self) -> ModelConfig:
        for kind, tensors in (("inputs", self.inputs), ("outputs", self.outputs)):
            seen: set[str] = set()
            for t in tensors:
                if t.name in seen:
                    raise ValueError(f"{kind} lists '{t.name}' twice")
                seen.add(t.name)
        if self.dynamic_batching and self.max_batch_size is not None:
            too_big = [
                p
                for p in self.dynamic_batching.preferred_batch_size
                if p > self.max_batch_size or p < 1
            ]
            if too_big:
                raise ValueError(
                    f"dynamic_batching.preferred_batch_size {too_big[0]} must be within "
                    f"1..max_batch_size ({self.max_batch_size})"
                )
        return self

    @model_validator(mode="after")
    def _monitoring_checks(self) -> ModelConfig:
        if self.monitoring is None:
            return self
        if self.pipeline is not None:
            raise ValueError("a pipeline has no monitoring: monitor its steps' models instead")
        outputs = {t.name for t in self.outputs}
        for name in self.monitoring.class_outputs:
            if outputs and name not in outputs:  # a backend may complete the outputs later
                raise ValueError(f"monitoring.class_outputs names '{name}', which is not an output")
        return self

    @model_validator(mode="after")
    def _warmup_checks(self) -> ModelConfig:
        inputs = {t.name: t for t in self.inputs}
        for sample in self.model_warmup:
            where = f"model_warmup '{sample.name}'"
            if self.batching and not 1 <= sample.batch_size <= (self.max_batch_size or 0):
                raise ValueError(
                    f"{where}: batch_size {sample.batch_size} must be within 1..max_batch_size "
                    f"({self.max_batch_size})"
                )
            if inputs:  # a backend may complete the inputs later; checked again then
                given = sample.inputs
                missing = [n for n, t in inputs.items() if not t.optional and n not in given]
                if missing:
                    raise ValueError(f"{where} gives no data for input '{missing[0]}'")
            for name, data in sample.inputs.items():
                tensor = inputs.get(name)
                if tensor is None:
                    if inputs:
                        raise ValueError(f"{where} names '{name}', which is not an input")
                    continue
                if data.data_type and datatype(data.data_type.upper()).name != tensor.datatype:
                    raise ValueError(
                        f"{where}: input '{name}' is {tensor.datatype}, not {data.data_type}"
                    )
                dims = data.dims or tensor.dims
                if not shape_fits(dims, tensor.dims):
                    needs = "its dims" if data.dims else "dims, as the input has variable ones"
                    raise ValueError(
                        f"{where}: input '{name}' needs {needs} fitting {shape_text(tensor.dims)}"
                        + (f", not {shape_text(data.dims)}" if data.dims else "")
                    )
        return self

    @model_validator(mode="after")
    def _pipeline_checks(self) -> ModelConfig:
        if self.pipeline is None:
            return self
        if self.backend or self.dynamic_batching:
            field = "backend" if self.backend else "dynamic_batching"
            raise ValueError(
                f"a pipeline has no {field}: its steps' models run and batch the requests"
            )
        produced = self.pipeline.produced()
        inputs = {t.name for t in self.inputs}
        for name in inputs & produced.keys():
            raise ValueError(
                f"pipeline input '{name}' is also produced by step {produced[name][0] + 1}"
            )
        if self.inputs:
            for i, step in enumerate(self.pipeline.steps):
                for step_input, source in step.inputs.items():
                    if source not in inputs and source not in produced:
                        raise ValueError(
                            f"step {i + 1} (model '{step.model}') reads '{source}' into "
                            f"'{step_input}', which is neither a pipeline input nor an output "
                            "of any step"
                        )
            unused = sorted(inputs - self.pipeline.consumed().keys())
            if unused:
                raise ValueError(f"pipeline input '{unused[0]}' is not read by any step")
        for output in self.outputs:
            if output.name not in produced:
                raise ValueError(f"pipeline output '{output.name}' is not produced by any step")
        return self

    @property
    def batching(self) -> bool:
        """Whether requests carry a leading batch dimension."""
        return bool(self.max_batch_size)


# The one check of shapes against dims, used by request validation, pipelines and backends.


def shape_fits(shape: Sequence[int], dims: Sequence[int]) -> bool:
    """Whether a concrete shape fits declared dims (-1 in `dims` takes any size)."""
    return len(shape) == len(dims) and all(
        s >= 0 and (d == -1 or s == d) for s, d in zip(shape, dims, strict=True)
    )


def dims_within(declared: Sequence[int], model: Sequence[int]) -> bool:
    """Whether a config's dims fit the dims a model file has: equal ranks, each dimension
    equal unless the model's is -1 (a config may fix what the model leaves variable)."""
    return len(declared) == len(model) and all(
        m == -1 or d == m for d, m in zip(declared, model, strict=True)
    )


def dims_agree(declared: Sequence[int], found: Sequence[int]) -> bool:
    """Whether two declarations of one tensor can describe the same shapes: equal ranks, and
    each dimension equal where both fix it (-1 on either side is variable)."""
    return len(declared) == len(found) and all(
        a == -1 or b == -1 or a == b for a, b in zip(declared, found, strict=True)
    )


def shape_text(shape: Sequence[int]) -> str:
    """A shape as Triton's messages write it: [1,-1,3]."""
    return "[" + ",".join(map(str, shape)) + "]"
