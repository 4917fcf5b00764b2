"""Reading a model repository: config.yaml files, version folders and their model files.

Every problem is reported as a sentence that names the file, the field path and what
was expected. A broken model or version is described, never raised, so that the
rest of the repository still loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml
from pydantic import ValidationError

from tiffin.backends import get_backend, resolve_backend_name
from tiffin.protos.model_config import ModelConfig

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class VersionSpec:
    """A version folder to serve, with its config completed from its model file."""

    version: int
    path: Path
    config: ModelConfig | None  # None when the version is broken
    error: str = ""


@dataclass
class ModelSpec:
    """One model folder as read from disk."""

    name: str
    path: Path
    error: str = ""  # a problem with the model as a whole (its config)
    versions: list[VersionSpec] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        found = [self.error] if self.error else []
        return found + [v.error for v in self.versions if v.error]


def _field_path(loc: tuple[int | str, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "(top level)"


def _describe_validation_error(config_file: Path, exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown field (check its spelling against the configuration reference)"
        elif err["type"] == "missing":
            message = "required field is missing"
        lines.append(f"{config_file}: {_field_path(err['loc'])}: {message}")
    return "\n".join(lines)


def read_config(config_file: Path) -> ModelConfig:
    """Parses and validates one config.yaml; ValueError with every problem found."""
    try:
        data = yaml.safe_load(config_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_file}: not valid YAML: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{config_file}: cannot be read: {exc.strerror}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config_file}: expected a mapping of fields, got {type(data).__name__}")
    try:
        return ModelConfig.model_validate(data)
    except ValidationError as exc:
        raise ValueError(_describe_validation_error(config_file, exc)) from None


def _version_folders(model_dir: Path) -> list[int]:
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def read_model(model_dir: Path) -> ModelSpec:
    """Reads one model folder: its config, the versions its policy selects, their files.

    Independent problems are all reported, not only the first.
    """
    spec = ModelSpec(name=model_dir.name, path=model_dir)
    config_file = model_dir / CONFIG_FILE
    if not config_file.is_file():
        spec.error = f"{config_file}: file not found (every model folder needs one)"
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
    available = _version_folders(model_dir)
    if config.pipeline is not None:
        return _read_pipeline(spec, config, available, problems)
    if not available:
        problems.append(
            f"{model_dir}: no version folders; put the model file in a numbered folder "
            f"such as {model_dir / '1'}"
        )
    files = [p.name for v in available for p in (model_dir / str(v)).iterdir()]
    backend = None
    try:
        backend_name = resolve_backend_name(config.backend, config.platform, files)
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
    if problems or backend is None:
        spec.error = "\n".join(problems)
        return spec
    config = config.model_copy(update={"name": model_dir.name})
    for version in selected:
        version_dir = model_dir / str(version)
        model_file = backend.model_path(config, version_dir)
        if not model_file.exists():
            spec.versions.append(
                VersionSpec(version, version_dir, None, f"{model_file}: model file not found")
            )
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
        except (ValueError, RuntimeError) as exc:
            spec.versions.append(
                VersionSpec(version, version_dir, None, f"{config_file} (version {version}): {exc}")
            )
            continue
        spec.versions.append(VersionSpec(version, version_dir, completed))
    return spec


def _read_pipeline(
    spec: ModelSpec, config: ModelConfig, available: list[int], problems: list[str]
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
    spec.versions = [VersionSpec(v, spec.path / str(v), config) for v in selected]
    return spec


def read_repository(root: Path) -> list[ModelSpec]:
    """Every model folder under `root` (hidden folders skipped), sorted by name."""
    if not root.is_dir():
        raise FileNotFoundError(f"model repository {root} is not a folder")
    return [
        read_model(p)
        for p in sorted(root.iterdir())
        if p.is_dir() and not p.name.startswith((".", "_"))
    ]
