"""Reading a model repository: config.yaml files, version folders and their model files.

Every problem is reported as a sentence that names the file, the field path and what
was expected. A broken model or version is described, never raised, so that the
rest of the repository still loads.

Nothing outside the repository is read because a config or a request says so: a model
folder must have a valid model name (protos/names.py); its config.yaml, version folders and
model files must resolve, after links, to inside the model folder; and a backend named by
import path must be on the allow-list. A model folder itself may be a link (to a model kept
elsewhere): the repository's own entries are its owner's choice, and everything inside the
model is then held to the folder it links to.

Two kinds of finding are not faults of the repository: a version that cannot load because
this environment lacks something optional (PyTorch, ONNX Runtime; `VersionSpec.environment`),
and a folder in a model folder that is not a version number (`ModelSpec.warnings`, also
logged), which is ignored.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from tiffin.backends import (
    ALLOWED_BACKENDS_VARIABLE,
    MissingDependency,
    get_backend,
    parse_allowed_backends,
    resolve_backend_name,
)
from tiffin.protos.model_config import ModelConfig
from tiffin.protos.names import name_problem

log = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"


def allowed_backends_from_env() -> tuple[str, ...]:
    """The import-path backends that TIFFIN_ALLOWED_BACKENDS allows (none when unset); read
    each time a repository is read, so that importing this module reads nothing."""
    return parse_allowed_backends(os.environ.get(ALLOWED_BACKENDS_VARIABLE, ""))


def _escape(path: Path, folder: Path, what: str) -> str:
    """Why `path` may not be used: it resolves (after links) outside `folder` (already
    resolved), called `what` in the sentence; "" when it stays inside."""
    real = path.resolve()
    if real.is_relative_to(folder):
        return ""
    return (
        f"{path}: resolves to {real}, outside {what} {folder}; links that lead out of it "
        "are refused"
    )


@dataclass(frozen=True)
class VersionSpec:
    """A version folder to serve, with its config completed from its model file."""

    version: int
    path: Path
    config: ModelConfig | None  # None when the version is broken
    error: str = ""
    # The error names what this environment lacks (a framework), not a fault of the files.
    environment: bool = False


@dataclass
class ModelSpec:
    """One model folder as read from disk."""

    name: str
    path: Path
    error: str = ""  # a problem with the model as a whole (its config)
    versions: list[VersionSpec] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # what is ignored, and why

    def step_models(self) -> set[str]:
        """The models this pipeline's steps call (empty for other models)."""
        return {
            step.model
            for v in self.versions
            if v.config and v.config.pipeline
            for step in v.config.pipeline.steps
        }

    @property
    def problems(self) -> list[str]:
        """The faults of the model's files: why it, or a version of it, cannot load."""
        found = [self.error] if self.error else []
        return found + [v.error for v in self.versions if v.error and not v.environment]

    @property
    def environment_problems(self) -> list[str]:
        """Why versions cannot load in this environment, though their files are fine."""
        return [v.error for v in self.versions if v.error and v.environment]


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


# What a field of a given kind must be, for pydantic's type errors, in a config's words.
_EXPECTED = {
    "list_type": "a list, such as [4] or [-1, 3]",
    "int_type": "a whole number",
    "int_parsing": "a whole number",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "text",
    "dict_type": "a mapping of names to values",
    "model_type": "a mapping of fields",
}


