"""capture_lm(model, max_len, prompt_len) -> LMPrograms: a causal LM as two programs over an
explicit, preallocated static KV cache.

* ``prefill(input_ids[1, T], key_0, value_0, ...) -> (logits[1, T, V], key_0', value_0', ...)``
  runs a prompt of ``T = prompt_len`` tokens at positions ``0..T-1``;
* ``decode(input_ids[1, 1], position[1], key_0, value_0, ...) -> (logits[1, 1, V], key_0', ...)``
  runs one token at ``position``.

Every value cache tensor is ``[1, kv_heads, max_len, head_dim]``; every *key* cache tensor is
stored transposed, ``[1, kv_heads, head_dim, max_len]`` (static shapes: one compiled
program serves every position). Position ``p`` of the cache holds the key/value of the token
at position ``p`` (column ``p`` of a key tensor, row ``p`` of a value tensor). Keys are
transposed because a decode step reads them as ``q · Kᵀ``: one query row against the
whole cache, which in the ``[head_dim, max_len]`` layout is a product whose columns are
contiguous — the layout a GEMV reads at memory speed without repacking the cache on every
step (the weights of a Linear are repacked once, at load time; a cache changes every
step). The attention code of ``transformers`` still sees keys as ``[.., max_len, head_dim]``
(a transposed view). The programs are functional: they take the cache and return the
updated cache, written as

* prefill: ``cat(new[.., :T], old[.., T:])`` along the position axis (the prompt fills the
  first ``T`` slots);
* decode: ``where(arange(max_len) == position, new, old)`` along it (one slot replaced;
  the TVM backend compiles this as an in-place write, see
  :mod:`splice.runtime.kernels.tvm_slot_write`);

and attention reads all ``max_len`` slots under an explicit additive mask
``kv_index <= query_position``, so slots past the current position (zeros, or stale values
of a padded prompt) never contribute. The mask is given to ``transformers`` as a 4-D
attention mask, which every supported architecture takes as-is, and the cache as a
:class:`transformers.Cache` whose layers write functionally (transformers' own
``StaticLayer`` writes with ``index_copy_`` in place, which would make the cache a mutated
input). Decode therefore costs the same at every position (it reads the whole cache) —
the property a static cache is for.

A prompt shorter than ``prompt_len`` is padded on the right: causal attention keeps the
first ``n`` positions exact, the logits at ``n - 1`` give the next token, and the stale
slots ``n..T-1`` are overwritten by decode before the mask lets them be read. A longer
prompt runs its tail through decode one token at a time (see
:class:`splice.runtime.generate.Generator`).

Supported: ``transformers`` decoder-only LMs whose attention layers call
``past_key_values.update`` and accept a 4-D mask and ``position_ids`` — GPT-2, LLaMA,
Mistral, Qwen2, Phi, Gemma2, Mixtral (its MoE blocks become ``splice::moe_ffn`` as in
:func:`splice.capture`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splice.errors import CaptureError, SpliceError
from splice.ir.capture import capture
from splice.ir.program import Program


class GenerationError(SpliceError):
    """A request a causal-LM program pair cannot serve: a prompt longer than the cache, a
    position past its end, text for a model without a tokenizer, a bad sampling option."""


# ---------------------------------------------------------------------------------------
# the functional static cache


def _cache_classes() -> tuple[type, type]:
    from transformers.cache_utils import Cache, StaticLayer

    class FunctionalStaticLayer(StaticLayer):
        """A static cache layer over given tensors that writes out of place; keys are held
        transposed (``keys_t``: ``[.., head_dim, max_len]``) and shown as ``keys``, their
        ``[.., max_len, head_dim]`` view."""

        def __init__(
            self, keys_t: torch.Tensor, values: torch.Tensor, position: torch.Tensor | None
        ):
            super().__init__(max_cache_len=values.shape[2])
            self.keys_t, self.values = keys_t, values
            self.keys = keys_t.transpose(-1, -2)
            self.dtype, self.device = values.dtype, values.device
            self.position = position  # None: prefill from position 0
            self.is_initialized = True

        def update(
            self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
        ) -> tuple[torch.Tensor, torch.Tensor]:
            self.keys_t = _write(self.keys_t, key_states.transpose(-1, -2), self.position, 3)
            self.keys = self.keys_t.transpose(-1, -2)
            self.values = _write(self.values, value_states, self.position, 2)
            return self.keys, self.values

    return Cache, FunctionalStaticLayer


def _write(
    old: torch.Tensor, new: torch.Tensor, position: torch.Tensor | None, dim: int
) -> torch.Tensor:
    """``old`` with ``new`` written at its first slots (prefill) or at slot ``position``
    (decode), along ``dim``."""
    length, t = old.shape[dim], new.shape[dim]
    new = new.to(old.dtype)
    if position is None:  # prefill: slots 0..t-1
        return new if t == length else torch.cat([new, old.narrow(dim, t, length - t)], dim=dim)
    ramp = [1] * old.dim()
    ramp[dim] = length
    slot = torch.arange(length, device=old.device).view(ramp) == position.view([1] * old.dim())
    return torch.where(slot, new, old)


def _mask(q_pos: torch.Tensor, length: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [1, 1, T, length]: 0 where kv index <= query position, else -inf-ish."""
    kv = torch.arange(length, device=q_pos.device).view(1, 1, 1, length)
    allowed = kv <= q_pos.view(1, 1, -1, 1)
    zero = torch.zeros((), dtype=dtype, device=q_pos.device)
    low = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=q_pos.device)
    return torch.where(allowed, zero, low)


