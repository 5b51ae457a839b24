"""A split program whose parts compute constants from buffers (BERT's attention mask and
position ids: ``slice -> expand -> and`` of constant buffers) compiles into an artifact that
loads and equals the program. Folding inside a part used to make ``_folded.*`` weights that
the artifact's weights file lacks, and loading failed with "part 'part_0' reads weights
['_folded.slice_1', ...] that the program does not have" (benchmarks/stitch.py on MiniLM)."""

from __future__ import annotations

import torch

import splice
from splice import models
from splice.passes import PassContext, parse_pipeline


def test_stitched_bert_artifact_loads_and_equals_every_checked_config(tmp_path):
    torch.manual_seed(0)
    model, ex = models.bert(layers=2)
    program = splice.capture(model, ex)
    small = parse_pipeline("lowrank{method=svd,ratio=0.5}").run(program).program
    ctx = PassContext(calibration_inputs=[ex, ex], programs={"small": small})
    stitched = parse_pipeline("stitch{anchors=small,share=pair}").run(program, ctx=ctx).program
    compiled = splice.compile(stitched, "host", output=tmp_path / "a.artifact").load()
    n = len(stitched.attrs["stitch"]["configs"])
    for config in (0, 1, n - 1):
        c = torch.tensor(config)
        got, want = compiled(*ex, c), stitched(*ex, c)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
