"""Backends: one module per framework behind the small `Backend` interface."""

from __future__ import annotations

from collections.abc import Sequence

from tiffin.protos.names import shown

from .base import (
    Backend,
    BackendBase,
    BatchResult,
    Device,
    ForwardingBackend,
    MissingDependency,
)
from .cpu_budget import place_frontend, use_compute_cpus

#: The environment variable that lists import-path backends to allow (read by the repository
#: reader, not here): comma-separated `module:Class`, or `module` for every class in that
#: module and the modules below it.
ALLOWED_BACKENDS_VARIABLE = "TIFFIN_ALLOWED_BACKENDS"

# name in config.yaml -> "module:Class"; modules import their framework lazily.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "tiffin.backends.onnxruntime:OnnxRuntimeBackend",
    "torch": "tiffin.backends.torch:TorchBackend",
    "python": "tiffin.backends.python:PythonBackend",
    "triton": "tiffin.backends.triton:TritonBackend",
}
# Triton's platform names, accepted in place of `backend`.
_PLATFORMS: dict[str, str] = {
    "onnxruntime_onnx": "onnxruntime",
    "pytorch_libtorch": "torch",
    "torch_export": "torch",
}
# A model file's name tells the backend when config.yaml names none.
_EXTENSIONS: dict[str, str] = {
    ".onnx": "onnxruntime",
    ".pt": "torch",
    ".pt2": "torch",
    "model.py": "python",
}


def backend_names() -> list[str]:
    """Names that `backend:` may take."""
    return sorted(_REGISTRY)


def parse_allowed_backends(text: str) -> tuple[str, ...]:
    """The entries of a comma-separated allow-list (`module:Class` or `module`), blanks dropped."""
    return tuple(entry.strip() for entry in text.split(",") if entry.strip())


def check_backend_allowed(name: str, allowed: Sequence[str] = ()) -> None:
    """ValueError unless `name` is a registered backend or an import path that `allowed`
    admits: an entry `module:Class` admits exactly that class, an entry `module` every class
    of that module and of the modules below it (`pkg` admits `pkg.sub:Class`, not
    `pkgx:Class`). Nothing is imported here, so a refused module never runs."""
    if name in _REGISTRY or ":" not in name:
        return  # registered, or an unknown name that get_backend refuses without importing
    module_name, class_name = name.split(":", 1)
    if not all(part.isidentifier() for part in [*module_name.split("."), class_name]):
        raise ValueError(
            f"backend '{shown(name)}' is not an import path; write it as "
            "'package.module:Class', or use one of " + ", ".join(backend_names())
        )
    for entry in allowed:
        if ":" in entry:
            if name == entry:
                return
        elif module_name == entry or module_name.startswith(entry + "."):
            return
    raise ValueError(
        f"backend '{shown(name)}' is not allowed: a backend named by import path is imported "
        f"only when it is on the allow-list; to allow it, add '{shown(name)}' (or its module, "
        f"'{shown(module_name)}') to {ALLOWED_BACKENDS_VARIABLE} (comma-separated). "
        f"Registered backends need no allowing: {', '.join(backend_names())}"
    )


def resolve_backend_name(
    backend: str, platform: str = "", filenames: Sequence[str] = (), allowed: Sequence[str] = ()
) -> str:
    """The backend for a config: its `backend`, else its Triton `platform`, else the model
    file's extension. A backend by import path must be on `allowed` (see
    `check_backend_allowed`; by default only registered backends are). Raises ValueError
    naming what it tried."""
    if backend:
        check_backend_allowed(backend, allowed)  # before anything is imported
        get_backend(backend)  # raises ValueError naming what is wrong
        return backend
    if platform:
        if platform not in _PLATFORMS:
            raise ValueError(
                f"unknown platform '{platform}'; set `backend` to one of "
                f"{', '.join(backend_names())}"
            )
        return _PLATFORMS[platform]
    for filename in filenames:
        for ending, name in _EXTENSIONS.items():
            if filename.endswith(ending) if ending.startswith(".") else filename == ending:
                return name
    raise ValueError(
        f"no backend given and none can be told from the model files; set `backend` to one of "
        f"{', '.join(backend_names())}"
    )


def get_backend(name: str) -> type[BackendBase]:
    """The Backend class registered under `name`, or named by import path ("pkg.module:Class",
    for backends of your own). Imports its framework.

    This does not consult the allow-list: call it with names that came through
    `resolve_backend_name` (the repository reader), never straight from a config."""
    import importlib

    target = _REGISTRY.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown backend '{shown(name)}'; available: {', '.join(backend_names())}, or a "
            "Backend subclass by import path such as 'my_package.my_module:MyBackend'"
        )
    module_name, class_name = target.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"backend '{shown(name)}' cannot be imported: {exc}") from None
    if not (isinstance(cls, type) and issubclass(cls, (Backend, ForwardingBackend))):
        raise ValueError(
            f"backend '{name}' is not a subclass of tiffin.backends.Backend (or ForwardingBackend)"
        )
    return cls


def get_batch_backend(name: str) -> type[Backend]:
    """Like `get_backend`, for the places that run whole batches (workers, inline instances)."""
    cls = get_backend(name)
    if not issubclass(cls, Backend):
        raise ValueError(f"backend '{name}' forwards requests and cannot run batches itself")
    return cls


__all__ = [
    "ALLOWED_BACKENDS_VARIABLE",
    "Backend",
    "BackendBase",
    "BatchResult",
    "Device",
    "ForwardingBackend",
    "MissingDependency",
    "backend_names",
    "check_backend_allowed",
    "get_backend",
    "get_batch_backend",
    "parse_allowed_backends",
    "place_frontend",
    "resolve_backend_name",
    "use_compute_cpus",
]
