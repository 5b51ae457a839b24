"""The Model Explorer adapter (splice.tools.explorer) and ``splice view``.

Pinned: the adapter's graph JSON has every FX node of every graph exactly once, in order,
with its op as label and the module path of its Loc as the last layer of its namespace
(whose layers are the path's dotted prefixes); edges are the node inputs in order;
every sub-graph (cond branch, branches part, stitch route) is a graph of its own that the
nodes using it link to. Overlays land on the nodes they describe: the FLOPs overlay sums
to the cost model's total, a lowrank_linear carries its rank and its layer's stats, a
moe_ffn its FFN's coverage. A dump folder is one graph per file; missing or damaged
inputs are one error; ``splice view`` binds 127.0.0.1 unless told otherwise, and serves
the adapter's graphs over HTTP.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import subprocess
import sys
import time
import types
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import seeded_weights

import splice
from splice import models, zoo
from splice.errors import ArtifactError, ParseError, SpliceError
from splice.ir import meta as M
from splice.ir.printer import format_target
from splice.ir.program import iter_graphs
from splice.passes import DumpIR, NumericCheck, PassContext, PassManager, parse_pipeline
from splice.passes.analysis import cost_model
from splice.passes.instruments import op_counts
from splice.tools import cli_view
from splice.tools.cli import main
from splice.tools.explorer import (
    ADAPTER_ID,
    SpliceAdapter,
    SpliceOverlays,
    View,
    open_path,
    program_view,
    subgraph_id,
)
from splice.tools.explorer import overlays as O
from splice.tools.explorer.graph import module_of
from splice.tools.explorer.inputs import parse_dump_file
from splice.tools.explorer.main import OVERLAYS_ID

LLAMA_PIPELINE = "lowrank{ratio=0.5},experts{num_experts=4,top_k=2}"


# ---------------------------------------------------------------------------------------
# the invariant every view keeps


def _nodes(view: View, gid: str) -> dict[str, object]:
    return {n.id: n for n in view.graph(gid).nodes}


def check_view(program, view: View, graph_id: str = "main") -> None:
    """Every node of every graph once, in order; labels, layers, edges, sub-graph links."""
    subgraphs = {}
    for path, gm in iter_graphs(program):
        gid = subgraph_id(graph_id, path)
        g = view.graph(gid)
        fx_nodes = list(gm.graph.nodes)
        assert [n.id for n in g.nodes] == [n.name for n in fx_nodes], gid
        children = {name for name, m in gm.named_children() if isinstance(m, torch.fx.GraphModule)}
        for node, n in zip(g.nodes, fx_nodes):
            if n.op in ("call_function", "call_module"):
                assert node.label == format_target(n)
            else:
                want = {"placeholder": "input", "output": "output"}.get(n.op)
                want = want or ("graph" if n.target in children else "weight")
                assert node.label == want
            path_ = module_of(n)
            assert path_ == M.loc(n).module_path or (
                n.op == "get_attr" and not M.loc(n).module_path
            )
            layers = node.namespace.split("/") if node.namespace else []
            assert (layers[-1] if layers else "") == path_
            # the layers are the path's dotted prefixes: model / model.layers / model.layers.0
            assert all(b.startswith(a + ".") for a, b in itertools.pairwise(layers))
            assert [e.sourceNodeId for e in node.incomingEdges] == [
                i.name for i in n.all_input_nodes
            ]
            attrs = {a.key: a.value for a in node.attrs}
            assert attrs["name"] == f"%{n.name}"
            spec = M.get_spec(n)
            assert attrs["spec"] == (str(spec) if spec is not None else "(none)")
            assert attrs["passes"] == (",".join(M.loc(n).from_passes) or "(none)")
            for sid in node.subgraphIds:
                subgraphs.setdefault(sid, []).append(node.id)
    ids = [g.id for g in view.graphs]
    assert len(ids) == len(set(ids))
    want_sub = {subgraph_id(graph_id, p) for p, _ in iter_graphs(program) if p}
    # every sub-graph is a graph of the view, and some node links to it
    assert set(subgraphs) == want_sub
    assert want_sub <= set(ids)
    json.dumps(view.to_json())  # the adapter's answer is JSON


# ---------------------------------------------------------------------------------------
# real models


def test_gpt2_every_node_once_layers_are_module_paths_flops_sum_to_the_cost_model(captured):
    p = captured("gpt2")
    view = program_view(p)
    check_view(p, view)
    assert [g.id for g in view.graphs] == ["main"]
    assert view.graph("main").groupNodeAttributes[""]["inputs"] == "input_ids: i64[1,8]"
    layers = {n.namespace for n in view.graph("main").nodes}
    assert (
        "transformer/transformer.h/transformer.h.0/transformer.h.0.mlp/transformer.h.0.mlp.c_fc"
        in layers
    )
    # FLOPs and bytes overlays: per node, summing to the cost model's totals
    total = cost_model(p).total
    assert sum(view.overlays[O.FLOPS]["main"].values()) == total.flops > 0
    assert sum(view.overlays[O.BYTES]["main"].values()) == total.bytes_read + total.bytes_written
    # node data in Model Explorer's format, keyed by graph then node id
    data = json.loads(view.node_data()[O.FLOPS].to_json_string())
    assert set(data["main"]["results"]) == set(view.overlays[O.FLOPS]["main"])


@pytest.fixture(scope="module")
def llama_run(tmp_path_factory):
    """LLaMA after lowrank,experts with DumpIR and NumericCheck: (program, result, dump dir)."""
    torch.manual_seed(0)
    model, args = models.llama()
    p = splice.capture(model, args)
    dump = tmp_path_factory.mktemp("explorer") / "dump"
    pm = PassManager(parse_pipeline(LLAMA_PIPELINE), [DumpIR(dump), NumericCheck()])
    result = pm.run(p, PassContext([args]))
    return result.program, result, dump


def _records(dump: Path) -> list[dict]:
    return json.loads((dump / "dump.json").read_text())["passes"]


def test_llama_after_lowrank_experts_overlays_sit_on_their_nodes(llama_run):
    q, _, dump = llama_run
    records = _records(dump)
    view = program_view(q, records=records)
    check_view(q, view)
    nodes = _nodes(view, "main")
    lowrank = {r["layer"]: r for r in records[0]["stats"]["layers"]}
    ffns = {r["ffn"]: r for r in records[1]["stats"]["ffns"]}
    seen_lr = seen_moe = 0
    for n in q.graph.nodes:
        attrs = {a.key: a.value for a in nodes[n.name].attrs}
        op = format_target(n) if n.op == "call_function" else n.op
        if op == "splice.lowrank_linear":
            seen_lr += 1
            row = lowrank[M.loc(n).module_path]
            rank = M.spec(n.args[2]).shape[0]
            assert rank == row["rank"]
            assert view.overlays[O.RANK]["main"][n.name] == rank
            assert attrs[O.RANK] == str(rank)
            assert view.overlays[O.WEIGHT_ERROR]["main"][n.name] == row["weight_error"]
            assert view.overlays[O.ACTIVATION_ERROR]["main"][n.name] == row["activation_error"]
            assert "lowrank" in attrs["passes"]
        elif op == "splice.moe_ffn":
            seen_moe += 1
            (ffn,) = [f for f in ffns if M.loc(n).module_path.startswith(f + ".")]
            assert view.overlays[O.MASS_COVERED]["main"][n.name] == ffns[ffn]["mass_covered"]
        else:
            assert n.name not in view.overlays.get(O.RANK, {}).get("main", {})
            assert n.name not in view.overlays.get(O.MASS_COVERED, {}).get("main", {})
    # the FFNs' factors went into the experts; the attention projections stay lowrank_linear
    assert seen_lr >= 8 and seen_moe == len(ffns) == 2
    # the numeric error of experts sits on exactly the nodes experts touched
    numeric = view.overlays[O.NUMERIC]["main"]
    touched = {n.name for n in q.graph.nodes if M.loc(n).from_passes}
    assert set(numeric) == touched
    for n in q.graph.nodes:
        if "experts" in M.loc(n).from_passes:
            assert numeric[n.name] == records[1]["numeric"]["max_abs"]
    # LLaMA collapses to model.layers.0 and model.layers.1
    tops = {
        n.namespace.split("/")[2] for n in view.graph("main").nodes if n.namespace.count("/") >= 2
    }
    assert {"model.layers.0", "model.layers.1"} <= tops


def test_a_dump_folder_is_one_graph_per_pass(llama_run):
    q, _, dump = llama_run
    files = sorted(p.stem for p in dump.glob("*.ir"))
    assert files == ["000_input", "001_lowrank", "002_experts"]
    view = open_path(dump)
    assert view.kind == "dump"
    assert [g.id for g in view.graphs] == files
    for stem in files:  # each graph is its file, node for node (weights read as shapes only)
        check_view(parse_dump_file(dump / f"{stem}.ir"), view, stem)
    # the last one computes what the result does: the same ops, as many times
    calls = Counter(n.label for n in view.graph("002_experts").nodes if "." in n.label)
    assert dict(calls) == op_counts(q)
    attrs = view.graph("001_lowrank").groupNodeAttributes[""]
    assert attrs["pass"] == "lowrank{ratio=0.5}" and attrs["changed"] == "True"
    assert attrs["pipeline"] == LLAMA_PIPELINE
    # stats overlays follow the pass: none before lowrank, ranks after it
    assert "000_input" not in view.overlays[O.WEIGHT_ERROR]
    after_lr, after_ex = (view.overlays[O.WEIGHT_ERROR][k] for k in ("001_lowrank", "002_experts"))
    assert len(after_lr) == len(_records(dump)[0]["stats"]["layers"])
    assert after_ex.items() < after_lr.items()  # experts took the FFNs' factors in
    assert set(view.overlays[O.MASS_COVERED]) == {"002_experts"}
    # without dump.json the folder still opens, without the stats overlays
    (dump / "dump.json").rename(dump / "index.json")
    try:
        bare = open_path(dump)
    finally:
        (dump / "index.json").rename(dump / "dump.json")
    assert [g.id for g in bare.graphs] == files
    assert O.WEIGHT_ERROR not in bare.overlays and O.RANK in bare.overlays


def test_a_saved_program_opens_through_the_adapter(llama_run, tmp_path):
    q, _, _ = llama_run
    splice.save(q, tmp_path / "llama.splice")
    view = open_path(tmp_path / "llama.splice")
    assert view.kind == "program"
    loaded = splice.load(tmp_path / "llama.splice")
    check_view(loaded, view)
    # the program saved: the same values (weight reads are named on parsing), as many nodes
    values = sorted(n.id for n in view.graph("main").nodes if n.label != "weight")
    assert values == sorted(n.name for n in q.graph.nodes if n.op != "get_attr")
    assert len(view.graph("main").nodes) == len(q.graph.nodes)
    graphs = SpliceAdapter().convert(str(tmp_path / "llama.splice"), {})["graphs"]
    assert [g.id for g in graphs] == ["main"]
    assert [n.id for n in graphs[0].nodes] == [n.name for n in loaded.graph.nodes]
    # the node data provider gives any overlay of what the adapter opened
    ndp = SpliceOverlays()
    (editor,) = ndp.get_config_editors(OVERLAYS_ID).configEditors
    assert [o.value for o in editor.options] == list(O.OVERLAYS)
    got = ndp.run(OVERLAYS_ID, str(tmp_path / "llama.splice"), "main", {"overlay": O.RANK}, None)
    assert got.error == "" and got.result.name == O.RANK
    assert {k: r.value for k, r in got.result.results.items()} == view.overlays[O.RANK]["main"]
    none = ndp.run(
        OVERLAYS_ID, str(tmp_path / "llama.splice"), "main", {"overlay": O.NUMERIC}, None
    )
    assert none.result is None and none.error == f"no {O.NUMERIC} values on graph main"


def test_a_dynamic_model_after_branches_has_its_parts_and_branches_as_graphs():
    case = zoo.BY_NAME["early_exit"]
    zm = case.build()
    q = parse_pipeline("branches").run(case.capture(zm), sample_inputs=zm.inputs[:2]).program
    view = program_view(q)
    check_view(q, view)
    paths = [p for p, _ in iter_graphs(q) if p]
    assert any("part_" in p for p in paths) and any("branch" in p for p in paths)
    for gid in (subgraph_id("main", p) for p, _ in iter_graphs(q)):
        for n in view.graph(gid).nodes:
            if n.label == "higher_order.cond":  # both branches
                assert len(n.subgraphIds) == 2
            if n.label == "higher_order.invoke_subgraph":  # its part
                assert len(n.subgraphIds) == 1 and "part_" in n.subgraphIds[0]


def _anchor(width: int, name: str) -> str:
    """A two-block family member: stem Linear(4->w), blocks Linear(w->w)+relu, head
    Linear(w->2), with module paths (how stitch finds the blocks)."""
    lines = [
        f"weight @stem.weight : f32[{width},4] param",
        f"weight @blocks.0.weight : f32[{width},{width}] param",
        f"weight @blocks.1.weight : f32[{width},{width}] param",
        f"weight @head.weight : f32[2,{width}] param",
        f"program @{name}(%x : f32[1,4]) {{",
        f"  %s : f32[1,{width}] = aten.linear(%x, @stem.weight)  # stem",
    ]
    h = "%s"
    for i in range(2):
        lines.append(
            f"  %a{i} : f32[1,{width}] = aten.linear({h}, @blocks.{i}.weight)  # blocks.{i}"
        )
        lines.append(f"  %r{i} : f32[1,{width}] = aten.relu(%a{i})  # blocks.{i}")
        h = f"%r{i}"
    lines += [f"  %y : f32[1,2] = aten.linear({h}, @head.weight)  # head", "  return out=%y", "}"]
    return "\n".join(lines)


def test_a_stitched_program_has_its_routes_as_graphs():
    g = torch.Generator().manual_seed(0)
    calib = [(torch.randn(1, 4, generator=g),) for _ in range(8)]
    small, large = _anchor(2, "small"), _anchor(3, "large")
    small = splice.parse_ir(small, seeded_weights(small, seed=1))
    large = splice.parse_ir(large, seeded_weights(large, seed=2))
    ctx = PassContext(sample_inputs=calib, programs={"large": large})
    q = parse_pipeline("stitch{anchors=large,calib_samples=8}").run(small, ctx=ctx).program
    view = program_view(q)
    check_view(q, view)
    # a then/else pair per configuration; each "then" graph is one route
    routes = {g.id: g for g in view.graphs if g.id.endswith("_then")}
    # the two anchors and the one forward cut (0, 1) of depth 2
    assert len(routes) == len(q.attrs["stitch"]["configs"]) == 3
    layer = "stitch/stitch.0_1/stitch.0_1.0"  # the stitching layer, in the route that crosses
    crossing = {k for k, g in routes.items() if any(n.namespace == layer for n in g.nodes)}
    assert [k.rsplit(".", 1)[-1] for k in crossing] == ["config_2_then"]
    for g in routes.values():  # pieces copied from the anchors start parts
        assert any(("starts part", "yes") in {(a.key, a.value) for a in n.attrs} for n in g.nodes)


COND = """
weight @a.weight : f32[4,4] param
weight @b.weight : f32[4,4] param
program @M(%x : f32[2,4]) {
  graph @true_graph_0(%relu : f32[2,4], %p_b_weight : f32[4,4]) {
    %linear : f32[2,4] = aten.linear(%relu, %p_b_weight)  # b
    return (%linear,)
  }
  graph @false_graph_0(%relu : f32[2,4], %p_b_weight : f32[4,4]) {
    %mul : f32[2,4] = aten.mul.Tensor(%relu, 2.0)  # c
    return (%mul,)
  }
  %linear : f32[2,4] = aten.linear(%x, @a.weight)  # a
  %relu : f32[2,4] = aten.relu(%linear)  # a
  %sum_1 : f32[] = aten.sum(%relu)
  %gt : bool[] = aten.gt.Scalar(%sum_1, 0)
  %cond : (f32[2,4],) = higher_order.cond(%gt, @true_graph_0, @false_graph_0, (%relu, @b.weight))
  %getitem : f32[2,4] = operator.getitem(%cond, 0)
  %add : f32[2,4] = aten.add.Tensor(%getitem, 1.0)  # d
  return out=%add
}
"""


@pytest.fixture(scope="module")
def cond_artifact(tmp_path_factory):
    """A split cond compiled with onnxruntime, with two samples: one per branch."""
    p = splice.parse_ir(COND, seeded_weights(COND))
    q = parse_pipeline("branches").run(p).program
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    samples = [(torch.zeros(2, 4),), (x,)]
    # the predicate relu(x Aᵀ).sum() > 0: false for zeros, true for x
    assert torch.relu(x @ p.get_weight("a.weight").T).sum() > 0
    out = tmp_path_factory.mktemp("art") / "m.artifact"
    return splice.compile(q, "host", backend="onnxruntime", output=out, samples=samples)


def test_an_artifact_shows_its_reference_and_which_parts_are_compiled(cond_artifact):
    art = cond_artifact
    view = open_path(art.path)
    assert view.kind == "artifact"
    check_view(art.reference(), view)
    parts = {p["name"]: p for p in art.manifest["parts"]}
    calls = {}
    for g in view.graphs:
        for n in g.nodes:
            attrs = {a.key: a.value for a in n.attrs}
            if n.label == "higher_order.invoke_subgraph":
                name = n.subgraphIds[0].rsplit(".", 1)[-1].rsplit("/", 1)[-1]
                calls[name] = (g.id, n.id)
                assert attrs["compiled part"] == parts[name]["model"]
                assert view.overlays[O.PART_CHECK][g.id][n.id] == parts[name]["check_max_abs_diff"]
    assert set(calls) == set(parts) and len(parts) >= 3
    attrs = view.graph("main").groupNodeAttributes[""]
    assert attrs["backend"] == "onnxruntime" and attrs["parts"] == str(len(parts))
    assert O.PART_LATENCY not in view.overlays  # measured only when asked


def test_time_parts_puts_each_parts_latency_on_the_nodes_that_call_it(cond_artifact):
    from splice.tools.explorer.latency import time_parts

    repeats = 3
    times = time_parts(cond_artifact.path, repeats)
    assert set(times) == {p["name"] for p in cond_artifact.manifest["parts"]}
    view = open_path(cond_artifact.path, time_parts=repeats)
    latency = view.overlays[O.PART_LATENCY]
    for g in view.graphs:
        for n in g.nodes:
            if n.label != "higher_order.invoke_subgraph":
                continue
            name = n.subgraphIds[0].rsplit(".", 1)[-1].rsplit("/", 1)[-1]
            # top-level parts run on both samples, a branch's part on the one taking it
            assert times[name].calls == repeats * (2 if g.id == "main" else 1)
            assert latency[g.id][n.id] > 0
            attr = view.graph("main").groupNodeAttributes[""][f"{name} latency"]
            assert attr.endswith(f" ms per call, {times[name].calls} calls over {repeats} runs")


def test_time_parts_needs_an_artifact_with_samples(saved_llama, cond_artifact, tmp_path):
    with pytest.raises(ArtifactError) as e:
        open_path(saved_llama, time_parts=1)
    assert e.value.message == (
        f"{saved_llama} is not a compiled artifact: only an artifact's parts can be timed"
    )
    bare = splice.compile(
        cond_artifact.reference(), "host", backend="onnxruntime", output=tmp_path / "b"
    )
    with pytest.raises(ArtifactError) as e:
        open_path(bare.path, time_parts=1)
    assert e.value.message == f"{bare.path} holds no sample inputs to time its parts with"


# ---------------------------------------------------------------------------------------
# bad inputs: one error, before anything is served


def test_missing_and_foreign_inputs_are_one_error(tmp_path):
    missing = tmp_path / "nope.splice"
    with pytest.raises(ArtifactError) as e:
        open_path(missing)
    assert e.value.message == f"{missing} does not exist"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("hello")
    with pytest.raises(ArtifactError) as e:
        open_path(tmp_path / "other")
    assert e.value.message == (
        f"{tmp_path / 'other'} is not a saved splice program, a dump folder or an artifact"
    )
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactError, match=r"manifest.json cannot be read"):
        open_path(tmp_path / "bad")


def test_a_damaged_dump_file_names_the_file(tmp_path):
    (tmp_path / "000_input.ir").write_text("program @p(%x : f32[2]) {\n  %y = what\n}\n")
    with pytest.raises(ParseError) as e:
        open_path(tmp_path)
    assert e.value.message.startswith(f"{tmp_path / '000_input.ir'}: ")
    (tmp_path / "000_input.ir").write_text(
        "program @p(%x : f32[2]) {\n  %y : f32[2] = aten.neg(%x)\n  return out=%y\n}\n"
    )
    # a dump.json with records splice did not write still opens: no stats, no error
    junk = {"passes": [{"index": 0, "stats": [1], "numeric": "x"}, {"stats": {"layers": 3}}, 7]}
    (tmp_path / "dump.json").write_text(json.dumps(junk))
    assert [g.id for g in open_path(tmp_path).graphs] == ["000_input"]
    (tmp_path / "dump.json").write_text("[1, 2")
    with pytest.raises(ArtifactError) as e:
        open_path(tmp_path)
    assert e.value.message.startswith(f"{tmp_path / 'dump.json'} is not valid JSON: ")


def test_a_damaged_saved_program_is_one_error(llama_run, tmp_path):
    q, _, _ = llama_run
    splice.save(q, tmp_path / "p.splice")
    ir = tmp_path / "p.splice" / "program.ir"
    ir.write_text(ir.read_text().replace("aten.", "atn.", 1))
    with pytest.raises(SpliceError):
        open_path(tmp_path / "p.splice")


def test_splice_view_on_a_missing_input_exits_1_before_serving(tmp_path, capsys, monkeypatch):
    def no_serve(self):
        raise AssertionError("served a missing input")

    monkeypatch.setattr(cli_view.Server, "serve", no_serve)
    missing = tmp_path / "missing.splice"
    assert main(["view", str(missing), "--no-browser"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [
        f"error: ArtifactError: {missing} does not exist; hint: name {_what_opens()}"
    ]


def test_without_model_explorer_splice_view_says_how_to_install_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "model_explorer", None)  # import model_explorer fails
    assert main(["view", str(tmp_path), "--no-browser"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: SpliceError: Model Explorer is not installed (")
    assert err.endswith(
        "; hint: pip install 'splice[explorer]' (ai-edge-model-explorer), or use --html"
    )


def _what_opens() -> str:
    from splice.tools.explorer.inputs import WHAT_OPENS

    return WHAT_OPENS


# ---------------------------------------------------------------------------------------
# the server: host and port plumbing, and one real request


@pytest.fixture(scope="module")
def saved_llama(llama_run, tmp_path_factory):
    q, _, _ = llama_run
    path = tmp_path_factory.mktemp("view") / "llama.splice"
    splice.save(q, path)
    return path


def test_splice_view_binds_127_0_0_1_unless_told(saved_llama, monkeypatch, capsys):
    calls = []
    from model_explorer import server as me_server

    monkeypatch.setattr(me_server, "start", lambda **kw: calls.append(kw))
    port = cli_view.free_port("127.0.0.1", 8570)
    assert main(["view", str(saved_llama), "--no-browser", "--port", str(port)]) == 0
    (kw,) = calls
    assert kw["host"] == "127.0.0.1" and kw["port"] == port
    assert kw["no_open_in_browser"] is True
    assert kw["extensions"] == ["splice.tools.explorer"]
    models_ = json.loads(urllib.parse.unquote(kw["config"].to_url_param_value()))["models"]
    assert models_ == [{"url": str(saved_llama.resolve()), "adapterId": ADAPTER_ID}]
    calls.clear()
    port = cli_view.free_port("0.0.0.0", 8580)
    assert main(["view", str(saved_llama), "--host", "0.0.0.0", "--port", str(port)]) == 0
    assert calls[0]["host"] == "0.0.0.0" and calls[0]["no_open_in_browser"] is False
    server = cli_view.prepare(str(saved_llama), open_browser=False)
    assert server.host == "127.0.0.1" and server.url.startswith(
        f"http://127.0.0.1:{server.port}/?data="
    )


def test_splice_view_time_parts_serves_the_latency_overlay(cond_artifact, monkeypatch):
    calls = []
    from model_explorer import server as me_server

    monkeypatch.setattr(me_server, "start", lambda **kw: calls.append(kw))
    port = cli_view.free_port("127.0.0.1", 8590)
    args = [
        "view",
        str(cond_artifact.path),
        "--no-browser",
        "--port",
        str(port),
        "--time-parts",
        "2",
    ]
    assert main(args) == 0
    data = json.loads(urllib.parse.unquote(calls[0]["config"].to_url_param_value()))
    assert any(src.startswith(f"node_data://{O.PART_LATENCY}/") for src in data["nodeData"])


def test_a_port_in_use_is_one_error(saved_llama):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        with pytest.raises(SpliceError) as e:
            cli_view.prepare(str(saved_llama), port=port)
    assert e.value.message == f"--port {port}: 127.0.0.1:{port} is in use"


def test_splice_view_html_calls_the_report(saved_llama, tmp_path, monkeypatch, capsys):
    calls = []
    fake = types.ModuleType("splice.tools.report")

    def write_report(in_path: str, out_path: str) -> Path:
        calls.append((in_path, out_path))
        Path(out_path).write_text("<html></html>")
        return Path(out_path)

    fake.write_report = write_report
    monkeypatch.setitem(sys.modules, "splice.tools.report", fake)
    out = tmp_path / "r.html"
    assert main(["view", str(saved_llama), "--html", str(out)]) == 0
    assert calls == [(str(saved_llama), str(out))]
    assert capsys.readouterr().out.strip() == f"wrote {out}"


def test_splice_view_serves_the_adapter_graphs(saved_llama):
    """A real server in a child process: its URL, and the adapter's graphs through Model
    Explorer's own command endpoint."""
    port = cli_view.free_port("127.0.0.1", 8600)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "splice.tools.cli", "view", str(saved_llama), "--no-browser"]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        url = None
        deadline = time.monotonic() + 240
        lines = []
        while time.monotonic() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("splice view: serving "):
                url = line.rsplit(" at ", 1)[1].strip()
        assert url is not None, "".join(lines)
        assert url.startswith(f"http://127.0.0.1:{port}/?data=")
        data = json.loads(urllib.parse.unquote(url.split("?data=", 1)[1]))
        assert data["models"] == [{"url": str(saved_llama.resolve()), "adapterId": "splice"}]
        cmd_json = {
            "extensionId": "splice",
            "cmdId": "convert",
            "modelPath": data["models"][0]["url"],
            "settings": {},
            "deleteAfterConversion": False,
        }
        q = urllib.parse.quote(json.dumps(cmd_json))
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/send_command?json={q}") as r:
            graphs = json.loads(r.read())["graphs"]
        labels = {
            n["namespace"].split("/")[2]
            for n in graphs[0]["nodes"]
            if n["namespace"].count("/") >= 2
        }
        assert "model.layers.0" in labels
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/get_extensions") as r:
            kinds = {e["id"]: e["type"] for e in json.loads(r.read())}
        assert kinds["splice"] == "adapter" and kinds[OVERLAYS_ID] == "node_data_provider"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/") as r:
            assert b"<html" in r.read()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
