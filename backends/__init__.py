"""Backends: one module per framework behind the small `Backend` interface."""

from __future__ import annotations

from collections.abc import Sequence

from .base import Backend, Device

# name in config.yaml -> "module:Class"; modules import their framework lazily.
_REGISTRY: dict[str, str] = {
    "onnxruntime": "tiffin.backends.onnxruntime:OnnxRuntimeBackend",
}
# Triton's platform names, accepted in place of `backend`.
_PLATFORMS: dict[str, str] = {"onnxruntime_onnx": "onnxruntime"}
# A model file's extension tells the backend when config.yaml names none.
_EXTENSIONS: dict[str, str] = {".onnx": "onnxruntime"}


def backend_names() -> list[str]:
    """Names that `backend:` may take."""
    return sorted(_REGISTRY)


def resolve_backend_name(backend: str, platform: str = "", filenames: Sequence[str] = ()) -> str:
    """The backend for a config: its `backend`, else its Triton `platform`, else the model
    file's extension. Raises ValueError naming what it tried."""
    if backend:
        if backend not in _REGISTRY:
            raise ValueError(
                f"unknown backend '{backend}'; available: {', '.join(backend_names())}"
            )
        return backend
    if platform:
        if platform not in _PLATFORMS:
            raise ValueError(
                f"unknown platform '{platform}'; set `backend` to one of "
                f"{', '.join(backend_names())}"
            )
        return _PLATFORMS[platform]
    for filename in filenames:
        for ext, name in _EXTENSIONS.items():
            if filename.endswith(ext):
                return name
    raise ValueError(
        f"no backend given and none can be told from the model files; set `backend` to one of "
        f"{', '.join(backend_names())}"
    )


def get_backend(name: str) -> type[Backend]:
    """The Backend class registered under `name` (imports its framework)."""
    import importlib

    try:
        target = _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown backend '{name}'; available: {', '.join(backend_names())}"
        ) from None
    module_name, class_name = target.split(":")
    cls: type[Backend] = getattr(importlib.import_module(module_name), class_name)
    return cls


__all__ = ["Backend", "Device", "backend_names", "get_backend", "resolve_backend_name"]
