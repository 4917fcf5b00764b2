"""The formats the torch backend reads: which kind of PyTorch file a model is (told apart by
its zip archive's entries, not its name), the platform each kind reports, the device an
AOTInductor package was compiled for, and the tensor datatypes that cross between torch dtypes
and the wire.

Nothing here imports torch; what needs it takes the module as an argument.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path
from typing import Any, Literal

Format = Literal["torchscript", "export", "aoti"]

PLATFORMS: dict[str, str] = {
    "torchscript": "pytorch_libtorch",
    "export": "torch_export",
    "aoti": "torch_export",
}

# torch dtype names (str(dtype) without "torch.") -> wire datatypes. BF16 crosses as its
# 16 bits (numpy has no bfloat16 of its own).
_WIRE_TYPES: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
    "bfloat16": "BF16",
}
TORCH_TYPES = {wire: name for name, wire in _WIRE_TYPES.items()}


def model_format(path: Path) -> Format:
    """Which kind of PyTorch file `path` is, from the entries of its zip archive.

    Raises ValueError naming what the file is instead when it is none of the three.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise ValueError(
            f"{path} is not a PyTorch archive ({exc}); save the model with torch.export.save "
            "(or torch.jit.save for TorchScript)"
        ) from None
    # Entries sit under one top folder named after the file when it was saved.
    entries = {name.split("/", 1)[1] for name in names if "/" in name}
    if any(e.startswith("data/aotinductor/") for e in entries):
        return "aoti"
    if any(e.startswith("models/") and e.endswith(".json") for e in entries):
        return "export"
    if "constants.pkl" in entries and any(e.startswith("code/") for e in entries):
        return "torchscript"
    if "data.pkl" in entries:
        raise ValueError(
            f"{path} was written by torch.save (weights or a pickled module), which holds no "
            "program to run; save the model with torch.export.save (or torch.jit.save)"
        )
    raise ValueError(
        f"{path} is a zip archive but neither a torch.export program, an AOTInductor package "
        "nor a TorchScript module"
    )


def wire_type(dtype: Any, what: str) -> str:
    name = str(dtype).removeprefix("torch.")
    if name not in _WIRE_TYPES:
        raise ValueError(
            f"{what} is {name}, which has no wire datatype; the torch backend serves "
            f"{', '.join(_WIRE_TYPES)} tensors"
        )
    return _WIRE_TYPES[name]


def torch_dtype(torch: Any, datatype: str, what: str) -> Any:
    if datatype not in TORCH_TYPES:
        raise ValueError(
            f"{what} is declared {datatype}, which torch tensors cannot hold; declare one of "
            f"{', '.join(TORCH_TYPES)}"
        )
    return getattr(torch, TORCH_TYPES[datatype])


def aoti_device_key(path: Path) -> str | None:
    """The device an AOTInductor package was compiled for ("cpu", "cuda"), from its metadata."""
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if "/data/aotinductor/model/" in name and name.endswith("wrapper_metadata.json"):
                key = json.loads(archive.read(name)).get("AOTI_DEVICE_KEY")
                return str(key) if key is not None else None
    return None
