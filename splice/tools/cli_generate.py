"""``splice generate``: greedy or sampled generation with a compiled prefill/decode loop.

::

    splice generate MODEL --prompt-ids 1,2,3 [-p PIPELINE] [--max-new N] [-t TARGET]
                    [--max-len L] [--sample --temperature T --top-k K --top-p P --seed S]
                    [--eager] [-o FOLDER] [-a KEY=VALUE ...]

MODEL is a factory of :mod:`splice.models` by name (``llama``, ``gpt2``, ``mixtral``...) or
``package.module:factory``; the factory returns a ``transformers`` causal LM (its example
inputs are not used). The model is captured with :func:`splice.capture_lm` (a static cache
of ``--max-len`` positions, default prompt + new tokens; prefill over the prompt's length),
``-p`` runs a pipeline on both programs, and both are compiled for ``-t`` (or run eagerly
with ``--eager``). Prints the new tokens, then tokens/s of prefill and of decode.
"""

from __future__ import annotations

import argparse
from typing import Any

import splice
from splice.ir.lm import GenerationError
from splice.passes import parse_pipeline
from splice.runtime.generate import Generator
from splice.tools.common import (
    console,
    float_at_least,
    int_at_least,
    load_model_spec,
    parse_factory_args,
)


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise GenerationError(
            f"--prompt-ids must be integers separated by commas or spaces, got {text!r}",
            hint="e.g. --prompt-ids 1,2,3",
        ) from None
    if not ids:
        raise GenerationError("--prompt-ids is empty", hint="e.g. --prompt-ids 1,2,3")
    return ids


def _model_spec(name: str) -> str:
    """A bare factory name means ``splice.models:NAME``."""
    return name if ":" in name else f"splice.models:{name}"


def cmd_generate(a: argparse.Namespace) -> int:
    con = console()
    if a.prompt is not None and a.prompt_ids is not None:
        raise GenerationError("give --prompt or --prompt-ids, not both")
    if a.prompt is None and a.prompt_ids is None:
        raise GenerationError("give a prompt", hint="--prompt-ids 1,2,3 (or --prompt TEXT)")
    prompt: Any = a.prompt if a.prompt is not None else _prompt_ids(a.prompt_ids)
    model, _ = load_model_spec(_model_spec(a.model), parse_factory_args(a.arg))
    tokenizer = getattr(model, "tokenizer", None)
    if isinstance(prompt, str) and tokenizer is None:
        raise GenerationError(
            f"{a.model} has no tokenizer, so it cannot take a text prompt",
            hint="give token ids with --prompt-ids 1,2,3",
        )
    n = len(prompt) if isinstance(prompt, list) else len(tokenizer(prompt)["input_ids"])
    max_len = a.max_len or n + a.max_new - 1
    lm = splice.capture_lm(model, max_len=max_len, prompt_len=min(n, max_len), tokenizer=tokenizer)
    if a.pipeline:
        lm = lm.run_pipeline(parse_pipeline(a.pipeline))
    if a.eager:
        gen = Generator.eager(lm)
    else:
        gen = Generator.compile(lm, a.target, output=a.output)
    stream = (lambda t: con.print(t, end=" ")) if a.stream else None
    r = gen.generate(
        prompt,
        max_new_tokens=a.max_new,
        do_sample=a.sample,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        seed=a.seed,
        callback=stream,
    )
    if a.stream:
        con.print()
    else:
        con.print(" ".join(str(t) for t in r.tokens))
    if r.text is not None:
        con.print(r.text)
    how = "eager" if a.eager else a.target
    con.print(
        f"prefill: {r.prompt_tokens} tokens in {r.prefill_seconds * 1e3:.1f} ms "
        f"({r.prefill_tokens_per_s:.1f} tokens/s); decode: {r.decode_steps} steps in "
        f"{r.decode_seconds * 1e3:.1f} ms ({r.decode_tokens_per_s:.1f} tokens/s) "
        f"[{how}, cache {max_len}, stop: {r.stop_reason}]"
    )
    return 0


def add_command(sub: Any, model_arg: Any) -> None:
    """Register ``splice generate`` on the subparsers ``sub`` of the ``splice`` parser."""

    sp = sub.add_parser(
        "generate",
        help="generate tokens with a compiled prefill/decode loop over a static KV cache",
        description="Capture a causal LM as prefill and decode programs over a static "
        "cache, optionally run a pipeline on both, compile them and generate.",
    )
    model_arg(sp, "model", "a splice.models factory name (llama, gpt2...) or MODEL")
    sp.add_argument("--prompt-ids", metavar="IDS", help="prompt token ids, e.g. 1,2,3")
    sp.add_argument("--prompt", metavar="TEXT", help="prompt text (models with a tokenizer)")
    sp.add_argument(
        "-p", "--pipeline", help='pipeline run on both programs, e.g. "lowrank{ratio=0.5}"'
    )
    sp.add_argument("--max-new", type=int_at_least(1), default=16, help="new tokens (default 16)")
    sp.add_argument(
        "--max-len",
        type=int_at_least(1),
        help="cache positions (default: prompt + new tokens - 1)",
    )
    sp.add_argument("-t", "--target", default="host", help="compile target (default host)")
    sp.add_argument("-o", "--output", help="folder to keep the compiled generator in")
    sp.add_argument("--eager", action="store_true", help="run the programs with PyTorch")
    sp.add_argument("--sample", action="store_true", help="sample instead of greedy")
    sp.add_argument("--temperature", type=float_at_least(1e-6), default=1.0)
    sp.add_argument("--top-k", type=int_at_least(0), default=0, help="0: off")
    sp.add_argument("--top-p", type=float, default=1.0, help="1.0: off")
    sp.add_argument("--seed", type=int, help="seed of the sampler")
    sp.add_argument("--stream", action="store_true", help="print each token as it comes")
    sp.set_defaults(fn=cmd_generate)


__all__ = ["add_command", "cmd_generate"]
