"""The torch backend: TorchScript, torch.export and AOTInductor models served by a real server
and compared with the same files run in-process; config completion and its errors."""

from __future__ import annotations

import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as tc
from torch import nn

from conftest import ServerProcess
from tiffin.backends import Device
from tiffin.backends.torch import DEFAULT_MAX_BATCH_SIZE, TorchBackend, model_format
from tiffin.protos.datatypes import DATATYPES
from tiffin.protos.model_config import ModelConfig

# TorchScript is deprecated upstream; these tests still build TorchScript files to serve.
pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    # torch's own pytree use inside aoti_compile_and_package
    pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning"),
]

RNG = np.random.default_rng(7)


class Pair(nn.Module):
    """Two inputs, two outputs: a projection and an elementwise product."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 3)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.proj(a) + b.sum(-1, keepdim=True), a * b[:, :4]


class Heads(nn.Module):
    """A dict of outputs."""

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "neg": -x}


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Scale(nn.Module):
    """Returns a view of its input (no copy), or writes into it first when `in_place`."""

    def __init__(self, in_place: bool) -> None:
        super().__init__()
        self.in_place = in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            x.add_(1)
            return x * 2
        return x[:, 1:]


def seeded(cls: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def save_export(
    module: nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    batch: tuple[int, int | None] | None = (0, None),
) -> Path:
    """torch.export with a dynamic first dimension (min, max) on every input; None: static."""
    dynamic = None
    if batch is not None:
        dim = torch.export.Dim("batch", min=batch[0], max=batch[1])
        dynamic = tuple({0: dim} for _ in example)
    torch.export.save(torch.export.export(module, example, dynamic_shapes=dynamic), path)
    return path


def features(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def tensor_input(name: str, array: np.ndarray) -> tc.InferInput:
    datatype = {np.dtype(np.float32): "FP32", np.dtype(np.int64): "INT64"}[array.dtype]
    tensor = tc.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def add_model(repo: Path, name: str, config: str, source: Path) -> None:
    (repo / name / "1").mkdir(parents=True)
    (repo / name / "config.yaml").write_text(config)
    (repo / name / "1" / f"model{source.suffix}").write_bytes(source.read_bytes())


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The model files, from fixed seeds."""
    out = tmp_path_factory.mktemp("files")
    pair_example = (torch.randn(2, 4), torch.randn(2, 5))
    torch.jit.save(torch.jit.script(seeded(Pair)), out / "pair.pt")
    torch.jit.save(torch.jit.script(seeded(Heads)), out / "heads.pt")
    return {
        "pair.pt": out / "pair.pt",
        "heads.pt": out / "heads.pt",
        "pair.pt2": save_export(seeded(Pair), pair_example, out / "pair.pt2"),
        "heads.pt2": save_export(seeded(Heads), (torch.randn(2, 6),), out / "heads.pt2"),
        "mlp.pt2": save_export(seeded(Mlp), (torch.randn(2, 8),), out / "mlp.pt2"),
    }


F32 = "datatype: FP32"
PAIR_IO = f"""
inputs:
  - {{name: b, {F32}, dims: [5]}}
  - {{name: a, {F32}, dims: [4]}}
outputs:
  - {{name: projected, {F32}, dims: [3]}}
  - {{name: product, {F32}, dims: [4]}}
"""
CPU = "instance_group: [{kind: cpu}]\n"
INLINE = "instance_group: [{kind: inline}]\n"

