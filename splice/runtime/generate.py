"""Generator: the decode loop over a compiled prefill and decode program.

``Generator.compile(lm_programs, target, output=DIR)`` compiles the two programs of
:func:`splice.capture_lm` into two artifacts, ``DIR/prefill.artifact`` and
``DIR/decode.artifact``, and writes ``DIR/generator.json`` (cache geometry, prompt length,
stop tokens); ``Generator.load(DIR)`` loads them back. Two artifacts, each with its own
weights file, because an artifact today holds one program and one ``weights.safetensors``:
the weights are stored (and held in memory) twice. A single artifact with two entry points
sharing one weights file is the natural next step (the ``parts`` list of the manifest
already allows several libraries); it needs the artifact format to name per-part inputs.

The cache lives in runtime memory between calls: each call's cache outputs are TVM
tensors exposed to torch through DLPack (no copy), and are handed to the next call through
DLPack again (no copy). The programs are functional — the decode step returns a cache
with one slot changed — but the TVM backend compiles that slot write as an in-place write
into the cache input (:mod:`splice.runtime.kernels.tvm_slot_write`; the decode artifact
lists the cache as its ``inplace_inputs``), and the loop donates the cache to each step
(:meth:`~splice.runtime.artifact.CompiledModel.run_donated`): a step writes one key and one
value row per layer, and the cache is never copied. Attention still reads all ``max_len``
positions (under the mask), so decode cost is independent of the position and grows with
``max_len``.

``Generator.eager(lm_programs)`` runs the same loop over the programs themselves (PyTorch,
eagerly): the reference a compiled loop must equal, also after a pipeline has transformed
them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from splice.errors import ArtifactError
from splice.ir import meta as M
from splice.ir.lm import GenerationError, LMPrograms, check_prompt, pad_prompt
from splice.runtime.artifact import CompiledModel, is_foreign, read_manifest
from splice.runtime.compile import compile as compile_program
from splice.runtime.edge import run_under_qemu

META = "generator.json"
PREFILL = "prefill.artifact"
DECODE = "decode.artifact"


@dataclass
class GenerationResult:
    """What :meth:`Generator.generate` produced: the new tokens and the time it took."""

    tokens: list[int]
    prompt_tokens: int
    prefill_seconds: float
    decode_seconds: float
    decode_steps: int
    stop_reason: str  # "max_new_tokens", "stop_token", "callback" or "cache_full"
    text: str | None = None

    @property
    def prefill_tokens_per_s(self) -> float:
        """Prompt tokens per second of the prefill phase (incl. any decode-fed prompt tail)."""
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds > 0 else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        """Decode steps per second (each step produces one token)."""
        return self.decode_steps / self.decode_seconds if self.decode_seconds > 0 else 0.0


@dataclass
class _Meta:
    max_len: int
    prompt_len: int
    vocab_size: int
    cache_specs: list[tuple[str, tuple[int, ...], torch.dtype]]
    eos_token_ids: list[int] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "max_len": self.max_len,
            "prompt_len": self.prompt_len,
            "vocab_size": self.vocab_size,
            "cache": [
                {"name": n, "shape": list(s), "dtype": M.dtype_name(d)}
                for n, s, d in self.cache_specs
            ],
            "eos_token_ids": self.eos_token_ids,
        }

    @staticmethod
    def from_json(data: dict[str, Any]) -> _Meta:
        return _Meta(
            int(data["max_len"]),
            int(data["prompt_len"]),
            int(data["vocab_size"]),
            [(c["name"], tuple(c["shape"]), M.dtype_from_name(c["dtype"])) for c in data["cache"]],
            [int(t) for t in data.get("eos_token_ids", [])],
        )


class Generator:
    """Generate tokens with a prefill and a decode step over a static KV cache.

    ``prefill(ids[1, prompt_len], *cache) -> [logits, *cache]`` and
    ``decode(id[1, 1], position[1], *cache) -> [logits, *cache]`` are callables returning
    lists of tensors: compiled artifacts (:meth:`compile`, :meth:`load`) or the programs
    themselves (:meth:`eager`).
    """

    def __init__(
        self,
        prefill: Callable[..., Sequence[torch.Tensor]],
        decode: Callable[..., Sequence[torch.Tensor]],
        meta: _Meta,
        *,
        tokenizer: Any = None,
    ):
        self._prefill = prefill
        self._decode = decode
        self.meta = meta
        self.tokenizer = tokenizer
        self.max_len = meta.max_len
        self.prompt_len = meta.prompt_len

    # -- construction -------------------------------------------------------------------

    @staticmethod
    def _meta_of(lm: LMPrograms) -> _Meta:
        return _Meta(
            lm.max_len, lm.prompt_len, lm.vocab_size, list(lm.cache_specs), list(lm.eos_token_ids)
        )

    @classmethod
    def eager(cls, lm: LMPrograms) -> Generator:
        """The loop over the programs run by PyTorch (the reference of a compiled loop)."""

        def run(program: Any) -> Callable[..., list[torch.Tensor]]:
            def call(*inputs: torch.Tensor) -> list[torch.Tensor]:
                with torch.no_grad():
                    return list(program(*inputs))

            return call

        return cls(run(lm.prefill), run(lm.decode), cls._meta_of(lm), tokenizer=lm.tokenizer)

    @classmethod
    def compile(
        cls,
        lm: LMPrograms,
        target: Any = "host",
        *,
        output: str | Path | None = None,
        num_threads: int | None = None,
        **compile_kwargs: Any,
    ) -> Generator:
        """Compile both programs (:func:`splice.compile`) into ``output`` (a new temp dir by
        default) and load them; an artifact for another machine (``aarch64-linux`` on x86)
        is run through :meth:`edge`."""
        import tempfile

        out = Path(output) if output is not None else Path(tempfile.mkdtemp(prefix="splice-gen-"))
        out.mkdir(parents=True, exist_ok=True)
        compile_program(lm.prefill, target, output=out / PREFILL, **compile_kwargs)
        compile_program(lm.decode, target, output=out / DECODE, **compile_kwargs)
        (out / META).write_text(json.dumps(cls._meta_of(lm).to_json(), indent=2) + "\n")
        if is_foreign(read_manifest(out / PREFILL)):  # e.g. aarch64 on x86: the edge runner
            gen = cls.edge(out)
        else:
            gen = cls.load(out, num_threads=num_threads)
        gen.tokenizer = lm.tokenizer
        return gen

    @classmethod
    def load(cls, path: str | Path, *, num_threads: int | None = None) -> Generator:
        """Load a generator folder written by :meth:`compile`."""
        path = Path(path)
        try:
            meta = _Meta.from_json(json.loads((path / META).read_text()))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ArtifactError(
                f"{META} cannot be read: {type(e).__name__}: {e}",
                where=str(path),
                hint="write the folder with splice.runtime.Generator.compile(...)",
            ) from None
        prefill = CompiledModel(path / PREFILL, num_threads=num_threads)
        decode = CompiledModel(path / DECODE, num_threads=num_threads)
        # the decode step writes its cache slot in place: the loop donates the cache
        return cls(prefill.run, decode.run_donated, meta)

    @classmethod
    def edge(cls, path: str | Path, *, root: Path | None = None) -> Generator:
        """The loop over an aarch64 generator folder (:meth:`compile` with target
        ``aarch64-linux``), each step run by the edge runner under ``qemu-aarch64``
        (:func:`splice.runtime.edge.run_under_qemu`).

        A correctness path, not a fast one: every prefill and decode call is one emulated
        process (TVM imported each time) and the cache passes through ``.npy`` files between
        steps. On a board, the loop belongs inside the runner's process."""
        path = Path(path)
        meta = _Meta.from_json(json.loads((path / META).read_text()))

        def remote(artifact: Path) -> Callable[..., list[torch.Tensor]]:
            def call(*inputs: torch.Tensor) -> list[torch.Tensor]:
                run = run_under_qemu(artifact, list(inputs), root=root)
                return [torch.from_numpy(o) for o in run.outputs]

            return call

        return cls(remote(path / PREFILL), remote(path / DECODE), meta)

    # -- the loop -----------------------------------------------------------------------

    def empty_cache(self) -> list[torch.Tensor]:
        """Zeroed cache tensors (allocated once per :meth:`generate` call)."""
        return [torch.zeros(s, dtype=d) for _, s, d in self.meta.cache_specs]

    def prefill(
        self, ids: torch.Tensor, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the prompt ``ids [1, n]``: (logits of its last token [V], the cache).

        ``n <= prompt_len`` runs the prefill program on the right-padded prompt; a longer
        prompt runs its tail through the decode program one token at a time."""
        n = check_prompt(ids, self.prompt_len, self.max_len, self.meta.vocab_size)
        outs = self._prefill(pad_prompt(ids, self.prompt_len), *cache)
        logits, cache = outs[0][0, min(n, self.prompt_len) - 1], list(outs[1:])
        for pos in range(self.prompt_len, n):
            logits, cache = self.step(int(ids[0, pos]), pos, cache)
        return logits, cache

    def step(
        self, token: int, position: int, cache: list[torch.Tensor]
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """One decode step: ``token`` at ``position``; (its logits [V], the new cache)."""
        if not 0 <= position < self.max_len:
            raise GenerationError(
                f"position {position} is past the end of the cache (max_len={self.max_len})",
                hint="capture with a larger max_len, or generate fewer tokens",
            )
        ids = torch.tensor([[token]], dtype=torch.int64)
        outs = self._decode(ids, torch.tensor([position], dtype=torch.int64), *cache)
        return outs[0][0, -1], list(outs[1:])

    def generate(
        self,
        prompt: torch.Tensor | Sequence[int] | str,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_tokens: Sequence[int] | None = None,
        callback: Callable[[int], bool | None] | None = None,
    ) -> GenerationResult:
        """Generate up to ``max_new_tokens`` tokens after ``prompt``.

        ``prompt``: ``[1, n]`` ids, a list of ids, or text (needs a tokenizer). Greedy
        unless ``do_sample``; sampling applies ``temperature``, then ``top_k`` (0: off), then
        ``top_p`` (1.0: off), with a ``torch.Generator`` seeded by ``seed``. Generation
        stops at a token of ``stop_tokens`` (default: the model's end tokens; the stop token
        is included in ``tokens``), or when ``callback(token)`` returns ``False``. The
        prompt plus the new tokens must fit in the cache: ``n + max_new_tokens - 1 <= max_len``
        (the last token is never fed back), else :class:`GenerationError`.
        """
        ids, text_in = self._prompt_ids(prompt)
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        n = check_prompt(ids, self.prompt_len, self.max_len, self.meta.vocab_size)
        if n + max_new_tokens - 1 > self.max_len:
            raise GenerationError(
                f"a prompt of {n} tokens and {max_new_tokens} new tokens need "
                f"{n + max_new_tokens - 1} cache positions, the cache has {self.max_len}",
                hint=f"generate at most {self.max_len - n + 1} new tokens, or capture with a "
                "larger max_len",
            )
        stops = set(self.meta.eos_token_ids if stop_tokens is None else stop_tokens)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        tokens: list[int] = []
        t0 = time.perf_counter()
        logits, cache = self.prefill(ids, self.empty_cache())
        token = _choose(logits, do_sample, temperature, top_k, top_p, gen)
        prefill_s = time.perf_counter() - t0
        decode_s, steps, reason = 0.0, 0, "max_new_tokens"
        position = n
        while True:
            tokens.append(token)
            if callback is not None and callback(token) is False:
                reason = "callback"
                break
            if token in stops:
                reason = "stop_token"
                break
            if len(tokens) >= max_new_tokens:
                break
            t1 = time.perf_counter()
            logits, cache = self.step(token, position, cache)
            token = _choose(logits, do_sample, temperature, top_k, top_p, gen)
            decode_s += time.perf_counter() - t1
            steps += 1
            position += 1
        text = None
        if text_in and self.tokenizer is not None:
            text = self.tokenizer.decode(tokens)
        return GenerationResult(tokens, n, prefill_s, decode_s, steps, reason, text)

    def _prompt_ids(self, prompt: Any) -> tuple[torch.Tensor, bool]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise GenerationError(
                    "this model has no tokenizer, so it cannot take a text prompt",
                    hint="give token ids (a [1, n] tensor or a list of ints; --prompt-ids 1,2,3 "
                    "on the command line), or pass tokenizer= to capture_lm",
                )
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
            return ids.to(torch.int64), True
        if isinstance(prompt, (list, tuple)):
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise GenerationError("a prompt list must hold int token ids")
            return torch.tensor([list(prompt)], dtype=torch.int64), False
        return prompt, False


def _check_sampling(max_new: Any, temperature: Any, top_k: Any, top_p: Any) -> None:
    if isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1:
        raise GenerationError(f"max_new_tokens must be a positive integer, got {max_new!r}")
    if not isinstance(temperature, (int, float)) or temperature <= 0:
        raise GenerationError(
            f"temperature must be > 0, got {temperature!r}", hint="use do_sample=False for greedy"
        )
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenerationError(f"top_k must be an integer >= 0 (0: off), got {top_k!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1] (1: off), got {top_p!r}")


def _choose(
    logits: torch.Tensor,
    do_sample: bool,
    temperature: float,
    top_k: int,
    top_p: float,
    gen: torch.Generator | None,
) -> int:
    """The next token from one position's logits [V]: argmax, or a sample."""
    logits = logits.float()
    if not do_sample:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k > 0 and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, -1).cumsum(-1)
        drop = cum - torch.softmax(sorted_logits, -1) >= top_p  # keep the smallest set >= top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = torch.softmax(logits, -1)
    return int(torch.multinomial(probs, 1, generator=gen))


__all__ = ["GenerationResult", "Generator"]
