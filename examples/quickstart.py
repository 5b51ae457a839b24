"""Quick start: capture a small GPT-2, run a pipeline with instruments, save and reload it.

Runs in a few seconds on a laptop CPU: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile

import torch

import splice
from splice import models
from splice.passes import NumericCheck, Timing, VerifyEach, parse_pipeline
from splice.passes.analysis import cost_model


def main() -> None:
    model, (ids,) = models.gpt2(layers=2, hidden=64, seq=16)
    program = splice.capture(model, (ids,))
    print(program)
    lines = splice.print_ir(program, locations=True).splitlines()
    print("\n".join(line for line in lines if line.startswith("  %"))[:1500], "\n...")

    timing, check = Timing(), NumericCheck()
    result = parse_pipeline("cse,fold-constants,dce").run(
        program, sample_inputs=[(ids,)], instruments=[VerifyEach(), timing, check]
    )
    print(timing.report())
    print(check.report())

    total = cost_model(result.program).total
    print(f"params {total.params:,}  FLOPs {total.flops:,}  bytes read {total.bytes_read:,}")

    with tempfile.TemporaryDirectory() as d:
        path = splice.save(result.program, f"{d}/gpt2.splice")
        again = splice.load(path)
        with torch.no_grad():
            diff = (again(ids) - model(ids).logits).abs().max().item()
        print(f"saved to {path.name}, reloaded; max abs difference to eager PyTorch: {diff:.2e}")


if __name__ == "__main__":
    main()