# name -> (config.yaml, file); the broken ones are listed in BROKEN with their reason.
MODELS = {
    "ts_pair": ("max_batch_size: 8\n" + PAIR_IO + CPU, "pair.pt"),
    "ts_heads": (
        f"""max_batch_size: 8
inputs: [{{name: x, {F32}, dims: [6]}}]
outputs: [{{name: neg, {F32}, dims: [6]}}, {{name: double, {F32}, dims: [6]}}]
"""
        + INLINE,
        "heads.pt",
    ),
    "ex_mlp": ("dynamic_batching: {max_queue_delay_microseconds: 100000}\n" + CPU, "mlp.pt2"),
    "ex_pair": (INLINE, "pair.pt2"),
    "ex_heads": (INLINE, "heads.pt2"),
    "ex_bf16": ("parameters: {autocast: bfloat16}\n" + INLINE, "mlp.pt2"),
    "ex_fp16": ("parameters: {autocast: float16, num_threads: 1}\n" + CPU, "mlp.pt2"),
    "bad_ts_name": (
        f"""max_batch_size: 8
inputs: [{{name: x, {F32}, dims: [4]}}, {{name: b, {F32}, dims: [5]}}]
outputs: [{{name: y, {F32}, dims: [3]}}, {{name: z, {F32}, dims: [4]}}]
""",
        "pair.pt",
    ),
    "bad_ts_count": (
        f"""max_batch_size: 8
inputs: [{{name: a, {F32}, dims: [4]}}, {{name: b, {F32}, dims: [5]}}]
outputs: [{{name: y, {F32}, dims: [3]}}]
""",
        "pair.pt",
    ),
    "bad_ts_undeclared": ("max_batch_size: 8\n", "pair.pt"),
    "bad_ex_name": (f"inputs: [{{name: x, {F32}, dims: [8]}}]\n", "mlp.pt2"),
    "bad_ex_dtype": ("inputs: [{name: features, datatype: FP16, dims: [8]}]\n", "mlp.pt2"),
    "bad_ex_key": (f"outputs: [{{name: triple, {F32}, dims: [6]}}]\n", "heads.pt2"),
    "bad_param": ("parameters: {threads: 2}\n", "mlp.pt2"),
    "bad_autocast": ("parameters: {autocast: float8}\n", "mlp.pt2"),
}
BROKEN = {
    "bad_ts_name": "config input 'x' is not an argument of the model's forward (it takes: a, b)",
    "bad_ts_count": "the model returns Tuple[Tensor, Tensor], matched to config outputs in "
    "declared order, but config.yaml declares 1 output(s) (y)",
    "bad_ts_undeclared": "model.pt is a TorchScript module, which records no tensor shapes or "
    "datatypes, so config.yaml must declare its inputs (name, datatype, dims; its forward "
    "takes: a, b)",
    "bad_ex_name": "config input 'x' is not an argument of the model's forward "
    "(it takes: features)",
    "bad_ex_dtype": "input 'features' is declared FP16 but the model has FP32",
    "bad_ex_key": "config output 'triple' is not a key of the dict the model returns "
    "(its keys: double, neg)",
    "bad_param": "parameters threads are unknown to the torch backend; it reads autocast, "
    "num_threads, thread_defaults",
    "bad_autocast": "parameters.autocast must be one of float16, bfloat16, got 'float8'",
}


