"""The TVM lowering backend: compile -> artifact folder -> load -> run equals eager PyTorch.

Each model is compiled once per module (compiling is the slow part) and the artifact is
shared by the tests that only read it; tests that modify an artifact work on a copy.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import _captured, _model
from torch.export import Dim

import splice
from splice import models
from splice.errors import ArtifactError, LoweringError
from splice.ir import meta as M
from splice.runtime.artifact import FORMAT, MANIFEST
from splice.runtime.backends import tvm as tvm_backend
from splice.runtime.cache import cache_dir
from splice.target import host_target

tvm = pytest.importorskip("tvm")

TVM_ARCHS = ["gpt2", "llama", "bert", "vit", "convnet"]
ATOL = 1e-4
EM_AARCH64 = 183


# ---------------------------------------------------------------------------------------
# helpers and fixtures


def fresh_inputs(name: str, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with the example inputs' shapes and dtypes but other values (seeded)."""
    g = torch.Generator().manual_seed(1234)
    if name in ("gpt2", "llama"):
        return (torch.randint(0, 128, args[0].shape, generator=g),)
    if name == "bert":
        ids = torch.randint(0, 128, args[0].shape, generator=g)
        mask = torch.ones_like(ids)
        mask[..., -3:] = 0  # padding: the mask is a live input, not a folded constant
        return ids, mask
    return tuple(torch.randn(a.shape, generator=g) for a in args)


def eager_outputs(model, args, names: list[str]) -> dict[str, torch.Tensor]:
    """The original eager model's outputs, by the program's output names."""
    with torch.no_grad():
        out = model(*args)
    if isinstance(out, torch.Tensor):
        assert len(names) == 1
        return {names[0]: out}
    return {n: out[n] for n in names}


def no_leftovers(parent: Path, name: str) -> list[str]:
    """Temporary folders atomic_dir leaves next to ``name`` if it did not clean up."""
    return [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def host():
    """The host target, measured once under the session cache dir (conftest sets it)."""
    return host_target()


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, host):
    """(arch name) -> (Artifact, CompiledModel); each architecture is compiled once."""
    cache: dict[str, tuple[splice.Artifact, splice.CompiledModel]] = {}

    def get(name: str):
        if name not in cache:
            out = tmp_path_factory.mktemp(f"tvm-{name}") / f"{name}.artifact"
            art = splice.compile(_captured(name).copy(), host, output=out)
            cache[name] = (art, art.load())
        return cache[name]

    return get


def mlp_program(batch: int = 2):
    model, args = models.mlp(d=32, hidden=64, batch=batch)
    return model, args, splice.capture(model, args)


@pytest.fixture(scope="module")
def mlp(tmp_path_factory, host):
    """A tiny MLP compiled for the host with sample inputs: (eager, args, program, artifact)."""
    model, args, program = mlp_program()
    out = tmp_path_factory.mktemp("tvm-mlp") / "mlp.artifact"
    art = splice.compile(program.copy(), host, output=out, samples=[args])
    return model, args, program, art


# ---------------------------------------------------------------------------------------
# 1, 11: compiled output equals eager PyTorch and the artifact's reference program


@pytest.mark.parametrize("name", TVM_ARCHS)
def test_compiled_equals_eager_pytorch(name, compiled):
    model, example = _model(name)
    art, cm = compiled(name)
    assert art.manifest["lowering"]["unscheduled"] == {}
    for args in (example, fresh_inputs(name, example)):
        ref = eager_outputs(model, args, cm.output_names)
        got = cm.run_named(*args)
        assert set(got) == set(ref) and got
        for out_name, r in ref.items():
            g = got[out_name]
            assert isinstance(g, torch.Tensor)
            assert g.dtype == torch.float32 == r.dtype
            assert g.shape == r.shape, out_name
            err = (g - r).abs().max().item()
            assert err <= ATOL, f"{name}.{out_name}: max abs error {err}"


@pytest.mark.parametrize("name", TVM_ARCHS)
def test_reference_program_runs_and_equals_compiled(name, compiled):
    art, cm = compiled(name)
    _, example = _model(name)
    args = fresh_inputs(name, example)
    reference = splice.load(art.path).reference()
    assert isinstance(reference, splice.Program)
    assert reference.input_names == cm.input_names
    assert reference.output_names == cm.output_names
    with torch.no_grad():
        ref = reference.run_named(*args)
    got = cm.run_named(*args)
    for out_name in cm.output_names:
        assert ref[out_name].shape == got[out_name].shape
        assert (ref[out_name] - got[out_name]).abs().max().item() <= ATOL


