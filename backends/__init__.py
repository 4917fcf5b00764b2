"""Backends: one module per framework behind the small `Backend` interface."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Backend, BackendBase, Device, ForwardingBackend

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


def resolve_backend_name(backend: str, platform: str = "", filenames: Sequence[str] = ()) -> str:
    """The backend for a config: its `backend`, else its Triton `platform`, else the model
    file's extension. Raises ValueError naming what it tried."""
    if backend:
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
    for backends of your own). Imports its framework."""
    import importlib

    target = _REGISTRY.get(name, name)
    if ":" not in target:
        raise ValueError(
            f"unknown backend '{name}'; available: {', '.join(backend_names())}, or a Backend "
            "subclass by import path such as 'my_package.my_module:MyBackend'"
        )
    module_name, class_name = target.split(":", 1)
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"backend '{name}' cannot be imported: {exc}") from None
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
    "Backend",
    "BackendBase",
    "Device",
    "ForwardingBackend",
    "backend_names",
    "get_backend",
    "get_batch_backend",
    "resolve_backend_name",
]
