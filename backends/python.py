"""Python backend: your own code in `model.py` serves the model (pre/post-processing, custom logic).

A version folder holds `model.py` defining one subclass of `tiffin.backends.Backend`;
config.yaml declares the inputs and outputs (they cannot be read from Python code), and
`max_batch_size` (default 0: no batch dimension, as in Triton's python backend)::

    models/text_to_vec/config.yaml
        max_batch_size: 8
        inputs:  [{name: TEXT, datatype: BYTES, dims: [1]}]
        outputs: [{name: VEC, datatype: FP32, dims: [2]}]
        dynamic_batching: {max_queue_delay_microseconds: 2000}
    models/text_to_vec/1/model.py
        import json
        import numpy as np
        from tiffin.backends import Backend

        class TextToVec(Backend):
            def load(self, config, version_dir, device):
                self.scale = float(config.parameters.get("scale", 1.0))

            def infer(self, inputs, outputs):
                texts = inputs["TEXT"][:, 0]  # a batch of bytes objects
                rows = [json.loads(t)["xy"] for t in texts]
                return {"VEC": np.asarray(rows, dtype=np.float32) * self.scale}

The contract:
- `load(config, version_dir, device)` runs once per instance; `config` is the completed
  `ModelConfig` (read your own settings from `config.parameters`, which this backend passes
  through unchecked). `unload()` is optional.
- `infer(inputs, outputs)` gets a whole batch: input name -> numpy array, the batch first when
  max_batch_size > 0. BYTES inputs are object arrays of `bytes`. The arrays may view shared
  memory that the next batch reuses: copy what you keep. Return a dict with an array for every
  name in `outputs` (more are ignored), each of its declared datatype and shape; BYTES outputs
  may be object arrays of bytes or str (or numpy S/U arrays).
- To fail single requests of a batch (one response or error per request, as in Triton's
  python backend), define `infer_batch(inputs, outputs, rows)` too: it is then called instead
  of `infer`. `rows` holds the rows of each request in batch order, so request `i` owns rows
  `sum(rows[:i])` up to `sum(rows[:i + 1])` (without a batch dimension, a batch is one
  request and `rows` is `[1]`); return `tiffin.backends.BatchResult(outputs,
  failed)`, where `outputs` is as `infer` returns it, with rows for every request (those of
  failed requests are ignored; empty when all failed), and `failed` maps a request's index to
  its exception::

      def infer_batch(self, inputs, outputs, rows):
          failed, start = {}, 0
          for i, n in enumerate(rows):
              if (inputs["X"][start : start + n] < 0).any():
                  failed[i] = InvalidInput("X must not be negative")  # tiffin.protos.errors
              start += n
          return BatchResult({"Y": inputs["X"] * 2}, failed)

- If model.py defines several Backend subclasses, `parameters: {class_name: Name}` picks one.

Errors: a request reported in `failed` fails alone and nothing runs again: an `InvalidInput`
with INVALID_ARGUMENT and its message, any other exception with INTERNAL and its type and
message. An exception raised by `infer` (or `infer_batch`) fails the whole batch: as a
fallback, the scheduler runs a batch of several requests again one request at a time
(repeating the work of the good ones), so that only the bad request fails, with INTERNAL and
the exception's type and message; the traceback goes to the server log. An exception while
importing model.py or in `load` makes the version UNAVAILABLE with a reason naming model.py and
the traceback's last line (for a SyntaxError, the file and line).

Modules next to model.py: `from . import helpers` works at any time (model.py is imported as a
module of a private package for its version folder). A plain `import helpers` works at the top
of model.py, when the module is first imported: the folder is on `sys.path` only while model.py
is being imported, and sibling modules found that way are then taken out of `sys.modules`'
global names. So two models or versions in one process (inline instances) each get their own
`helpers`, and a plain import of a sibling inside a function, at infer time, does not find it:
import siblings at the top of model.py, or relatively. Give siblings names unlike the standard
library's (a plain `import json` keeps meaning the standard library's json).
"""

from __future__ import annotations

