"""Generation: capture_lm's prefill/decode programs over a static cache, and the Generator.

Every architecture of issue #21 (GPT-2, LLaMA, Mistral, Qwen2, Phi, Gemma2, Mixtral) at 2
layers, hidden 64: the compiled loop's greedy tokens equal transformers ``generate()``
(greedy, same length). Weights are initialised with a large std so that random models
produce varied tokens (a model that repeats one token would prove little).
"""

from __future__ import annotations

import functools

import pytest
import torch

import splice
from splice.ir.lm import GenerationError, capture_lm
from splice.passes import parse_pipeline
from splice.runtime.generate import Generator

ARCHS = ["gpt2", "llama", "mistral", "qwen2", "phi", "gemma2", "mixtral"]
MAX_LEN, PROMPT_LEN, NEW = 24, 8, 12


def build(arch: str) -> torch.nn.Module:
    """A transformers causal LM of ``arch`` at 2 layers, hidden 64, vocab 128 (seeded)."""
    import transformers as T

    T.logging.set_verbosity_error()
    torch.manual_seed(0)
    init = 0.05 if arch == "gemma2" else 0.3
    if arch == "gpt2":
        cfg = T.GPT2Config(
            n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
            initializer_range=init, bos_token_id=0, eos_token_id=None, pad_token_id=0,
        )  # fmt: skip
        return T.GPT2LMHeadModel(cfg).eval()
    config_cls, model_cls = {
        "llama": (T.LlamaConfig, T.LlamaForCausalLM),
        "mistral": (T.MistralConfig, T.MistralForCausalLM),
        "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM),
        "phi": (T.PhiConfig, T.PhiForCausalLM),
        "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM),
        "mixtral": (T.MixtralConfig, T.MixtralForCausalLM),
    }[arch]
    extra: dict = {"mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2}}.get(arch, {})
    if arch == "gemma2":
        extra = {"head_dim": 16, "tie_word_embeddings": False}  # tied: one token repeated
    cfg = config_cls(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        initializer_range=init, bos_token_id=0, eos_token_id=None, pad_token_id=0, **extra,
    )  # fmt: skip
    return model_cls(cfg).eval()


@functools.cache
def _lm(arch: str) -> tuple[torch.nn.Module, splice.LMPrograms]:
    model = build(arch)
    return model, capture_lm(model, max_len=MAX_LEN, prompt_len=PROMPT_LEN)


def _prompt(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (1, n), generator=torch.Generator().manual_seed(seed))


def _reference(model: torch.nn.Module, ids: torch.Tensor, new: int) -> list[int]:
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False
    )
    return out[0, ids.shape[1] :].tolist()


@pytest.mark.parametrize("arch", ARCHS)
def test_compiled_greedy_equals_transformers_generate(arch: str, tmp_path) -> None:
    model, lm = _lm(arch)
    gen = Generator.compile(lm, "host", output=tmp_path / "gen")
    for n in (5, 11):  # shorter than prompt_len (padded prefill); longer (tail via decode)
        ids = _prompt(n)
        want = _reference(model, ids, NEW)
        assert len(set(want)) > 2, f"{arch}: the reference repeats itself ({want})"
        got = gen.generate(ids, max_new_tokens=NEW, stop_tokens=[])
        assert got.tokens == want, f"{arch}, prompt of {n}"
        assert got.decode_steps == NEW - 1 and got.stop_reason == "max_new_tokens"
    loaded = Generator.load(tmp_path / "gen")
    ids = _prompt(PROMPT_LEN, seed=2)
    assert loaded.generate(ids, max_new_tokens=4).tokens == _reference(model, ids, 4)


def test_programs_are_static_and_named() -> None:
    _, lm = _lm("llama")
    n_cache = len(lm.cache_specs)
    assert lm.prefill.input_names[0] == "input_ids"
    assert lm.decode.input_names[:2] == ["input_ids", "position"]
    assert len(lm.prefill.input_names) == 1 + n_cache
    assert lm.decode.output_names == ["logits"] + [n for n, _, _ in lm.cache_specs]
    # keys [1, kv_heads, head_dim, max_len] (stored transposed), values [1, kv_heads, max_len, hd]
    for name, shape, _ in lm.cache_specs:
        assert shape[3 if name.startswith("key_") else 2] == MAX_LEN, (name, shape)
    assert [s for n, s, _ in lm.cache_specs if n == "key_0"] == [(1, 2, 16, MAX_LEN)]
    assert not lm.prefill.symbols and not lm.decode.symbols
    same, differ = lm.shared_weights()
    assert same and not differ


def test_lowrank_loop_equals_transformed_program(tmp_path) -> None:
    _, lm = _lm("llama")
    low = lm.run_pipeline(parse_pipeline("lowrank{ratio=0.5}"))
    assert "lowrank_linear" in splice.print_ir(low.decode)
    assert not low.shared_weights()[1], "svd low rank gives both programs the same factors"
    ids = _prompt(6)
    want = Generator.eager(low).generate(ids, max_new_tokens=NEW, stop_tokens=[]).tokens
    got = Generator.compile(low, "host", output=tmp_path / "low")
    assert got.generate(ids, max_new_tokens=NEW, stop_tokens=[]).tokens == want