# ---------------------------------------------------------------------------------------
# 2, 3: calling conventions and input checks


def test_numpy_in_numpy_out_and_inputs_by_name(compiled):
    _, cm = compiled("bert")
    _, example = _model("bert")
    ids, mask = fresh_inputs("bert", example)
    torch_out = cm.run_named(ids, mask)
    assert all(isinstance(v, torch.Tensor) for v in torch_out.values())

    np_out = cm.run_named(input_ids=ids.numpy(), attention_mask=mask.numpy())
    assert list(np_out) == ["last_hidden_state", "pooler_output"] == cm.output_names
    for out_name, v in np_out.items():
        assert type(v) is np.ndarray
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, torch_out[out_name].numpy())

    # positional, keyword and mixed calls agree; a two-output model returns a tuple
    for out in (
        cm(ids, mask),
        cm(input_ids=ids, attention_mask=mask),
        cm(ids, attention_mask=mask),
    ):
        assert isinstance(out, tuple) and len(out) == 2
        for v, out_name in zip(out, cm.output_names):
            assert torch.equal(v, torch_out[out_name])
    last, pooled = cm(ids.numpy(), mask.numpy())
    assert type(last) is np.ndarray and type(pooled) is np.ndarray
    np.testing.assert_array_equal(pooled, torch_out["pooler_output"].numpy())


def test_one_output_model_returns_one_value_and_outputs_are_fresh(mlp):
    model, (x,), _, art = mlp
    cm = art.load()
    y = cm(x)
    assert isinstance(y, torch.Tensor)
    keep = y.clone()
    y2 = cm(x + 1.0)
    assert torch.equal(y, keep), "a later call overwrote an earlier call's output"
    with torch.no_grad():
        assert (y2 - model(x + 1.0)).abs().max().item() <= ATOL
    ynp = cm(x.numpy())
    assert type(ynp) is np.ndarray
    np.testing.assert_array_equal(ynp, keep.numpy())


def test_wrong_shape_raises_artifact_error_naming_the_input(compiled):
    _, cm = compiled("bert")
    ids = torch.zeros(1, 9, dtype=torch.int64)
    mask = torch.ones(1, 8, dtype=torch.int64)
    with pytest.raises(ArtifactError, match="'input_ids'") as info:
        cm(ids, mask)
    assert "i64[1,9]" in info.value.message and "i64[1,8]" in info.value.message
    with pytest.raises(ArtifactError, match="'attention_mask'"):
        cm(torch.zeros(1, 8, dtype=torch.int64), torch.ones(2, 8, dtype=torch.int64))
    with pytest.raises(ArtifactError, match="'input_ids'"):
        cm(input_ids=np.zeros((1, 9), dtype=np.int64), attention_mask=mask.numpy())


def test_wrong_dtype_raises_artifact_error_naming_the_input(compiled):
    _, cm = compiled("bert")
    ids = torch.zeros(1, 8, dtype=torch.int64)
    mask = torch.ones(1, 8, dtype=torch.int64)
    with pytest.raises(ArtifactError, match="'input_ids'") as info:
        cm(ids.to(torch.int32), mask)
    assert "i32[1,8]" in info.value.message and "i64[1,8]" in info.value.message
    with pytest.raises(ArtifactError, match="'attention_mask'"):
        cm(ids, mask.float())
    with pytest.raises(ArtifactError, match="'attention_mask'"):
        cm(input_ids=ids.numpy(), attention_mask=mask.numpy().astype(np.float32))
    _, cm_vit = compiled("vit")
    (pixels,) = _model("vit")[1]
    with pytest.raises(ArtifactError, match="'pixel_values'"):
        cm_vit(pixels.double())


# ---------------------------------------------------------------------------------------
# 4: tampered and incomplete artifacts


@pytest.mark.parametrize("fname", ["main.so", "weights.safetensors", "program.ir"])
def test_tampered_file_fails_checksum_on_load(fname, mlp, tmp_path):
    *_, art = mlp
    copy = tmp_path / "copy.artifact"
    shutil.copytree(art.path, copy)
    splice.load(copy)  # the untouched copy loads
    f = copy / fname
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    # a new file renamed into place: rewriting the loaded main.so in place would corrupt the
    # mapping the first load still uses (a crash at exit)
    tmp = copy / (fname + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, f)
    with pytest.raises(ArtifactError, match="checksum") as info:
        splice.load(copy)
    assert fname in str(info.value)


