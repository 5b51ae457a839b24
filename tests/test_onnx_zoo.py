"""Acceptance of ONNX export (issue 19): zoo models, plain and after each structural pass,
exported, checked (``onnx.checker`` full check) and run by ONNX Runtime, equal to the
Program (max abs <= 1e-4) on every input set: every branch input of the dynamic models,
every configuration of a stitched program.

The cases and their pass options are :mod:`splice.zoo`'s. A torch.onnx export takes
seconds (a program with k conds is 2k + 1 exports), so by default every model is exported
plain and each pass on a few models of different families (:data:`DEFAULT`); with
``SPLICE_ONNX_ZOO=full`` the matrix is every model of ``splice.models.FACTORIES`` and of
the dynamic zoo after every pass that applies to it (minutes).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import pytest
import torch

import splice
from splice import models, models_dynamic, zoo
from splice.ir.signatures import SignatureSet, signature_of, signature_of_values
from splice.passes import PassContext, parse_pipeline

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("transformers")

from splice.runtime.backends.onnx import all_nodes, to_onnx  # noqa: E402

TOL = 1e-4

STATIC = [n for n in models.FACTORIES if n in zoo.BY_NAME]
DYNAMIC = [*models_dynamic.ZOO, *models_dynamic.SELECT_ZOO]


def _matrix() -> list[tuple[str, str]]:
    out = []
    for name in [*STATIC, *DYNAMIC]:
        case = zoo.BY_NAME[name]
        out.append((name, "plain"))
        out += [(name, p) for p in zoo.PASSES if p in case.passes]
    return out


DEFAULT = [
    *((n, "plain") for n in [*STATIC, *DYNAMIC]),
    ("gpt2", "lowrank"),
    ("bert", "lowrank"),
    ("early_exit", "lowrank"),
    ("llama", "experts"),
    ("mlp", "experts"),
    ("routed_moe", "experts"),
    ("vit", "hyper"),
    ("skipnet", "hyper"),
    ("conv_family", "stitch"),
    ("early_exit", "branches"),
    ("switch_moe", "branches"),
]
CASES = _matrix() if os.environ.get("SPLICE_ONNX_ZOO") == "full" else DEFAULT


@functools.cache
def built(name: str) -> zoo.ZooModel:
    return zoo.BY_NAME[name].build()


@functools.cache
def _captured(name: str):
    return zoo.BY_NAME[name].capture(built(name))


def transformed(name: str, pass_name: str):
    """(program or SignatureSet, input sets) after ``pass_name``, as the zoo runs it."""
    case, zm = zoo.BY_NAME[name], built(name)
    base = _captured(name).copy()
    inputs = list(zm.inputs)
    samples = zm.inputs[:1]
    if pass_name == "plain":
        return base, inputs
    if pass_name == "lowrank":
        pipeline = f'lowrank{{ratio=0.5,targets="{case.lowrank_targets}"}}'
        sample = samples if case.kind != "static" else None
        return parse_pipeline(pipeline).run(base, sample_inputs=sample).program, inputs
    if pass_name == "experts":  # top-2 of 4: the TopK path of splice.moe_ffn
        pipeline = f'experts{{num_experts=4,top_k=2,targets="{case.experts_targets}"}}'
        return parse_pipeline(pipeline).run(base, sample_inputs=samples).program, inputs
    if pass_name == "hyper":
        out = parse_pipeline(f'hyper{{targets="{case.hyper}"}}').run(base, sample_inputs=samples)
        first = members(out.program)[0]
        added = [n for n in first.input_names if n not in members(base)[0].input_names]
        index = first.input_names.index(added[0])
        g = torch.Generator().manual_seed(7)
        conditioned = []
        for x in inputs:
            args = list(x)
            args.insert(index, torch.rand(1, generator=g))
            conditioned.append(tuple(args))
        return out.program, conditioned
    if pass_name == "stitch":
        small_zm = case.family(case.family_width)
        small = splice.capture(small_zm.model, small_zm.example)
        ctx = PassContext(sample_inputs=[*zm.inputs, *zm.calib], programs={"large": base})
        out = parse_pipeline("stitch{anchors=large,calib_samples=8}").run(small, ctx=ctx).program
        # configurations 0..k-1 (one per decision point); k is out of range, where the
        # program's last branch returns NaN (compared as NaN below)
        n_configs = 1 + len(_conds(out))
        return out, [(*x, torch.tensor(c)) for x in inputs for c in range(n_configs)]
    if pass_name == "branches":
        return parse_pipeline("branches").run(base, sample_inputs=samples).program, inputs
    raise AssertionError(pass_name)


def _conds(program):
    from splice.ir.host_steps import is_cond
    from splice.ir.program import iter_graphs

    return [n for _, gm in iter_graphs(program) for n in gm.graph.nodes if is_cond(n)]


def _count(program, target: str) -> int:
    from splice.ir.program import iter_graphs

    return sum(
        1
        for _, gm in iter_graphs(program)
        for n in gm.graph.nodes
        if n.op == "call_function" and str(n.target).startswith(target)
    )


def members(p) -> list:
    return list(p) if isinstance(p, SignatureSet) else [p]


@pytest.mark.parametrize(("name", "pass_name"), CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_exported_model_equals_the_program(name, pass_name):
    program, inputs = transformed(name, pass_name)
    checked = 0
    for member in members(program):
        proto = to_onnx(member)  # checks with onnx.checker, full_check=True
        onnx.checker.check_model(proto, full_check=True)
        assert not any(o.domain.startswith("splice.export") for o in proto.opset_import)
        for op in ("lowrank_linear", "moe_ffn"):  # each splice op a splice function
            used = _count(member, f"splice.{op}")
            calls = [n for n in all_nodes(proto.graph) if n.domain == "splice"]
            assert sum(n.op_type.startswith(op) for n in calls) == used, (op, used)
            if used:
                assert any(f.domain == "splice" and f.name.startswith(op) for f in proto.functions)
        sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == member.input_names
        assert [o.name for o in sess.get_outputs()] == member.output_names
        sig = signature_of(member.input_specs)
        for x in inputs:
            if isinstance(program, SignatureSet) and signature_of_values(x) != sig:
                continue
            got = sess.run(None, {n: t.numpy() for n, t in zip(member.input_names, x)})
            with torch.no_grad():
                want = member.run(*x)
            assert len(got) == len(want)
            for g, w in zip(got, want, strict=True):
                assert g.shape == tuple(w.shape), (name, pass_name)
                w = w.numpy()
                assert (np.isnan(g) == np.isnan(w)).all(), (name, pass_name, x[-1])
                ok = ~np.isnan(w)
                diff = np.abs(g[ok].astype(np.float64) - w[ok].astype(np.float64))
                err = float(diff.max()) if diff.size else 0.0
                assert err <= TOL, (name, pass_name, err)
            checked += 1
    assert checked == len(inputs), "an input set no member took"


def test_exported_zoo_models_carry_module_paths_and_source_lines():
    program, _ = transformed("gpt2", "lowrank")
    proto = to_onnx(program)
    props = [{p.key: p.value for p in n.metadata_props} for n in proto.graph.node]
    modules = {p.get("splice.module", "") for p in props}
    assert any(m.startswith("transformer.h.0.attn") for m in modules), modules
    sources = {p.get("splice.source", "") for p in props}
    assert any("transformers/models/gpt2/modeling_gpt2.py:" in s for s in sources), sources
    lowrank = [p for p in props if p.get("splice.node", "").startswith("lowrank_linear")]
    assert lowrank and all("lowrank" in p["splice.passes"].split(",") for p in lowrank)