def _shown_value(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _describe_validation_error(config_file: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        kind = err["type"]
        if kind == "extra_forbidden":
            message = "unknown field (check its spelling against the configuration reference)"
        elif kind == "missing":
            message = "required field is missing"
        elif kind in _EXPECTED:
            message = f"is {_shown_value(err['input'])}, but it must be {_EXPECTED[kind]}"
        lines.append(f"{config_file}: {_field_path(err['loc'])}: {message}")
    return "\n".join(lines)


# A config.yaml is a page of settings. These bound what parsing one may cost: its size, and
# how many values it expands to (YAML aliases can make 500 bytes stand for a billion values,
# which validation would then walk for minutes).
MAX_CONFIG_BYTES = 1 << 20
MAX_CONFIG_VALUES = 100_000


def read_config(config_file: Path) -> ModelConfig:
    """Parses and validates one config.yaml; ValueError with every problem found."""
    try:
        size = config_file.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ValueError(
                f"{config_file}: is {size} bytes, more than a config.yaml may be "
                f"({MAX_CONFIG_BYTES})"
            )
        data = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_file}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{config_file}: cannot be read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{config_file}: is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"{config_file}: nests lists or mappings too deeply to read") from None
    except ValueError as exc:  # a value YAML itself cannot convert (an integer of 5000 digits)
        raise ValueError(f"{config_file}: not valid YAML: {exc}") from None
    if _expands_beyond(data, MAX_CONFIG_VALUES):
        raise ValueError(
            f"{config_file}: expands to more than {MAX_CONFIG_VALUES} values (through YAML "
            "aliases); write the values out"
        )
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_describe_validation_error(config_file, exc)) from None


def _expands_beyond(data: object, budget: int) -> bool:
    """Whether walking `data` (aliases followed) meets more than `budget` values; stops as
    soon as it does, so the walk costs at most `budget` steps."""
    todo = [data]
    while todo:
        budget -= 1
        if budget < 0:
            return True
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    return False


def _version_folders(model_dir: Path) -> tuple[list[int], list[str]]:
    """The version numbers of a model folder's version folders, and a warning for each other
    folder (hidden ones and those starting with an underscore aside): it is not served."""
    versions, warnings = [], []
    for path in sorted(model_dir.iterdir()):
        if not path.is_dir() or path.name.startswith((".", "_")):
            continue
        if path.name.isdigit():
            versions.append(int(path.name))
            continue
        digits = "".join(c for c in path.name if c.isdigit())
        hint = f"; to serve it as version {int(digits)}, rename it {int(digits)}" if digits else ""
        warnings.append(
            f"{path}: not a version folder (a version folder is named by its version number, "
            f"such as 1), so it is ignored{hint}"
        )
    return sorted(versions), warnings


