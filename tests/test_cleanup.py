"""dce, cse, fold-constants on real models (the Before/Expected text cases are in
tests/test_pass_cleanup.py)."""

from __future__ import annotations

import pytest
import torch
from conftest import first_output

from splice.passes import NumericCheck, VerifyEach, parse_pipeline


@pytest.mark.parametrize("name", ["gpt2", "llama", "bert", "vit", "convnet"])
def test_cleanup_pipeline_is_exact_on_real_models(name, captured, arch_model):
    model, args = arch_model(name)
    p = captured(name)
    nc = NumericCheck()
    r = parse_pipeline("cse,fold-constants,dce").run(
        p, sample_inputs=[args], instruments=[VerifyEach(), nc]
    )
    assert all(rep["ok"] and rep["max_abs"] == 0.0 for rep in nc.reports)
    with torch.no_grad():
        out = r.program(*args)
        out = out[0] if isinstance(out, tuple) else out
        assert (out - first_output(model(*args))).abs().max() <= 1e-5
    n_before = sum(1 for n in p.graph.nodes if n.op == "call_function")
    n_after = sum(1 for n in r.program.graph.nodes if n.op == "call_function")
    assert n_after <= n_before