@pytest.mark.parametrize("fname", ["main.so", "weights.safetensors", "samples.safetensors"])
def test_missing_file_raises_artifact_error(fname, mlp, tmp_path):
    *_, art = mlp
    copy = tmp_path / "copy.artifact"
    shutil.copytree(art.path, copy)
    (copy / fname).unlink()
    with pytest.raises(ArtifactError, match="missing") as info:
        splice.load(copy)
    assert fname in str(info.value)


def test_missing_manifest_raises_artifact_error(mlp, tmp_path):
    *_, art = mlp
    copy = tmp_path / "copy.artifact"
    shutil.copytree(art.path, copy)
    (copy / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match=MANIFEST):
        splice.load(copy)
    with pytest.raises(ArtifactError):
        splice.CompiledModel(copy)


# ---------------------------------------------------------------------------------------
# 5, 6, 9: lowering errors


def test_missing_tvm_names_the_extra(monkeypatch, tmp_path, host):
    _, _, program = mlp_program()
    monkeypatch.setitem(sys.modules, "tvm", None)  # `import tvm` now raises ImportError
    with pytest.raises(LoweringError) as info:
        tvm_backend.require_tvm()
    assert "splice[tvm]" in (info.value.hint or "")
    assert "splice[tvm]" in str(info.value)
    out = tmp_path / "mlp.artifact"
    with pytest.raises(LoweringError, match=r"splice\[tvm\]"):
        splice.compile(program, host, output=out)
    assert not out.exists()


def test_cuda_without_gpu_is_a_clear_lowering_error(tmp_path):
    if tvm.cuda(0).exist:
        pytest.skip("a CUDA GPU is visible here")
    _, _, program = mlp_program()
    out = tmp_path / "sub" / "mlp-cuda.artifact"
    with pytest.raises(LoweringError, match="cuda") as info:
        splice.compile(program, "cuda", output=out)
    assert "GPU" in info.value.message
    assert info.value.hint and "host" in info.value.hint
    assert not out.exists()
    if out.parent.exists():
        assert no_leftovers(out.parent, out.name) == []


def test_dynamic_shapes_are_a_lowering_error(tmp_path, host):
    model, args = models.mlp(d=32, hidden=64, batch=2)
    program = splice.capture(model, args, dynamic_shapes=({0: Dim("batch", min=1, max=16)},))
    assert not M.tensor_spec(program.input_nodes[0]).is_static
    out = tmp_path / "dyn.artifact"
    with pytest.raises(LoweringError, match="static") as info:
        splice.compile(program, host, output=out)
    assert "%x" in info.value.message and "batch" in info.value.message
    assert "dynamic_shapes" in (info.value.hint or "")
    assert not out.exists()
    assert no_leftovers(tmp_path, out.name) == []


# ---------------------------------------------------------------------------------------
# 7: cross-compiled artifacts