@pytest.fixture(scope="module")
def server(files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """One server for every model above."""
    repo = tmp_path_factory.mktemp("repo")
    for name, (config, source) in MODELS.items():
        add_model(repo, name, config, files[source])
    process = ServerProcess(repo)
    yield process
    assert process.stop() == 0, process.log()


@pytest.fixture
def client(server: ServerProcess) -> tc.InferenceServerClient:
    return tc.InferenceServerClient(server.url)


def run(module: Callable[..., object], *arrays: np.ndarray, autocast: torch.dtype | None = None):
    """The module's answer in this process, as numpy."""
    context = torch.autocast("cpu", dtype=autocast, enabled=autocast is not None)
    with torch.inference_mode(), context:
        out = module(*[torch.from_numpy(np.array(a)) for a in arrays])
    convert = lambda t: t.float().numpy()  # noqa: E731 - autocast leaves half precision
    if isinstance(out, dict):
        return {k: convert(v) for k, v in out.items()}
    return tuple(convert(t) for t in out) if isinstance(out, (tuple, list)) else convert(out)


def exported(path: Path) -> Callable[..., object]:
    return torch.export.load(path).module()


def call_concurrently(fn: Callable[[int], object], count: int) -> list[object]:
    results: list[object] = [None] * count

    def one(i: int) -> None:
        results[i] = fn(i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


# --- served -------------------------------------------------------------------------------


def test_good_models_are_ready_and_broken_ones_unavailable(client):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert set(index) == set(MODELS)
    for name in MODELS:
        expected = "UNAVAILABLE" if name in BROKEN else "READY"
        assert index[name].state == expected, (name, index[name].reason)


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_mismatch_or_bad_parameter_is_the_reason(client, name):
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index[name].state == "UNAVAILABLE"
    assert BROKEN[name] in index[name].reason


def test_torchscript_inputs_and_outputs_mapped_by_name(client, files):
    a, b = features(3, 4), features(3, 5)
    # config.yaml declares b before a; the request sends them in yet another order.
    result = client.infer("ts_pair", [tensor_input("a", a), tensor_input("b", b)])
    projected, product = run(torch.jit.load(files["pair.pt"]), a, b)
    np.testing.assert_allclose(result.as_numpy("projected"), projected, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("product"), product)


def test_torchscript_dict_outputs_by_key_inline(client, files):
    x = features(2, 6)
    expected = run(torch.jit.load(files["heads.pt"]), x)
    result = client.infer("ts_heads", [tensor_input("x", x)])
    np.testing.assert_array_equal(result.as_numpy("neg"), expected["neg"])
    np.testing.assert_array_equal(result.as_numpy("double"), expected["double"])
    only = client.infer(
        "ts_heads", [tensor_input("x", x)], outputs=[tc.InferRequestedOutput("double")]
    )
    assert only.as_numpy("neg") is None
    np.testing.assert_array_equal(only.as_numpy("double"), expected["double"])


def test_export_config_completed_from_the_program(client):
    config = client.get_model_config("ex_mlp").config
    assert (config.backend, config.platform) == ("torch", "torch_export")
    assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE
    assert [(t.name, list(t.dims)) for t in config.input] == [("features", [8])]
    assert [(t.name, list(t.dims)) for t in config.output] == [("OUTPUT__0", [3])]
    pair = client.get_model_metadata("ex_pair")
    assert [(t.name, t.datatype, list(t.shape)) for t in pair.inputs] == [
        ("a", "FP32", [-1, 4]),
        ("b", "FP32", [-1, 5]),
    ]
    assert [(t.name, list(t.shape)) for t in pair.outputs] == [
        ("OUTPUT__0", [-1, 3]),
        ("OUTPUT__1", [-1, 4]),
    ]
    heads = client.get_model_metadata("ex_heads")
    assert [t.name for t in heads.outputs] == ["double", "neg"]


def test_export_values_inline(client, files):
    a, b = features(4, 4), features(4, 5)
    result = client.infer("ex_pair", [tensor_input("b", b), tensor_input("a", a)])
    first, second = run(exported(files["pair.pt2"]), a, b)
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), first, rtol=1e-6)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), second)
    x = features(3, 6)
    heads = client.infer("ex_heads", [tensor_input("x", x)])
    np.testing.assert_array_equal(heads.as_numpy("double"), x * 2)
    np.testing.assert_array_equal(heads.as_numpy("neg"), -x)


def test_concurrent_requests_batch_in_a_worker(client, files):
    rows = [features(1, 8) for _ in range(8)]
    results = call_concurrently(
        lambda i: client.infer("ex_mlp", [tensor_input("features", rows[i])]), len(rows)
    )
    module = exported(files["mlp.pt2"])
    for row, result in zip(rows, results, strict=True):
        # A row computed within a batch may round differently from one computed alone.
        np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), run(module, row), rtol=1e-5)
    stats = client.get_inference_statistics("ex_mlp", "1").model_stats[0]
    assert max(b.batch_size for b in stats.batch_stats) > 1, stats.batch_stats
    assert stats.inference_count == len(rows)


@pytest.mark.parametrize(
    ("name", "dtype"), [("ex_bf16", torch.bfloat16), ("ex_fp16", torch.float16)]
)
def test_autocast_parameter(client, files, name, dtype):
    x = features(4, 8)
    module = exported(files["mlp.pt2"])
    result = client.infer(name, [tensor_input("features", x)])
    assert result.get_output("OUTPUT__0").datatype == "FP32"  # converted back as declared
    got = result.as_numpy("OUTPUT__0")
    np.testing.assert_allclose(got, run(module, x, autocast=dtype), rtol=1e-3, atol=1e-3)
    assert np.abs(got - run(module, x)).max() > 1e-5  # computed in half precision indeed


