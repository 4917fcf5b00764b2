"""The config.yaml schema (tiffin.protos.model_config.ModelConfig)."""

from __future__ import annotations

import pytest
import yaml
from pydantic import ValidationError

from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig, TensorConfig, VersionPolicy


def config(text: str) -> ModelConfig:
    """A ModelConfig from YAML text, as a user writes it."""
    return ModelConfig.model_validate(yaml.safe_load(text) or {})


def errors(text: str) -> list[tuple[tuple, str]]:
    """(location, message) of every validation error the YAML text raises."""
    with pytest.raises(ValidationError) as info:
        config(text)
    return [(e["loc"], e["msg"]) for e in info.value.errors()]


def test_defaults() -> None:
    c = config("")
    assert c.name == "" and c.backend == ""
    assert c.max_batch_size is None  # filled in from the model file later
    assert c.version_policy.latest is not None
    assert c.version_policy.latest.num_versions == 1
    assert c.version_policy.all is None and c.version_policy.specific is None
    assert len(c.instance_group) == 1
    assert c.instance_group[0].kind == "auto"
    assert c.instance_group[0].count == 1
    assert c.dynamic_batching is None
    assert c.inputs == [] and c.outputs == []
    assert c.batching is False


def test_frozen() -> None:
    c = config("max_batch_size: 4")
    with pytest.raises(ValidationError):
        c.max_batch_size = 8
    with pytest.raises(ValidationError):
        c.version_policy.latest.num_versions = 3
    assert c.max_batch_size == 4
    assert c.model_copy(update={"max_batch_size": 8}).max_batch_size == 8


def test_batching_follows_max_batch_size() -> None:
    assert config("max_batch_size: 0").batching is False
    assert config("max_batch_size: 8").batching is True


def test_triton_spellings_accepted() -> None:
    c = config(
        """
        name: m
        max_batch_size: 8
        input:
          - name: INPUT0
            data_type: TYPE_FP32
            dims: [3, -1]
        output:
          - name: OUTPUT0
            data_type: TYPE_STRING
            dims: [1]
        instance_group:
          - kind: KIND_GPU
            count: 2
            gpus: [0, 1]
          - kind: KIND_CPU
        """
    )
    assert [(t.name, t.datatype, t.dims) for t in c.inputs] == [("INPUT0", "FP32", [3, -1])]
    assert [(t.name, t.datatype, t.dims) for t in c.outputs] == [("OUTPUT0", "BYTES", [1])]
    assert [(g.kind, g.count, g.gpus) for g in c.instance_group] == [
        ("gpu", 2, [0, 1]),
        ("cpu", 1, []),
    ]


def test_own_spellings_accepted() -> None:
    c = config(
        """
        inputs: [{name: a, datatype: INT64, dims: [2]}]
        outputs: [{name: b, datatype: bytes, dims: [-1]}]
        instance_group: [{kind: gpu}]
        """
    )
    assert c.inputs[0].datatype == "INT64"
    assert c.outputs[0].datatype == "BYTES"
    assert c.instance_group[0].kind == "gpu"


@pytest.mark.parametrize(
    ("text", "loc"),
    [
        ("max_batch_sise: 4", ("max_batch_sise",)),
        ("inputs: [{name: a, datatype: FP32, dims: [1], dimz: [2]}]", ("inputs", 0, "dimz")),
        ("instance_group: [{kind: cpu, cuont: 2}]", ("instance_group", 0, "cuont")),
        ("dynamic_batching: {max_queue_delay_us: 100}", ("dynamic_batching", "max_queue_delay_us")),
        ("version_policy: {latest: {num_version: 2}}", ("version_policy", "latest", "num_version")),
        # A misspelt policy must not silently turn into the default (latest 1).
        ("version_policy: {lastest: {num_versions: 2}}", ("version_policy", "lastest")),
    ],
    ids=[
        "top-level",
        "tensor",
        "instance-group",
        "dynamic-batching",
        "latest-policy",
        "policy-name",
    ],
)
def test_unknown_field_rejected(text: str, loc: tuple) -> None:
    found = errors(text)
    assert found, text
    # Reported at the unknown key, or at its parent with the key named in the message.
    assert any(
        e_loc[: len(loc)] == loc or (e_loc == loc[:-1] and loc[-1] in msg) for e_loc, msg in found
    ), found


def test_bad_datatype_lists_valid_ones() -> None:
    [(loc, msg)] = errors("inputs: [{name: a, datatype: FP33, dims: [1]}]")
    assert loc == ("inputs", 0, "datatype")
    assert "unknown datatype 'FP33'" in msg
    for name in DATATYPES:
        assert name in msg


@pytest.mark.parametrize("dims", [[-2], [4, -3], [-100, 1]])
def test_dims_below_minus_one_rejected(dims: list[int]) -> None:
    [(loc, msg)] = errors(f"inputs: [{{name: a, datatype: FP32, dims: {dims}}}]")
    assert loc == ("inputs", 0, "dims")
    assert f"got {min(dims)}" in msg
    assert "-1" in msg


