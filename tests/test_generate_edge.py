"""Generation on the aarch64 edge runner under qemu (slow: one emulated process per step, so
kept apart from tests/test_generate.py): LLaMA's compiled aarch64 prefill and decode give
the tokens of transformers ``generate()``."""

from __future__ import annotations

from test_generate import _prompt, _reference, build

import splice
from splice.runtime.generate import Generator


def test_aarch64_greedy_equals_transformers_generate(need_edge, tmp_path) -> None:
    model = build("llama")
    lm = splice.capture_lm(model, max_len=12, prompt_len=6)
    gen = Generator.compile(lm, "aarch64-linux", output=tmp_path / "gen")
    assert Generator.edge(tmp_path / "gen").max_len == 12
    ids = _prompt(5)
    # prefill, then one decode step: both aarch64 programs run under qemu
    got = gen.generate(ids, max_new_tokens=2, stop_tokens=[])
    assert got.tokens == _reference(model, ids, 2)
