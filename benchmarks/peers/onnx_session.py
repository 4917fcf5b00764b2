"""The onnxruntime session every peer serves with, so that they differ in their server only.

Imported from this folder (a script's own folder, BentoML's --working-dir, MLServer's
PYTHONPATH) inside each peer's venv; it imports only onnxruntime, never Tiffin.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

INPUT, OUTPUT = "INPUT0", "OUTPUT0"


def load_session(model_file: Path | str) -> Any:
    """An onnxruntime session on one intra-op thread, spinning off (the core is shared with
    the server's own work), as the in-process limit and Tiffin's defaults on one core use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