def _elf_dynamic_symbols(data: bytes) -> tuple[int, int, set[str]]:
    """(EI_CLASS, e_machine, names in .dynsym) of a little-endian ELF64 file."""
    assert data[:4] == b"\x7fELF", "not an ELF file"
    ei_class, ei_data = data[4], data[5]
    assert ei_class == 2 and ei_data == 1, "expected ELF64 little-endian"
    (e_machine,) = struct.unpack_from("<H", data, 18)
    (e_shoff,) = struct.unpack_from("<Q", data, 0x28)
    e_shentsize, e_shnum = struct.unpack_from("<HH", data, 0x3A)

    def section(i: int) -> tuple[int, int, int, int, int]:
        _, sh_type, _, _, off, size, link, _, _, entsize = struct.unpack_from(
            "<IIQQQQIIQQ", data, e_shoff + i * e_shentsize
        )
        return sh_type, off, size, link, entsize

    names: set[str] = set()
    for i in range(e_shnum):
        sh_type, off, size, link, entsize = section(i)
        if sh_type != 11:  # SHT_DYNSYM
            continue
        _, stroff, strsize, _, _ = section(link)
        strtab = data[stroff : stroff + strsize]
        for j in range(size // entsize):
            (st_name,) = struct.unpack_from("<I", data, off + j * entsize)
            names.add(strtab[st_name : strtab.index(b"\0", st_name)].decode())
    return ei_class, e_machine, names


def test_aarch64_artifact_is_an_aarch64_library_that_x86_refuses(mlp, tmp_path):
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        if os.environ.get("SPLICE_REQUIRE_QEMU") == "1":
            pytest.fail("SPLICE_REQUIRE_QEMU=1 but aarch64-linux-gnu-gcc is not installed")
        pytest.skip("needs aarch64-linux-gnu-gcc (apt-get install gcc-aarch64-linux-gnu)")
    _, _, program, _ = mlp
    out = tmp_path / "mlp-aarch64.artifact"
    art = splice.compile(program.copy(), "aarch64-linux", output=out)
    target = art.manifest["target"]
    assert target["name"] == "aarch64-linux" and target["triple"] == "aarch64-linux-gnu"
    assert target["tvm"]["mtriple"] == "aarch64-linux-gnu"
    assert art.manifest["required_features"] == []  # the build machine's x86 flags are not required

    ei_class, e_machine, dynsyms = _elf_dynamic_symbols((out / "main.so").read_bytes())
    assert ei_class == 2  # ELFCLASS64
    assert e_machine == EM_AARCH64
    assert "__tvm_ffi__library_bin" in dynsyms
    if shutil.which("readelf"):  # cross-check the little reader against binutils
        text = subprocess.run(
            ["readelf", "-h", "-Ws", "--dyn-syms", str(out / "main.so")],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert "AArch64" in text and "ELF64" in text and "__tvm_ffi__library_bin" in text

    if platform.machine() in ("aarch64", "arm64"):
        pytest.skip("this machine is aarch64: the artifact is loadable here")
    with pytest.raises(ArtifactError, match="aarch64-linux-gnu") as info:
        splice.load(out)
    assert platform.machine() in str(info.value)


# ---------------------------------------------------------------------------------------
# 8: the tuning database


def test_tuning_records_winners_and_reuses_them(monkeypatch, tmp_path, host, mlp):
    model, args, program, _ = mlp
    monkeypatch.setenv("SPLICE_CACHE_DIR", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    db = tmp_path / "cache" / "tvm_tuning.json"
    assert not db.exists()

    art = splice.compile(program.copy(), host, tune=2, output=tmp_path / "a.artifact")
    tuning = art.manifest["lowering"]["tuning"]
    assert len(tuning) == 2  # fc1 and fc2
    assert set(tuning) == set(art.manifest["lowering"]["matmuls"])
    for entry in tuning.values():
        assert entry["source"] == "tuned"
        assert 1 <= entry["tried"] <= 2
        assert entry["us"] > 0
    assert db.is_file()
    records = json.loads(db.read_text())
    assert len(records) == 2
    assert {(r["nb"], r["mi"]) for r in records.values()} == {
        (e["nb"], e["mi"]) for e in tuning.values()
    }
    with torch.no_grad():
        assert (art.load()(*args) - model(*args)).abs().max().item() <= ATOL

    before = db.read_bytes()
    again = splice.compile(program.copy(), host, tune=2, output=tmp_path / "b.artifact")
    tuning2 = again.manifest["lowering"]["tuning"]
    assert set(tuning2) == set(tuning)
    for fname, entry in tuning2.items():
        assert entry["source"] == "database", fname
        assert (entry["nb"], entry["mi"]) == (tuning[fname]["nb"], tuning[fname]["mi"])
        assert "tried" not in entry
    assert db.read_bytes() == before
    # tune=0 also uses the database
    zero = splice.compile(program.copy(), host, tune=0, output=tmp_path / "c.artifact")
    assert {e["source"] for e in zero.manifest["lowering"]["tuning"].values()} == {"database"}


# ---------------------------------------------------------------------------------------
# 10: the manifest and atomic writes


def test_manifest_describes_the_artifact(compiled):
    art, cm = compiled("bert")
    man = art.manifest
    assert man["format"] == FORMAT == "splice.artifact/1"
    assert man["tvm_version"] == tvm.__version__
    assert man["splice_version"] == splice.__version__
    assert man["backend"] == "tvm"
    assert man["target"]["name"] == "host"
    assert man["target"]["tvm"]["kind"] == "llvm"
    program = _captured("bert")
    # token ids index the embedding table (its rows bound them); the mask indexes nothing
    vocab = program.get_weight("embeddings.word_embeddings.weight").shape[0]
    assert man["inputs"] == [
        {"name": "input_ids", "shape": [1, 8], "dtype": "i64", "index_bound": vocab},
        {"name": "attention_mask", "shape": [1, 8], "dtype": "i64"},
    ]
    assert [{k: v for k, v in i.items() if k != "index_bound"} for i in man["inputs"]] == [
        {"name": n, "shape": list(s.shape), "dtype": M.dtype_name(s.dtype)}
        for n, s in zip(program.input_names, program.input_specs)
    ]
    assert man["outputs"] == [
        {"name": "last_hidden_state", "shape": [1, 8, 64], "dtype": "f32"},
        {"name": "pooler_output", "shape": [1, 64], "dtype": "f32"},
    ]
    outs = cm(*_model("bert")[1])
    assert [list(o.shape) for o in outs] == [o["shape"] for o in man["outputs"]]

    on_disk = {p.name for p in art.path.iterdir()}
    assert set(man["files"]) == on_disk - {MANIFEST}
    assert {"main.so", "weights.safetensors", "program.ir"} <= set(man["files"])
    for fname, digest in man["files"].items():
        assert hashlib.sha256((art.path / fname).read_bytes()).hexdigest() == digest, fname
    assert art.files == sorted(man["files"])


def test_samples_are_listed_and_round_trip(mlp):
    _, args, _, art = mlp
    assert "samples.safetensors" in art.manifest["files"]
    assert set(art.manifest["files"]) == {p.name for p in art.path.iterdir()} - {MANIFEST}
    (sample,) = art.load().samples()
    assert len(sample) == len(args)
    assert all(torch.equal(s, a) for s, a in zip(sample, args))


def test_artifact_folder_is_written_atomically(mlp, tmp_path, host, monkeypatch):
    model, args, program, _ = mlp
    out = tmp_path / "m.artifact"
    splice.compile(program.copy(), host, output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.artifact"]
    first = (out / MANIFEST).read_text()

    # a second compile replaces the folder and leaves nothing beside it
    splice.compile(program.copy(), host, output=out, fast_math=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.artifact"]
    assert (out / MANIFEST).read_text() != first
    assert splice.load(out).manifest["options"]["fast_math"] is False

    # a failure while writing keeps the old artifact and removes the half-written one
    def broken_export(ex, path, target, *rest):  # rest: what newer backends pass
        path.write_bytes(b"half a library")
        raise LoweringError("linking failed (injected)")

    monkeypatch.setattr(tvm_backend, "export_library", broken_export)
    with pytest.raises(LoweringError, match="injected"):
        splice.compile(program.copy(), host, output=out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.artifact"]
    cm = splice.load(out)
    assert cm.manifest["options"]["fast_math"] is False
    with torch.no_grad():
        assert (cm(*args) - model(*args)).abs().max().item() <= ATOL

    new = tmp_path / "new" / "n.artifact"
    with pytest.raises(LoweringError, match="injected"):
        splice.compile(program.copy(), host, output=new)
    assert not new.exists()
    assert no_leftovers(new.parent, new.name) == []


def test_tuning_database_merges_concurrent_writers(tmp_path):
    from splice.runtime.backends.tvm_tuner import TuningDatabase
    from splice.runtime.kernels.tvm_schedules import MatmulConfig

    path = tmp_path / "tvm_tuning.json"
    a, b = TuningDatabase(path), TuningDatabase(path)  # both read the (missing) file first
    a.put("ka", MatmulConfig(16, 4), {"us": 1.0})
    b.put("kb", MatmulConfig(8, 1), {"us": 2.0})
    a.save()
    b.save()  # must not drop a's record
    merged = TuningDatabase(path)
    assert merged.get("ka") == MatmulConfig(16, 4)
    assert merged.get("kb") == MatmulConfig(8, 1)


def test_fast_math_turns_small_integer_powers_into_multiplications():
    # GPT-2's gelu_new computes pow(x, 3.0); left as powf it is a scalar libm call per element
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    from splice.runtime.kernels.tvm_fastmath import FastMath

    class Powers(torch.nn.Module):
        def forward(self, x):
            return torch.pow(x, 3.0) + torch.pow(x, 2) - torch.pow(x.abs(), 0.5)

    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))
    mod = from_exported_program(torch.export.export(Powers(), (x,)))
    before = mod.script()
    assert before.count("R.power") == 3
    after = FastMath()(mod)
    text = after.script()
    assert text.count("R.power") == 1  # only the non-integer exponent stays
    assert text.count("_integer_power") >= 2
    built = relax.VirtualMachine(tvm.compile(after, target="llvm"), tvm.cpu())
    got = torch.from_dlpack(built["main"](tvm.runtime.from_dlpack(x))[0])
    assert torch.allclose(got, Powers()(x), atol=1e-6, rtol=1e-6)