def test_variable_and_zero_dims_accepted() -> None:
    assert TensorConfig(name="a", datatype="FP32", dims=[-1, 0, 3]).dims == [-1, 0, 3]


def test_negative_max_batch_size_rejected() -> None:
    [(loc, _)] = errors("max_batch_size: -1")
    assert loc == ("max_batch_size",)


# --- version policy -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "available", "selected"),
    [
        ("{}", [1, 2, 3], [3]),
        ("{latest: {num_versions: 2}}", [3, 1, 2], [2, 3]),
        ("{latest: {num_versions: 5}}", [1, 2], [1, 2]),
        ("{latest: {}}", [1, 7], [7]),
        ("{all: {}}", [2, 1, 10], [1, 2, 10]),
        ("{all: }", [2, 1], [1, 2]),  # YAML's bare `all:` is null; it still means all
        ("{specific: {versions: [1, 3]}}", [1, 2, 3], [1, 3]),
        ("{specific: {versions: [4]}}", [1, 2, 3], []),
        ("{latest: {num_versions: 1}}", [], []),
    ],
)
def test_version_policy_select(text: str, available: list[int], selected: list[int]) -> None:
    policy = config(f"version_policy: {text}").version_policy
    assert policy.select(available) == selected


def test_version_policy_numbers_are_numeric() -> None:
    # 10 is newer than 9: versions sort as numbers, not strings.
    assert VersionPolicy().select([9, 10, 2]) == [10]


@pytest.mark.parametrize(
    "text",
    [
        "{latest: {num_versions: 1}, all: {}}",
        "{all: {}, specific: {versions: [1]}}",
        "{latest: {}, all: {}, specific: {versions: [1]}}",
    ],
)
def test_two_policies_rejected(text: str) -> None:
    [(loc, msg)] = errors(f"version_policy: {text}")
    assert loc == ("version_policy",)
    assert "give only one of latest, all, specific" in msg


def test_latest_needs_at_least_one_version() -> None:
    [(loc, _)] = errors("version_policy: {latest: {num_versions: 0}}")
    assert loc == ("version_policy", "latest", "num_versions")


def test_specific_needs_versions() -> None:
    [(loc, _)] = errors("version_policy: {specific: {versions: []}}")
    assert loc == ("version_policy", "specific", "versions")


# --- cross-field checks -------------------------------------------------------------------


def test_preferred_batch_size_above_max_batch_size_names_both() -> None:
    [(_, msg)] = errors("max_batch_size: 4\ndynamic_batching: {preferred_batch_size: [2, 8]}")
    assert "preferred_batch_size 8" in msg
    assert "max_batch_size (4)" in msg


def test_preferred_batch_size_within_max_accepted() -> None:
    c = config("max_batch_size: 8\ndynamic_batching: {preferred_batch_size: [4, 8]}")
    assert c.dynamic_batching.preferred_batch_size == [4, 8]


def test_preferred_batch_size_zero_rejected() -> None:
    [(_, msg)] = errors("max_batch_size: 8\ndynamic_batching: {preferred_batch_size: [0]}")
    assert "preferred_batch_size 0" in msg


@pytest.mark.parametrize("kind", ["inputs", "outputs"])
def test_duplicate_tensor_names_rejected(kind: str) -> None:
    [(_, msg)] = errors(
        f"{kind}: [{{name: x, datatype: FP32, dims: [1]}}, {{name: x, datatype: INT32, dims: [2]}}]"
    )
    assert f"{kind} lists 'x' twice" in msg


def test_same_name_for_an_input_and_an_output_is_allowed() -> None:
    c = config(
        "inputs: [{name: x, datatype: FP32, dims: [1]}]\n"
        "outputs: [{name: x, datatype: FP32, dims: [1]}]"
    )
    assert c.inputs[0].name == c.outputs[0].name == "x"


def test_default_priority_level_above_priority_levels_rejected() -> None:
    [(loc, msg)] = errors("dynamic_batching: {priority_levels: 2, default_priority_level: 3}")
    assert loc == ("dynamic_batching",)
    assert "default_priority_level 3" in msg
    assert "priority_levels 2" in msg


def test_default_priority_level_within_levels_accepted() -> None:
    c = config("dynamic_batching: {priority_levels: 3, default_priority_level: 3}")
    assert c.dynamic_batching.default_priority_level == 3


def test_priority_queue_policy_level_out_of_range_rejected() -> None:
    [(_, msg)] = errors(
        "dynamic_batching:\n  priority_levels: 2\n  priority_queue_policy:\n"
        "    3: {max_queue_size: 1}"
    )
    assert "priority_queue_policy level 3 is outside 1..2" in msg