import importlib
import importlib.machinery
import importlib.util
import inspect
import itertools
import logging
import os
import re
import sys
import traceback
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType, TracebackType
from typing import Any

import numpy as np

from tiffin.protos.datatypes import DATATYPES, from_numpy
from tiffin.protos.errors import InvalidInput
from tiffin.protos.model_config import ModelConfig, TensorConfig, shape_fits

from .base import Backend, BatchResult, Device

log = logging.getLogger(__name__)

#: The one parameter this backend reads itself; all others belong to model.py.
CLASS_NAME_PARAMETER = "class_name"

# Private package names must differ for every load in a process (two models, two versions,
# a version reloaded while the old one still serves).
_LOADS = itertools.count()


class PythonModelError(RuntimeError):
    """model.py could not be imported or loaded, or its `infer` failed or answered wrongly."""


def _location(tb: TracebackType | None, version_dir: Path) -> str:
    """' (model.py, line 12, in infer)': the innermost frame in the version folder, if any."""
    for frame in reversed(traceback.extract_tb(tb)):
        try:
            relative = Path(frame.filename).resolve().relative_to(version_dir.resolve())
        except ValueError:
            continue
        return f" ({relative}, line {frame.lineno}, in {frame.name})"
    return ""


def describe_exception(exc: BaseException, version_dir: Path) -> str:
    """The traceback's last line, with where in the version folder it was raised."""
    if isinstance(exc, SyntaxError):  # its location is the faulty file, not a frame
        filename = Path(exc.filename or "?")
        try:
            filename = filename.resolve().relative_to(version_dir.resolve())
        except ValueError:
            pass
        return f"{type(exc).__name__}: {exc.msg} ({filename}, line {exc.lineno})"
    last_line = traceback.format_exception_only(type(exc), exc)[-1].strip()
    return last_line + _location(exc.__traceback__, version_dir)


def _sibling_names(version_dir: Path, model_file: Path) -> set[str]:
    """Top-level module names that a plain import could find in the version folder, but for
    standard-library names: hiding those while model.py runs would hand the sibling to every
    library imported meanwhile."""
    names = set()
    for path in version_dir.iterdir():
        if path.suffix == ".py" and path.name != model_file.name and path.stem.isidentifier():
            names.add(path.stem)
        elif path.is_dir() and path.name.isidentifier() and any(path.glob("*.py")):
            names.add(path.name)
    return names - set(sys.stdlib_module_names)


def _is_inside(module: ModuleType, folder: str) -> bool:
    """Whether a module was loaded from `folder` (a resolved path, as put on the path)."""
    places = [getattr(module, "__file__", None), *list(getattr(module, "__path__", []))]
    return any(isinstance(p, str) and p.startswith(folder + os.sep) for p in places)


def _private_name(config: ModelConfig, version_dir: Path) -> str:
    readable = re.sub(r"\W", "_", f"{config.name}_{version_dir.name}")
    return f"tiffin_model_{readable}_{next(_LOADS)}"


def _owned_modules(package: str) -> Iterator[str]:
    prefix = package + "."
    return (n for n in list(sys.modules) if n == package or n.startswith(prefix))


def import_model_file(package: str, model_file: Path) -> ModuleType:
    """Imports `model_file` as `<package>.<stem>`, `package` being a fresh package whose
    folder is the version folder; plain imports of its siblings are scoped to it (see the
    module docstring). The caller removes the package's modules when done."""
    version_dir = model_file.parent.resolve()
    spec = importlib.machinery.ModuleSpec(package, None, is_package=True)
    spec.submodule_search_locations = [str(version_dir)]
    sys.modules[package] = importlib.util.module_from_spec(spec)
    name = f"{package}.{model_file.stem}"
    file_spec = importlib.util.spec_from_file_location(name, model_file)
    assert file_spec is not None and file_spec.loader is not None
    module = importlib.util.module_from_spec(file_spec)
    # Registered before running it, as `import` does: dataclasses and pickle look it up.
    sys.modules[name] = module

    siblings = _sibling_names(version_dir, model_file)
    # Another model's (or a library's) module of a sibling's name must not answer this
    # folder's plain imports; it is put back afterwards.
    hidden = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in siblings}
    before = set(sys.modules)
    folder = str(version_dir)
    sys.path.insert(0, folder)
    importlib.invalidate_caches()  # files written since the last import must be seen
    try:
        file_spec.loader.exec_module(module)
    finally:
        if folder in sys.path:
            sys.path.remove(folder)
        for found in set(sys.modules) - before:
            if not found.startswith(package + ".") and _is_inside(sys.modules[found], folder):
                # Kept under the private package too, so `from . import x` gets the same module.
                sys.modules.setdefault(f"{package}.{found}", sys.modules.pop(found))
        sys.modules.update(hidden)
    return module