class _Step(nn.Module):
    """The LM over the explicit cache: prefill (``decode=False``) or one decode step.

    Build it in the LM's own mode (``.train(lm.training)``): capture restores the wrapper's
    mode afterwards, recursively, which would otherwise put the LM in training mode."""

    def __init__(self, lm: nn.Module, n_layers: int, decode: bool):
        super().__init__()
        self.lm = lm
        self.n_layers = n_layers
        self.decode = decode

    def run(
        self, input_ids: torch.Tensor, position: torch.Tensor | None, cache: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        cache_cls, layer_cls = _cache_classes()
        length = cache[1].shape[2]  # values: [1, kv_heads, max_len, head_dim]
        t = input_ids.shape[1]
        q_pos = torch.arange(t, device=input_ids.device)
        if position is not None:
            q_pos = q_pos + position
        layers = [layer_cls(cache[2 * i], cache[2 * i + 1], position) for i in range(self.n_layers)]
        past = cache_cls(layers=layers)
        out = self.lm(
            input_ids=input_ids,
            attention_mask=_mask(q_pos, length, cache[0].dtype),
            position_ids=q_pos.unsqueeze(0),
            past_key_values=past,
            use_cache=True,
        )
        result = {"logits": out.logits}
        for i, layer in enumerate(past.layers):
            result[f"key_{i}"] = layer.keys_t
            result[f"value_{i}"] = layer.values
        return result


class _Prefill(_Step):
    def forward(
        self, input_ids: torch.Tensor, cache: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self.run(input_ids, None, cache)


class _Decode(_Step):
    def forward(
        self, input_ids: torch.Tensor, position: torch.Tensor, cache: list[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        return self.run(input_ids, position, cache)


# ---------------------------------------------------------------------------------------
# the program pair


@dataclass
class LMPrograms:
    """A causal LM captured as a prefill and a decode program over one static cache.

    ``cache_specs``: ``(name, shape, dtype)`` of each cache tensor, in program input order
    (``key_0, value_0, key_1, ...``; keys ``[1, kv_heads, head_dim, max_len]``, values
    ``[1, kv_heads, max_len, head_dim]``). ``eos_token_ids``: the model's end tokens (from its
    generation config), the default stop tokens of a Generator.
    """

    prefill: Program
    decode: Program
    max_len: int
    prompt_len: int
    vocab_size: int
    cache_specs: list[tuple[str, tuple[int, ...], torch.dtype]]
    eos_token_ids: list[int] = field(default_factory=list)
    tokenizer: Any = None

    def empty_cache(self) -> list[torch.Tensor]:
        """Zeroed cache tensors, one per ``cache_specs`` entry."""
        return [torch.zeros(shape, dtype=dtype) for _, shape, dtype in self.cache_specs]

    def calibration_samples(
        self, prompts: Sequence[torch.Tensor] | None = None, steps: int = 2
    ) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
        """Sample inputs for a calibrating pipeline: (prefill samples, decode samples).

        Prefill samples are the prompts (``[1, n]`` ids, padded to ``prompt_len``) over a
        zeroed cache; decode samples are the ``steps`` greedy steps that follow each prompt,
        each with the real cache the original prefill and decode programs produced, so that
        decode is calibrated on the activations it sees when generating."""
        if prompts is None:
            g = torch.Generator().manual_seed(0)
            prompts = [torch.randint(0, self.vocab_size, (1, self.prompt_len), generator=g)]
        pre: list[tuple[torch.Tensor, ...]] = []
        dec: list[tuple[torch.Tensor, ...]] = []
        for ids in prompts:
            n = check_prompt(ids, self.prompt_len, self.max_len, self.vocab_size)
            padded = pad_prompt(ids, self.prompt_len)
            inputs = (padded, *self.empty_cache())
            pre.append(inputs)
            with torch.no_grad():
                outs = self.prefill(*inputs)
            token = outs[0][:, n - 1].argmax(-1).view(1, 1)
            cache = list(outs[1:])
            for pos in range(n, min(n + steps, self.max_len)):
                step = (token, torch.tensor([pos]), *cache)
                dec.append(step)
                with torch.no_grad():
                    outs = self.decode(*step)
                token = outs[0][:, -1].argmax(-1).view(1, 1)
                cache = list(outs[1:])
        return pre, dec

    def run_pipeline(
        self, pipeline: Any, prompts: Sequence[torch.Tensor] | None = None, **run_kwargs: Any
    ) -> LMPrograms:
        """Apply ``pipeline`` (a :class:`~splice.passes.Pipeline`) to both programs; a new LMPrograms.

        Each program runs the pipeline with its own calibration samples
        (:meth:`calibration_samples`). Passes that decide from the weights alone (``lowrank``
        with ``method=svd``, ``experts`` with k-means) give both programs the same weights;
        calibrated ones calibrate each on its own inputs. :func:`shared_weights` says which.
        Both runs share one :class:`~splice.passes.base.PassContext` (unless ``ctx=`` is
        given), so weight-only work such as ``lowrank{method=svd}``'s SVDs is done once.
        """
        from dataclasses import replace

        if not hasattr(pipeline, "run"):
            raise GenerationError(
                f"run_pipeline takes a Pipeline, got {type(pipeline).__name__}",
                hint='build one with splice.passes.parse_pipeline("lowrank{ratio=0.5}")',
            )
        pre_s, dec_s = self.calibration_samples(prompts)
        if run_kwargs.get("ctx") is None:
            # one context for both runs: a result that depends on a weight alone (lowrank's
            # SVD) is computed once for the two programs, which share their weight tensors
            run_kwargs["ctx"] = pipeline.context()
        pre = pipeline.run(self.prefill, sample_inputs=pre_s, **run_kwargs).program
        dec = pipeline.run(self.decode, sample_inputs=dec_s, **run_kwargs).program
        return replace(self, prefill=pre, decode=dec)

    def shared_weights(self) -> tuple[list[str], list[str]]:
        """(names equal in both programs, names that differ) among weights both hold."""
        a, b = self.prefill.weights, self.decode.weights
        same, differ = [], []
        for name in sorted(set(a) & set(b)):
            x, y = a[name], b[name]
            ok = x.shape == y.shape and x.dtype == y.dtype and torch.equal(x, y)
            (same if ok else differ).append(name)
        return same, differ


def check_prompt(ids: Any, prompt_len: int, max_len: int, vocab_size: int) -> int:
    """The length of a ``[1, n]`` (or ``[n]``) id prompt; GenerationError when it cannot run."""
    if isinstance(ids, str):
        raise GenerationError(
            "this model has no tokenizer, so it cannot take a text prompt",
            hint="give token ids (a [1, n] int64 tensor, or --prompt-ids 1,2,3 on the command line)",
        )
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        raise GenerationError(
            f"a prompt is a [1, n] tensor of int64 token ids, got {_describe(ids)}"
        )
    if ids.dim() != 2 or ids.shape[0] != 1:
        raise GenerationError(
            f"a prompt is [1, n] token ids (batch 1), got shape {list(ids.shape)}",
            hint="generate one sequence at a time",
        )
    n = ids.shape[1]
    if n == 0:
        raise GenerationError("the prompt is empty", hint="give at least one token id")
    if n > max_len:
        raise GenerationError(
            f"the prompt has {n} tokens but the cache holds {max_len} positions",
            hint=f"capture with max_len >= {n} (capture_lm(model, max_len=...))",
        )
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise GenerationError(
            f"the prompt holds token ids in [{int(ids.min())}, {int(ids.max())}], outside the "
            f"vocabulary [0, {vocab_size})",
        )
    return n


def pad_prompt(ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """The first ``prompt_len`` ids of ``ids``, right-padded with zeros to ``prompt_len``."""
    ids = ids[:, :prompt_len].to(torch.int64)
    if ids.shape[1] < prompt_len:
        ids = torch.cat([ids, ids.new_zeros(1, prompt_len - ids.shape[1])], dim=1)
    return ids


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return type(x).__name__


# ---------------------------------------------------------------------------------------
# capture


def capture_lm(
    model: nn.Module,
    *,
    max_len: int,
    prompt_len: int | None = None,
    tokenizer: Any = None,
    name: str | None = None,
) -> LMPrograms:
    """Capture a ``transformers`` causal LM as a prefill and a decode program over a static
    cache of ``max_len`` positions; prefill takes ``prompt_len`` tokens (default:
    ``min(32, max_len)``). ``tokenizer`` (optional) lets a Generator take text. Both are
    captured with :func:`splice.capture` (non-strict
    ``torch.export``), from the same modules, so their weights have the same names.

    Raises :class:`~splice.errors.CaptureError` for a model that is not a causal LM with a
    KV cache, or sizes that do not fit it.
    """
    _check_sizes(model, max_len, prompt_len)
    prompt_len = min(32, max_len) if prompt_len is None else prompt_len
    config = model.config
    vocab = int(config.vocab_size)
    n_layers, kv_shape = _cache_geometry(model)
    dtype = next(model.parameters()).dtype  # the cache holds what attention computes
    specs: list[tuple[str, tuple[int, ...], torch.dtype]] = []
    for i in range(n_layers):
        heads, hd_k, hd_v = kv_shape[i]
        specs.append((f"key_{i}", (1, heads, hd_k, max_len), dtype))  # keys transposed
        specs.append((f"value_{i}", (1, heads, max_len, hd_v), dtype))
    cache = [torch.zeros(s, dtype=d) for _, s, d in specs]
    base = name or type(model).__name__
    ids = torch.zeros(1, prompt_len, dtype=torch.int64)
    prefill = capture(
        _Prefill(model, n_layers, decode=False).train(model.training),
        ((ids, cache), {}),
        name=f"{base}_prefill",
    )
    decode = capture(
        _Decode(model, n_layers, decode=True).train(model.training),
        ((ids[:, :1], torch.tensor([prompt_len % max_len]), cache), {}),
        name=f"{base}_decode",
    )
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return LMPrograms(prefill, decode, max_len, prompt_len, vocab, specs, eos, tokenizer)


def _check_sizes(model: nn.Module, max_len: Any, prompt_len: Any) -> None:
    if not isinstance(model, nn.Module) or not hasattr(model, "config"):
        raise CaptureError(
            f"capture_lm expects a transformers causal LM, got {type(model).__name__}",
            hint="pass e.g. transformers.LlamaForCausalLM(...) or splice.models.llama()[0]",
        )
    for label, v in (("max_len", max_len), ("prompt_len", prompt_len)):
        if v is None and label == "prompt_len":
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise CaptureError(f"capture_lm: {label} must be a positive integer, got {v!r}")
    if prompt_len is not None and prompt_len > max_len:
        raise CaptureError(
            f"capture_lm: prompt_len={prompt_len} is more than max_len={max_len}",
            hint="the prompt must fit in the cache",
        )
    config = model.config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if limit is not None and max_len > int(limit):
        raise CaptureError(
            f"capture_lm: max_len={max_len} is more than the model's {int(limit)} positions",
            where=f"{type(model).__name__}.config",
            hint=f"choose max_len <= {int(limit)}",
        )
    window = getattr(config, "sliding_window", None)
    if window is not None and max_len > int(window):
        raise CaptureError(
            f"capture_lm: max_len={max_len} is more than the model's sliding window "
            f"({int(window)}); the static cache does not implement windowed attention",
            where=f"{type(model).__name__}.config.sliding_window",
            hint=f"choose max_len <= {int(window)}",
        )


def _cache_geometry(model: nn.Module) -> tuple[int, list[tuple[int, int, int]]]:
    """(layers, [(kv_heads, key head_dim, value head_dim)] per layer), from one eager step
    with a DynamicCache: every architecture reports its own cache shape."""
    try:
        with torch.no_grad():
            out = model(input_ids=torch.zeros(1, 1, dtype=torch.int64), use_cache=True)
    except Exception as e:  # a model that cannot run one token is not a causal LM
        raise CaptureError(
            f"capture_lm: {type(model).__name__} failed on one token with use_cache=True: "
            f"{type(e).__name__}: {e}",
            hint="capture_lm takes transformers causal LMs (GPT-2, LLaMA, Mistral, ...)",
        ) from None
    past = getattr(out, "past_key_values", None)
    layers = getattr(past, "layers", None)
    if not layers or not hasattr(out, "logits"):
        raise CaptureError(
            f"capture_lm: {type(model).__name__} returns no KV cache",
            hint="capture_lm takes transformers causal LMs with a KV cache",
        )
    shapes = []
    for layer in layers:
        k, v = layer.keys, layer.values
        shapes.append((int(k.shape[1]), int(k.shape[3]), int(v.shape[3])))
    return len(layers), shapes


__all__ = ["GenerationError", "LMPrograms", "capture_lm", "check_prompt", "pad_prompt"]
