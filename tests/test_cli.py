"""The `splice` command line, run in-process."""

from __future__ import annotations

import pytest

from splice.tools.cli import main


@pytest.fixture
def saved(tmp_path, capsys):
    path = tmp_path / "conv.splice"
    assert main(["capture", "splice.models:convnet", "-a", "width=8", "-o", str(path)]) == 0
    assert "wrote" in capsys.readouterr().out
    return path


def test_capture_writes_a_program_with_samples(saved):
    names = sorted(f.name for f in saved.iterdir())
    assert names == ["manifest.json", "program.ir", "samples.safetensors", "weights.safetensors"]
    assert "f32[8,3,3,3]" in (saved / "program.ir").read_text()  # the factory argument took effect


def test_opt_with_instruments(saved, tmp_path, capsys):
    out, dump = tmp_path / "out.splice", tmp_path / "dump"
    rc = main(
        [
            "opt",
            str(saved),
            "-p",
            "cse,fold-constants,dce",
            "-o",
            str(out),
            "--verify-each",
            "--time-passes",
            "--numeric-check",
            "--dump-dir",
            str(dump),
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "fold-constants" in text and "total" in text  # pass table and timing
    assert "[exact]: max abs 0" in text  # numeric check on the saved samples
    assert sorted(f.name for f in dump.iterdir())[0] == "000_input.ir"
    assert (out / "program.ir").is_file()


def test_opt_prints_ir_after_change(saved, capsys):
    assert main(["opt", str(saved), "-p", "dce,dce", "--print-ir-after-change"]) == 0
    out = capsys.readouterr().out
    assert out.count("// ----- IR after dce") == 1  # the second dce changes nothing


def test_opt_on_a_model_prints_ir(capsys):
    assert main(["opt", "splice.models:mlp", "-a", "d=16", "-a", "hidden=32", "-p", "cse"]) == 0
    out = capsys.readouterr().out
    assert "program @MLP(%x : f32[1,16])" in out and "aten.gelu" in out


def test_errors_are_one_message_and_status_1(saved, capsys):
    assert main(["opt", str(saved), "-p", "cse,nosuchpass"]) == 1
    err = capsys.readouterr().err
    assert "error: PipelineError: unknown pass 'nosuchpass'" in err and "available passes:" in err
    assert main(["show", "splice.models:nosuchmodel"]) == 1
    assert "CaptureError: splice.models has no factory 'nosuchmodel'" in capsys.readouterr().err
    assert main(["show", "not_a_model"]) == 1
    assert "neither a saved program folder nor a MODEL" in capsys.readouterr().err


def test_show_and_stats(saved, capsys):
    assert main(["show", str(saved), "--locations"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# splice IR v1") and "# stage1.conv1 @ models.py:" in out
    assert main(["stats", str(saved), "--depth", "1"]) == 0
    out = capsys.readouterr().out
    for module in ("stem", "stage1", "stage2", "head", "total"):
        assert module in out


def test_diff_structure_and_numbers(saved, tmp_path, capsys):
    other = tmp_path / "folded.splice"
    assert main(["opt", str(saved), "-p", "dce", "-o", str(other)]) == 0
    capsys.readouterr()
    assert main(["diff", str(saved), str(other), "--text"]) == 0
    out = capsys.readouterr().out
    assert "structure" in out and "numeric (1 sample(s)" in out and "cosine 1.000000" in out
    # dce dropped the unread batch-norm counters: the unified text diff shows it
    assert "-weight @stem.1.num_batches_tracked : i64[] buffer" in out


def test_diff_counts_the_ops_of_every_graph(tmp_path, capsys):
    import re

    from splice import models_dynamic as Z
    from splice.ir.explore import capture_dynamic
    from splice.ir.serialize import save
    from splice.passes.instruments import op_counts

    case = Z.skipnet()
    program = capture_dynamic(case.model, case.example)
    top = sum(n.op == "call_function" for n in program.graph.nodes)
    every = sum(op_counts(program).values())
    assert every > top  # the gates' branches hold most of the ops
    path = save(program, tmp_path / "skip.splice", samples=[case.example])
    assert main(["diff", str(path), str(path)]) == 0
    out = capsys.readouterr().out
    assert re.search(rf"ops\W+{every}\W+{every}\W", out), out


def test_passes_lists_options(capsys):
    assert main(["passes"]) == 0
    out = capsys.readouterr().out
    assert "fold-constants" in out and "max_numel=65536" in out


def test_demo_runs_on_the_real_minilm(capsys):
    assert main(["demo", "--sentences", "2"]) == 0
    out = capsys.readouterr().out
    assert "all-MiniLM-L6-v2" in out and "demo ok" in out
    assert "encoder.encoder.layer" in out
    # the low-rank path: fidelity, size and speed before and after
    assert "lowrank{method=whitened,budget_params=0.9}" in out
    for row in (
        "weights MB",
        "Linear parameters",
        "embedding cosine vs original",
        "TVM latency ms",
    ):
        assert row in out