def find_model_class(module: ModuleType, model_file: Path, class_name: str) -> type[Backend]:
    """The Backend subclass that model.py defines (the one named `class_name`, if given)."""
    defined = [
        value
        for value in vars(module).values()
        if isinstance(value, type)
        and issubclass(value, Backend)
        and value.__module__ == module.__name__
    ]
    if class_name:
        value = getattr(module, class_name, None)
        if not (isinstance(value, type) and issubclass(value, Backend)):
            found = ", ".join(c.__name__ for c in defined) or "none"
            raise PythonModelError(
                f"{model_file} has no Backend subclass named '{class_name}' (parameter "
                f"{CLASS_NAME_PARAMETER}); the Backend subclasses it defines: {found}"
            )
        chosen = value
    else:
        concrete = [c for c in defined if not inspect.isabstract(c)]
        if len(concrete) > 1:
            names = ", ".join(c.__name__ for c in concrete)
            raise PythonModelError(
                f"{model_file} defines several Backend subclasses ({names}); name the one to "
                f"serve in config.yaml with `parameters: {{{CLASS_NAME_PARAMETER}: "
                f"{concrete[0].__name__}}}`"
            )
        if not defined:
            raise PythonModelError(
                f"{model_file} defines no subclass of tiffin.backends.Backend; define one, "
                "such as `class Model(Backend):` with load(config, version_dir, device) and "
                "infer(inputs, outputs) methods"
            )
        chosen = concrete[0] if concrete else defined[0]
    if inspect.isabstract(chosen):
        missing = ", ".join(sorted(getattr(chosen, "__abstractmethods__", ())))
        raise PythonModelError(
            f"class {chosen.__name__} in {model_file} does not implement {missing}; a Backend "
            "subclass must define load(config, version_dir, device) and infer(inputs, outputs)"
        )
    return chosen


def import_model_class(
    package: str, model_file: Path, version_dir: Path, class_name: str = ""
) -> type[Backend]:
    """Imports `model_file` (as `import_model_file` does) and finds the Backend subclass to
    serve (as `find_model_class` does), without creating it; PythonModelError naming the file
    and the traceback's last line, the traceback itself logged. The caller removes the
    package's modules when done, failed or not."""
    try:
        module = import_model_file(package, model_file)
    except Exception as exc:
        log.error("%s cannot be imported", model_file, exc_info=True)
        raise PythonModelError(
            f"{model_file} cannot be imported: {describe_exception(exc, version_dir)}"
        ) from None
    return find_model_class(module, model_file, class_name)


def check_model_file(model_file: Path, class_name: str = "") -> str:
    """What loading a python model checks before it creates the model: `model_file` imports
    and defines the Backend subclass to serve. Its name; PythonModelError worded as `load`
    words it. Imports (runs) the file in this process: `serverctl validate` calls this in a
    process of its own."""
    package = f"tiffin_check_{next(_LOADS)}"
    try:
        return import_model_class(package, model_file, model_file.parent, class_name).__name__
    finally:
        for name in _owned_modules(package):
            del sys.modules[name]