# --- in-process: the backend seam itself --------------------------------------------------


def complete(path: Path, config: str = "") -> ModelConfig:
    import yaml

    data = yaml.safe_load(config) or {}
    return TorchBackend.complete_config(ModelConfig.model_validate({"name": "m", **data}), path)


def loaded(path: Path, config: str = "") -> TorchBackend:
    """A backend loaded on the CPU from `path` as a version folder's model file."""
    version_dir = path.parent / path.stem
    version_dir.mkdir(exist_ok=True)
    target = version_dir / f"model{path.suffix}"
    target.write_bytes(path.read_bytes())
    backend = TorchBackend()
    backend.load(complete(target, config), version_dir, Device("cpu"))
    return backend


def read_only(array: np.ndarray) -> np.ndarray:
    """The array as the server hands over request bytes: a read-only view."""
    return np.frombuffer(array.tobytes(), array.dtype).reshape(array.shape)


def test_missing_torch_is_a_sentence(files, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails
    with pytest.raises(RuntimeError, match=r"needs PyTorch: pip install 'tiffin\[torch\]'"):
        TorchBackend.complete_config(ModelConfig(name="m"), files["mlp.pt2"])


def test_formats_told_apart_by_contents(files, tmp_path):
    assert model_format(files["pair.pt"]) == "torchscript"
    assert model_format(files["mlp.pt2"]) == "export"
    renamed = tmp_path / "model.pt"  # an export archive under TorchScript's name
    renamed.write_bytes(files["mlp.pt2"].read_bytes())
    assert model_format(renamed) == "export"
    torch.save(seeded(Mlp).state_dict(), tmp_path / "weights.pt")
    with pytest.raises(ValueError, match="was written by torch.save"):
        model_format(tmp_path / "weights.pt")
    (tmp_path / "junk.pt2").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not a PyTorch archive"):
        model_format(tmp_path / "junk.pt2")


def test_export_dims_and_batch_completed(tmp_path):
    bounded = save_export(seeded(Mlp), (torch.randn(2, 8),), tmp_path / "bounded.pt2", (1, 3))
    config = complete(bounded)
    assert config.max_batch_size == 3  # the exported upper bound, below the default
    assert [(t.name, t.datatype, t.dims) for t in config.inputs] == [("features", "FP32", [8])]
    with pytest.raises(ValueError, match="max_batch_size is 8 but the program's batch dimension"):
        complete(bounded, "max_batch_size: 8")
    with pytest.raises(ValueError, match=r"declared with dims \[7\] but the model's shape is"):
        complete(bounded, "inputs: [{name: features, datatype: FP32, dims: [7]}]")
    fixed = save_export(seeded(Mlp), (torch.randn(2, 8),), tmp_path / "fixed.pt2", None)
    config = complete(fixed)
    assert config.max_batch_size == 0
    assert [t.dims for t in config.inputs + config.outputs] == [[2, 8], [2, 3]]
    with pytest.raises(ValueError, match="features, OUTPUT__0 of the program have no dynamic"):
        complete(fixed, "max_batch_size: 4")
    from_two = save_export(seeded(Mlp), (torch.randn(2, 8),), tmp_path / "two.pt2", (2, 64))
    assert complete(from_two).max_batch_size == 0  # a batch of one would not run
    with pytest.raises(ValueError, match="first dimension starts at 2"):
        complete(from_two, "max_batch_size: 4")


def test_bytes_and_nested_outputs_refused(files, tmp_path):
    with pytest.raises(ValueError, match="declared BYTES, which torch tensors cannot hold"):
        complete(files["mlp.pt2"], "inputs: [{name: features, datatype: BYTES, dims: [8]}]")
    with pytest.raises(ValueError, match="num_threads must be a whole number >= 1, got '0'"):
        complete(files["mlp.pt2"], "parameters: {num_threads: 0}")


def test_cpu_tensors_share_memory_with_numpy(tmp_path):
    x = read_only(features(3, 4))
    for path in (
        save_export(Scale(False), (torch.randn(2, 4),), tmp_path / "view.pt2"),
        tmp_path / "view.pt",
    ):
        if path.suffix == ".pt":
            torch.jit.save(torch.jit.script(Scale(False)), path)
        config = "max_batch_size: 8\ninputs: [{name: x, datatype: FP32, dims: [4]}]\n" + (
            "outputs: [{name: OUTPUT__0, datatype: FP32, dims: [3]}]"
            if path.suffix == ".pt"
            else ""
        )
        with warnings.catch_warnings():
            # torch warns (once per process) when given a read-only array; the backend,
            # which knows this model never writes its inputs, keeps that out of the logs.
            warnings.filterwarnings("error", message="The given NumPy array is not writable")
            out = loaded(path, config).infer({"x": x}, ["OUTPUT__0"])["OUTPUT__0"]
        np.testing.assert_array_equal(out, x[:, 1:])
        assert np.shares_memory(out, x), path.name  # no copy in, no copy out


def test_model_writing_its_inputs_never_writes_request_bytes(tmp_path):
    x = features(2, 4)
    request = read_only(x)
    for path in (
        save_export(Scale(True), (torch.randn(2, 4),), tmp_path / "inplace.pt2"),
        tmp_path / "inplace.pt",
    ):
        if path.suffix == ".pt":
            torch.jit.save(torch.jit.script(Scale(True)), path)
        config = "max_batch_size: 8\ninputs: [{name: x, datatype: FP32, dims: [4]}]\n" + (
            "outputs: [{name: OUTPUT__0, datatype: FP32, dims: [4]}]"
            if path.suffix == ".pt"
            else ""
        )
        out = loaded(path, config).infer({"x": request}, ["OUTPUT__0"])["OUTPUT__0"]
        np.testing.assert_allclose(out, (x + 1) * 2)
        np.testing.assert_array_equal(request, x)  # the request's bytes are untouched


class HalfBrain(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 3


def test_bfloat16_tensors_cross_as_bf16(tmp_path):
    path = save_export(HalfBrain(), (torch.randn(2, 4, dtype=torch.bfloat16),), tmp_path / "b.pt2")
    config = complete(path)
    assert [(t.datatype) for t in config.inputs + config.outputs] == ["BF16", "BF16"]
    values = torch.randn(3, 4).to(torch.bfloat16)
    bits = values.view(torch.uint16).numpy().view(DATATYPES["BF16"].numpy)
    out = loaded(path).infer({"x": bits}, ["OUTPUT__0"])["OUTPUT__0"]
    assert out.dtype == DATATYPES["BF16"].numpy
    expected = (values * 3).view(torch.uint16).numpy()
    np.testing.assert_array_equal(out.view(np.uint16), expected)
    # Declared FP32, a bfloat16 output is converted (as autocast's are).
    wide = loaded(path, "outputs: [{name: y, datatype: FP32, dims: [4]}]")
    y = wide.infer({"x": bits}, ["y"])["y"]
    np.testing.assert_array_equal(y, (values * 3).float().numpy())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_gpu_instance_refused_without_cuda(files, tmp_path):
    version_dir = tmp_path / "1"
    version_dir.mkdir()
    (version_dir / "model.pt2").write_bytes(files["mlp.pt2"].read_bytes())
    config = complete(version_dir / "model.pt2")
    with pytest.raises(RuntimeError, match=r"torch.cuda.is_available\(\) is false"):
        TorchBackend().load(config, version_dir, Device("gpu", 0))


# --- AOTInductor (compiles C++: the slowest fixture here) --------------------------------

AOTI_IO = f"""max_batch_size: 8
inputs: [{{name: features, {F32}, dims: [8]}}]
outputs: [{{name: scores, {F32}, dims: [3]}}]
"""
AOTI_MODELS = {
    "aoti": (AOTI_IO + "dynamic_batching: {}\n" + CPU),
    "aoti_inline": (AOTI_IO + INLINE),
    "bad_aoti_inputs": (
        AOTI_IO.replace("inputs: [", f"inputs: [{{name: extra, {F32}, dims: [8]}}, ") + INLINE
    ),
    "bad_aoti_autocast": (AOTI_IO + "parameters: {autocast: float16}\n"),
    "bad_aoti_undeclared": "max_batch_size: 8\n",
}
AOTI_BROKEN = {
    "bad_aoti_inputs": "failed to load: ValueError: the AOTInductor package's forward takes 1 "
    "positional tensor(s), which take the config inputs in declared order, but config.yaml "
    "declares 2 (extra, features)",
    "bad_aoti_autocast": "parameters.autocast has no effect on an AOTInductor package",
    "bad_aoti_undeclared": "model.pt2 is an AOTInductor package, which records no tensor shapes",
}


@pytest.fixture(scope="module")
def aoti_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("aoti") / "mlp.pt2"
    batch = torch.export.Dim("batch", min=1, max=64)
    program = torch.export.export(seeded(Mlp), (torch.randn(2, 8),), dynamic_shapes=({0: batch},))
    torch._inductor.aoti_compile_and_package(program, package_path=str(path))
    return path


@pytest.fixture(scope="module")
def aoti_client(aoti_package: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    repo = tmp_path_factory.mktemp("aoti_repo")
    for name, config in AOTI_MODELS.items():
        add_model(repo, name, config, aoti_package)
    process = ServerProcess(repo)
    yield tc.InferenceServerClient(process.url)
    assert process.stop() == 0, process.log()


def test_aoti_package_served_in_a_worker_and_inline(aoti_client, aoti_package, files):
    assert model_format(aoti_package) == "aoti"
    compiled = torch._inductor.aoti_load_package(str(aoti_package))
    eager = exported(files["mlp.pt2"])  # the same seed and graph, not compiled
    x = features(5, 8)
    expected = run(compiled, x)
    np.testing.assert_allclose(expected, run(eager, x), rtol=1e-4, atol=1e-5)
    for name in ("aoti", "aoti_inline"):
        result = aoti_client.infer(name, [tensor_input("features", x)])
        np.testing.assert_allclose(result.as_numpy("scores"), expected, rtol=1e-6, atol=1e-7)


def test_aoti_mismatch_is_the_reason(aoti_client):
    index = {m.name: m for m in aoti_client.get_model_repository_index().models}
    for name, reason in AOTI_BROKEN.items():
        assert index[name].state == "UNAVAILABLE"
        assert reason in index[name].reason, index[name].reason


# --- GPU -----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_export_on_gpu_matches_cpu(make_server, files, tmp_path):
    repo = tmp_path / "models"
    add_model(repo, "mlp", "instance_group: [{kind: gpu, count: 1}]\n", files["mlp.pt2"])
    add_model(
        repo,
        "mlp_half",
        "parameters: {autocast: float16}\ninstance_group: [{kind: gpu}]\n",
        files["mlp.pt2"],
    )
    client = tc.InferenceServerClient(make_server(repo).url)
    x = features(4, 8)
    module = exported(files["mlp.pt2"])
    result = client.infer("mlp", [tensor_input("features", x)])
    np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), run(module, x), rtol=1e-4, atol=1e-5)
    half = client.infer("mlp_half", [tensor_input("features", x)]).as_numpy("OUTPUT__0")
    assert half.dtype == np.float32
    np.testing.assert_allclose(half, run(module, x), rtol=1e-2, atol=1e-2)


def test_num_threads_follows_the_cores_when_left_out(files, monkeypatch) -> None:
    """Left out, num_threads fits the cores the server may use (one here), and ModelConfig
    says it was chosen; given, it wins."""
    from tiffin.backends import torch as torch_backend
    from tiffin.backends.cpu_budget import CpuBudget

    monkeypatch.setattr(torch_backend, "read_cpu_budget", lambda: CpuBudget(1))
    chosen = complete(files["mlp.pt2"])
    assert chosen.parameters["num_threads"] == "1"
    assert "num_threads chosen by Tiffin" in str(chosen.parameters["thread_defaults"])
    given = complete(files["mlp.pt2"], "parameters: {num_threads: 3}")
    assert given.parameters["num_threads"] == 3 and "thread_defaults" not in given.parameters