def read_model(model_dir: Path, allowed_backends: Sequence[str] | None = None) -> ModelSpec:
    """Reads one model folder: its config, the versions its policy selects, their files.

    `allowed_backends` lists the import-path backends to accept (`module:Class` or `module`;
    None: from TIFFIN_ALLOWED_BACKENDS); registered backends are always accepted.
    Independent problems are all reported, not only the first.
    """
    spec = ModelSpec(name=model_dir.name, path=model_dir)
    problem = name_problem(model_dir.name)
    if problem:
        spec.error = f"{model_dir}: the folder's name cannot be served: {problem}"
        return spec
    if allowed_backends is None:
        allowed_backends = allowed_backends_from_env()
    available, spec.warnings = _version_folders(model_dir)
    for warning in spec.warnings:
        log.warning("model '%s': %s", spec.name, warning)
    real_dir = model_dir.resolve()
    config_file = model_dir / CONFIG_FILE
    if not config_file.is_file():
        spec.error = f"{config_file}: file not found (every model folder needs one)"
        return spec
    spec.error = _escape(config_file, real_dir, "the model folder")
    if spec.error:
        return spec
    try:
        config = read_config(config_file)
    except ValueError as exc:
        spec.error = str(exc)
        return spec
    problems = []
    if config.name and config.name != model_dir.name:
        problems.append(
            f"{config_file}: name: '{config.name}' does not match the folder name "
            f"'{model_dir.name}'"
        )
    for sample in config.model_warmup:
        for data in sample.inputs.values():
            if data.input_data_file:
                path = model_dir / "warmup" / data.input_data_file
                if not path.is_file():
                    problems.append(f"{config_file}: model_warmup '{sample.name}': no file {path}")
                elif reason := _escape(path, real_dir, "the model folder"):
                    problems.append(reason)
    # A version folder that is a link out of the model folder is never looked into.
    outside = {
        v: reason
        for v in available
        if (reason := _escape(model_dir / str(v), real_dir, "the model folder"))
    }
    if config.pipeline is not None:
        return _read_pipeline(spec, config, available, problems, outside)
    if not available:
        problems.append(
            f"{model_dir}: no version folders; put the model file in a numbered folder "
            f"such as {model_dir / '1'}"
        )
    files = [p.name for v in available if v not in outside for p in (model_dir / str(v)).iterdir()]
    backend = None
    try:
        backend_name = resolve_backend_name(
            config.backend, config.platform, files, allowed_backends
        )
        backend = get_backend(backend_name)
        config = config.model_copy(update={"backend": backend_name})
    except (ValueError, RuntimeError) as exc:
        if available or config.backend or config.platform:
            problems.append(f"{config_file}: backend: {exc}")
    selected = config.version_policy.select(available)
    if available and not selected:
        problems.append(
            f"{config_file}: version_policy: selects none of the versions found "
            f"({', '.join(map(str, available))})"
        )
    if config.traffic is not None:
        named = set(config.traffic.weights)
        if config.traffic.shadow is not None:
            named.add(config.traffic.shadow.version)
        unloaded = sorted(named - set(selected))
        if unloaded:
            problems.append(
                f"{config_file}: traffic: names version {unloaded[0]}, which the "
                f"version_policy does not load (it loads {', '.join(map(str, selected)) or 'none'}"
                "; version_policy: {all: {}} loads every version folder)"
            )
    if problems or backend is None:
        spec.error = "\n".join(problems)
        return spec
    config = config.model_copy(update={"name": model_dir.name})
    for version in selected:
        version_dir = model_dir / str(version)
        if version in outside:
            spec.versions.append(VersionSpec(version, version_dir, None, outside[version]))
            continue
        try:
            model_file = backend.model_path(config, version_dir)
        except ValueError as exc:
            spec.versions.append(VersionSpec(version, version_dir, None, f"{config_file}: {exc}"))
            continue
        if not model_file.exists():
            spec.versions.append(
                VersionSpec(version, version_dir, None, f"{model_file}: model file not found")
            )
            continue
        escape = _escape(model_file, real_dir, "the model folder")
        if escape:
            spec.versions.append(VersionSpec(version, version_dir, None, escape))
            continue
        try:
            completed = backend.complete_config(config, model_file)
            # Validate again: cross-field checks must see what the model file filled in.
            completed = ModelConfig.model_validate(completed.model_dump(exclude_none=True))
        except ValidationError as exc:
            error = _describe_validation_error(config_file, exc)
            spec.versions.append(
                VersionSpec(
                    version, version_dir, None, f"{error} (after completing from {model_file})"
                )
            )
            continue
        except MissingDependency as exc:
            spec.versions.append(
                VersionSpec(version, version_dir, None, f"{model_file}: {exc}", environment=True)
            )
            continue
        except (ValueError, RuntimeError) as exc:
            spec.versions.append(
                VersionSpec(version, version_dir, None, f"{config_file} (version {version}): {exc}")
            )
            continue
        spec.versions.append(VersionSpec(version, version_dir, completed))
    return spec


def _read_pipeline(
    spec: ModelSpec,
    config: ModelConfig,
    available: list[int],
    problems: list[str],
    outside: dict[int, str],
) -> ModelSpec:
    """A pipeline has no model file; without version folders it is version 1. Whether its
    steps connect is checked when it loads, against its step models' configs."""
    config_file = spec.path / CONFIG_FILE
    selected = config.version_policy.select(available) if available else [1]
    if available and not selected:
        problems.append(
            f"{config_file}: version_policy: selects none of the versions found "
            f"({', '.join(map(str, available))})"
        )
    if problems:
        spec.error = "\n".join(problems)
        return spec
    config = config.model_copy(update={"name": spec.name, "platform": "ensemble"})
    spec.versions = [
        VersionSpec(v, spec.path / str(v), None, outside[v])
        if v in outside
        else VersionSpec(v, spec.path / str(v), config)
        for v in selected
    ]
    return spec


def read_repository(root: Path, allowed_backends: Sequence[str] | None = None) -> list[ModelSpec]:
    """Every model folder under `root` (hidden folders skipped), sorted by name; a folder
    whose name is not a model name is reported as a broken model. `allowed_backends` as in
    `read_model`."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a folder")
    if allowed_backends is None:
        allowed_backends = allowed_backends_from_env()
    return [
        read_model(p, allowed_backends)
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_"))
    ]