class PythonBackend(Backend):
    """Runs the Backend subclass defined in a version folder's `model.py`."""

    name = "python"
    model_filenames = ("model.py",)

    def __init__(self) -> None:
        self._model: Backend | None = None
        self._package = ""
        self._class_name = ""
        self._version_dir = Path()
        self._outputs: dict[str, TensorConfig] = {}
        self._batching = False
        self._reports_failures = False  # model.py's class overrides infer_batch

    @classmethod
    def complete_config(cls, config: ModelConfig, model_path: Path) -> ModelConfig:
        """Checks what a python model must declare: model.py is not imported here (it runs in
        the model's instances only), so inputs and outputs come from config.yaml alone."""
        missing = [what for what in ("inputs", "outputs") if not getattr(config, what)]
        if missing:
            raise ValueError(
                f"{' and '.join(missing)} must be declared for a python model, since they "
                f"cannot be read from {model_path.name}; list each with name, datatype and dims"
            )
        class_name = config.parameters.get(CLASS_NAME_PARAMETER, "")
        if not isinstance(class_name, str) or (class_name and not class_name.isidentifier()):
            raise ValueError(
                f"parameters.{CLASS_NAME_PARAMETER} must be the name of a class in "
                f"{model_path.name}, got {class_name!r}"
            )
        return config.model_copy(
            update={
                "backend": cls.name,
                # As Triton's python backend: no batch dimension unless asked for.
                "max_batch_size": config.max_batch_size or 0,
            }
        )

    def load(self, config: ModelConfig, version_dir: Path, device: Device) -> None:
        """Imports model.py, creates its Backend subclass and calls its `load`."""
        model_file = self.model_path(config, version_dir)
        self._version_dir = version_dir
        self._outputs = {t.name: t for t in config.outputs}
        self._batching = config.batching
        self._package = _private_name(config, version_dir)
        try:
            model_class = import_model_class(
                self._package,
                model_file,
                version_dir,
                str(config.parameters.get(CLASS_NAME_PARAMETER, "")),
            )
            self._class_name = model_class.__name__
            model = model_class()
            model.load(config, version_dir, device)
        except PythonModelError:
            self._forget_modules()
            raise
        except Exception as exc:
            self._forget_modules()
            log.error("%s: %s.load failed", model_file, self._class_name, exc_info=True)
            raise PythonModelError(
                f"{self._class_name}.load in {model_file} failed: "
                f"{describe_exception(exc, version_dir)}"
            ) from None
        self._model = model
        self._reports_failures = model_class.infer_batch is not Backend.infer_batch

    def infer(self, inputs: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
        """Runs the user's `infer` and checks that it answered every output as declared."""
        assert self._model is not None, "infer() before load()"
        try:
            results = self._model.infer(inputs, outputs)
        except Exception as exc:
            log.warning("%s.infer failed", self._class_name, exc_info=True)
            raise PythonModelError(describe_exception(exc, self._version_dir)) from None
        rows = next((len(a) for a in inputs.values() if a.ndim), None) if self._batching else None
        return self._check_outputs("infer", results, outputs, rows)

    def infer_batch(
        self, inputs: dict[str, np.ndarray], outputs: list[str], rows: list[int]
    ) -> BatchResult:
        """Runs the user's `infer_batch` if it has one (else `infer`), and checks its answer:
        every output as declared, failures keyed by request index."""
        if not self._reports_failures:
            return BatchResult(self.infer(inputs, outputs))
        assert self._model is not None, "infer_batch() before load()"
        where = f"{self._class_name}.infer_batch"
        try:
            result = self._model.infer_batch(inputs, outputs, rows)
        except Exception as exc:
            log.warning("%s failed", where, exc_info=True)
            raise PythonModelError(describe_exception(exc, self._version_dir)) from None
        if not isinstance(result, BatchResult):
            raise PythonModelError(
                f"{where} returned {type(result).__name__}; it must return "
                "tiffin.backends.BatchResult(outputs, failed)"
            )
        failed = self._check_failures(where, result.failed, len(rows))
        if len(failed) == len(rows):
            return BatchResult({}, failed)
        total = sum(rows) if self._batching else None
        checked = self._check_outputs("infer_batch", result.outputs, outputs, total)
        return BatchResult(checked, failed, result.input_ns, result.output_ns)

    def _check_failures(self, where: str, failed: Any, requests: int) -> dict[int, Exception]:
        """`failed` with each error the client is not at fault for worded as a traceback's last
        line; PythonModelError when it does not map request indexes to exceptions."""
        if not isinstance(failed, Mapping):
            raise PythonModelError(
                f"{where} returned failed={type(failed).__name__}; it must map request indexes "
                "to exceptions"
            )
        checked: dict[int, Exception] = {}
        for index, error in failed.items():
            if not isinstance(index, int) or not 0 <= index < requests:
                raise PythonModelError(
                    f"{where} reported a failure for request {index!r}, but the batch holds "
                    f"requests 0 to {requests - 1}"
                )
            if not isinstance(error, Exception):
                raise PythonModelError(
                    f"{where} reported {type(error).__name__} for request {index}; report an "
                    "exception, such as tiffin.protos.errors.InvalidInput for a bad request"
                )
            if isinstance(error, InvalidInput):
                checked[index] = error
            else:
                checked[index] = PythonModelError(describe_exception(error, self._version_dir))
        return checked

    def _check_outputs(
        self, method: str, results: Any, outputs: list[str], rows: int | None
    ) -> dict[str, np.ndarray]:
        """The outputs that `method` answered, each checked against the config."""
        if not isinstance(results, Mapping):
            what = "outputs of type " if method == "infer_batch" else ""
            raise PythonModelError(
                f"{self._class_name}.{method} returned {what}{type(results).__name__}; it must "
                "return a dict mapping output names to arrays"
            )
        checked = {}
        for name in outputs:
            if name not in results:
                returned = ", ".join(map(str, results)) or "nothing"
                raise PythonModelError(
                    f"{self._class_name}.{method} returned no output '{name}' (it returned "
                    f"{returned})"
                )
            checked[name] = self._check_output(self._outputs[name], results[name], rows, method)
        return checked

    def _check_output(
        self, tensor: TensorConfig, value: Any, rows: int | None, method: str = "infer"
    ) -> np.ndarray:
        """The output as an array of its declared datatype, or a sentence on what is wrong."""
        where = f"output '{tensor.name}' returned by {self._class_name}.{method}"
        array = np.asarray(value)
        if tensor.datatype == "BYTES":
            if array.dtype.kind in "SU":
                array = array.astype(np.object_)
            if array.dtype.kind != "O":
                raise PythonModelError(
                    f"{where} holds {array.dtype}, but it is declared BYTES: return an array of "
                    "bytes or str (dtype object)"
                )
            for i, item in enumerate(array.reshape(-1)):
                if not isinstance(item, bytes | bytearray | str):
                    raise PythonModelError(
                        f"{where} is declared BYTES, so its elements must be bytes or str; "
                        f"element {i} is {type(item).__name__}"
                    )
        else:
            expected = DATATYPES[tensor.datatype]
            try:
                got = from_numpy(array.dtype).name
            except KeyError:
                got = str(array.dtype)
            if got != tensor.datatype and array.dtype != expected.numpy:
                raise PythonModelError(
                    f"{where} holds {array.dtype} ({got}), but it is declared {tensor.datatype}: "
                    f"convert it, e.g. with .astype(numpy.{expected.numpy.name})"
                )
        declared = ([rows if rows is not None else -1] if self._batching else []) + tensor.dims
        if not shape_fits(array.shape, declared):
            batch = f" after a batch dimension of {rows}: {declared}" if self._batching else ""
            raise PythonModelError(
                f"{where} has shape {list(array.shape)}, but the config declares dims "
                f"{tensor.dims}{batch}"
            )
        return array

    def unload(self) -> None:
        """Calls the user's `unload` and forgets model.py's modules."""
        model, self._model = self._model, None
        try:
            if model is not None:
                model.unload()
        except Exception:  # unloading goes on; the author learns of it from the log
            log.exception("%s.unload failed", self._class_name)
        finally:
            self._forget_modules()

    def _forget_modules(self) -> None:
        if self._package:
            for name in _owned_modules(self._package):
                del sys.modules[name]