def test_svd_factors_are_computed_once_for_both_programs(monkeypatch) -> None:
    import splice.passes.lowrank as L

    _, lm = _lm("llama")
    calls: list[tuple[int, ...]] = []
    real = L.factorize

    def counting(w, method, **kw):
        calls.append(tuple(w.shape))
        return real(w, method, **kw)

    monkeypatch.setattr(L, "factorize", counting)
    ctx = parse_pipeline("lowrank{ratio=0.5}").context()
    low = lm.run_pipeline(parse_pipeline("lowrank{ratio=0.5}"), ctx=ctx)
    factored = [w for w in low.decode.weights if w.endswith(".lowrank_A")]
    assert factored and len(calls) == len(factored)  # once per weight, not once per program
    assert ctx.memo_hits == len(factored)  # the decode run reused every prefill factor
    assert not low.shared_weights()[1]
    # a fresh context computes them again (nothing leaks between runs)
    lm.run_pipeline(parse_pipeline("lowrank{ratio=0.5}"))
    assert len(calls) == 2 * len(factored)


def test_calibrating_pipeline_gets_samples_for_both_programs() -> None:
    _, lm = _lm("llama")
    pre, dec = lm.calibration_samples([_prompt(8), _prompt(5, seed=2)], steps=2)
    assert len(pre) == 2 and len(dec) == 4
    assert [int(s[1]) for s in dec] == [8, 9, 5, 6]  # positions after each prompt
    assert dec[0][2].abs().sum() > 0  # decode calibrates on the real cache, not zeros
    low = lm.run_pipeline(parse_pipeline("lowrank{method=whitened,ratio=0.5}"), [_prompt(8)])
    differ = low.shared_weights()[1]
    assert differ and all("lowrank" in w for w in differ)  # each calibrated on its own inputs
    assert len(Generator.eager(low).generate(_prompt(6), max_new_tokens=3).tokens) == 3


def test_sampling_stop_tokens_and_callback() -> None:
    _, lm = _lm("llama")
    gen = Generator.eager(lm)
    ids = _prompt(5)
    a = gen.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20,
                     top_p=0.9, seed=3, stop_tokens=[])  # fmt: skip
    b = gen.generate(ids, max_new_tokens=10, do_sample=True, temperature=0.8, top_k=20,
                     top_p=0.9, seed=3, stop_tokens=[])  # fmt: skip
    assert a.tokens == b.tokens and len(a.tokens) == 10
    top1 = gen.generate(ids, max_new_tokens=10, do_sample=True, top_k=1, seed=5, stop_tokens=[])
    assert top1.tokens == gen.generate(ids, max_new_tokens=10, stop_tokens=[]).tokens
    greedy = top1.tokens
    stop = gen.generate(ids, max_new_tokens=10, stop_tokens=[greedy[2]])
    assert stop.tokens == greedy[: greedy.index(greedy[2]) + 1]
    assert stop.stop_reason == "stop_token"
    seen: list[int] = []
    cut = gen.generate(ids, max_new_tokens=10, stop_tokens=[],
                       callback=lambda t: seen.append(t) or len(seen) < 4)  # fmt: skip
    assert cut.tokens == seen == greedy[:4] and cut.stop_reason == "callback"


def test_errors() -> None:
    _, lm = _lm("llama")
    gen = Generator.eager(lm)
    with pytest.raises(GenerationError, match="cache holds 24 positions"):
        gen.generate(_prompt(MAX_LEN + 1), max_new_tokens=1)
    with pytest.raises(GenerationError, match="need 29 cache positions"):
        gen.generate(_prompt(10), max_new_tokens=20)
    with pytest.raises(GenerationError, match="past the end of the cache"):
        gen.step(1, MAX_LEN, gen.empty_cache())
    with pytest.raises(GenerationError, match="no tokenizer") as e:
        gen.generate("hello", max_new_tokens=2)
    assert e.value.hint and "prompt-ids" in e.value.hint
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.generate([1, 500], max_new_tokens=2)
    with pytest.raises(GenerationError, match="top_p"):
        gen.generate([1, 2], max_new_tokens=2, do_sample=True, top_p=0.0)
    with pytest.raises(splice.CaptureError, match="prompt_len=30 is more than max_len=24"):
        capture_lm(build("llama"), max_len=24, prompt_len=30)
    with pytest.raises(splice.CaptureError, match="expects a transformers causal LM"):
        capture_lm(torch.nn.Linear(4, 4), max_len=8)
    with pytest.raises(splice.CaptureError, match="more than the model's 64 positions"):
        capture_lm(build("llama"), max_len=100)


def test_cli_generate(capsys) -> None:
    from splice import models
    from splice.tools.cli import main

    argv = ["generate", "llama", "--prompt-ids", "5,6,7", "--max-new", "5", "--eager"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    model, _ = models.llama()
    want = Generator.eager(capture_lm(model, max_len=7, prompt_len=3)).generate(
        [5, 6, 7], max_new_tokens=5
    )
    assert out[0].split() == [str(t) for t in want.tokens]
    assert "tokens/s" in out[-1] and "decode:" in out[-1]
    assert main(["generate", "llama", "--prompt", "hello", "--eager"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["generate", "llama", "--prompt-ids", "1,x"]) == 1
    assert "--prompt-ids must be integers" in capsys.readouterr().err
