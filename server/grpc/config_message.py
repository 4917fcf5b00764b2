"""A model's config as Triton's `inference.ModelConfig` message, for the ModelConfig RPC."""

from __future__ import annotations

from typing import Any

from tiffin.protos import protocol
from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig, QueuePolicy


def _queue_policy(target: Any, policy: QueuePolicy) -> None:
    target.timeout_action = policy.timeout_action  # enum value by name: REJECT or DELAY
    target.default_timeout_microseconds = policy.default_timeout_microseconds
    target.allow_timeout_override = policy.allow_timeout_override
    target.max_queue_size = policy.max_queue_size


def config_message(config: ModelConfig) -> Any:
    """Converts a completed config; fields Tiffin has no counterpart for stay at defaults."""
    pb = protocol()
    msg = pb.ModelConfig(
        name=config.name,
        platform=config.platform,
        backend=config.backend,
        max_batch_size=config.max_batch_size or 0,
        default_model_filename=config.default_model_filename,
    )
    for tensor in config.inputs:
        msg.input.add(
            name=tensor.name,
            data_type=DATATYPES[tensor.datatype].config_name,
            dims=tensor.dims,
            optional=tensor.optional,
        )
    for tensor in config.outputs:
        msg.output.add(
            name=tensor.name, data_type=DATATYPES[tensor.datatype].config_name, dims=tensor.dims
        )
    policy = config.version_policy
    if policy.all is not None:
        msg.version_policy.all.SetInParent()
    elif policy.specific is not None:
        msg.version_policy.specific.versions.extend(policy.specific.versions)
    else:
        msg.version_policy.latest.num_versions = policy.latest.num_versions if policy.latest else 1
    for group in config.instance_group if config.pipeline is None else []:
        msg.instance_group.add(
            name=group.name,
            count=group.count,
            gpus=group.gpus,
            kind="KIND_CPU" if group.kind == "inline" else f"KIND_{group.kind.upper()}",
        )
    batching = config.dynamic_batching
    if batching is not None:
        target = msg.dynamic_batching
        target.SetInParent()  # present, even if every field is a default
        target.preferred_batch_size.extend(batching.preferred_batch_size)
        target.max_queue_delay_microseconds = batching.max_queue_delay_microseconds
        target.preserve_ordering = batching.preserve_ordering
        target.priority_levels = batching.priority_levels
        target.default_priority_level = batching.default_priority_level
        _queue_policy(target.default_queue_policy, batching.default_queue_policy)
        for level, level_policy in batching.priority_queue_policy.items():
            _queue_policy(target.priority_queue_policy[level], level_policy)
    if config.pipeline is not None:  # as a Triton ensemble, which perf_analyzer understands
        for step in config.pipeline.steps:
            msg.ensemble_scheduling.step.add(
                model_name=step.model,
                model_version=step.version,
                input_map=step.inputs,
                output_map=step.outputs,
            )
    for key, value in config.parameters.items():
        msg.parameters[key].string_value = (
            str(value).lower() if isinstance(value, bool) else str(value)
        )
    return msg
