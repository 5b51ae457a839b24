"""``hyper``: replace chosen weights by the output of a hypernetwork fed by a new program input.

Papers: Magnitude Invariant Parametrizations Improve Hypernetwork Learning (MIP; Ortiz,
Guttag, Dalca, ICLR 2024; its authors' library is ``hyperlight``), von Oswald et al.,
"Continual learning with hypernetworks" (ICLR 2020; ``hypnettorch``'s chunked hypernetwork),
HyperCRL (Huang et al., 2021: the same construction for continual model-based RL).

hyperlight hypernetizes by swapping hand-picked ``nn.Module`` classes; here it is a graph
pass, so it applies to any captured program. For the parameters matching ``targets`` (globs
over state_dict names, ``|``-separated; ``exclude`` removes names):

* a program input ``cond`` (option ``input``; without it the pass names the input ``cond``,
  or ``cond_1``, ``cond_2``… when a value of the program is already called ``cond``, as the
  ``torch.cond`` nodes of ``capture_dynamic`` programs are; an explicit ``input=`` that
  collides is an error) is added: shape ``[d]`` (``cond_dim=d``), one
  weight set for the whole batch; or ``[B, d]`` with ``per_sample=true``, one weight set per
  sample (B = dim 0 of the program's first input, which must be static);
* the input is encoded: ``encoding=mip`` gives E(γ) = [cos(πγ/2), sin(πγ/2)] (width 2d,
  ‖E(γ)‖ = √d for every γ — MIP's magnitude-invariant input), ``identity`` gives E(γ) = γ;
* a hypernetwork — an MLP with ``hidden`` widths (``hidden=[64,64]``), LeakyReLU(0.01)
  between layers and a bias-free output head — maps E(γ) to Δθ, one value per element of
  every target (output width Σ numel(targets));
* every read of a target becomes θ = θ0 + Δθ(E(γ)), sliced and reshaped to the target's
  shape, where θ0 (the weight ``{prefix}.theta0``) holds the original values flattened in
  target order. This is MIP's residual form: in hyperlight θ0 is the bias of the output
  layer (``HyperNet.from_existing``); here it is a separate weight, so it can be frozen
  (``to_module(..., freeze_original=True)``, hyperlight's ``freeze_independent_weights``).

Sub-graphs: weights live in the top-level graph and reach ``cond`` branches, ``branches``
parts and ``stitch`` routes as operands, so replacing a target's top-level read makes every
read inside a sub-graph receive the generated value too (``stats["reads_in_subgraphs"]``
counts them); with ``per_sample=true`` a target passed into a sub-graph is an error naming
the call (per-sample forms are rewritten in the top-level graph only).

The targets leave the parameter list; the hypernetwork's weights are new program parameters,
named as an ``nn.Sequential`` would name them: ``{prefix}.net.0.weight``, ``.net.0.bias``,
``.net.2.weight`` … and the head ``{prefix}.net.{2·len(hidden)}.weight``.

Initialisation (seeded by ``seed``): hidden layers follow hyperlight — kaiming-normal with
``mode=fan_out`` for LeakyReLU, zero biases. ``init=preserve`` zeroes the head, so Δθ = 0 and
the program equals the original for every γ (the pass is then ``exact``); the first
gradient reaches only the head. ``init=fanout`` is MIP's: the head is initialised as one
kaiming fan-out block per target (``HyperNet._init_output_split``), zero for targets named
``*.bias`` — the program then changes (``approximate``).

Chunking (``chunk_size=c``, hypnettorch's ``ChunkedHMLP``): the flat target vector is cut
into C = ⌈N/c⌉ chunks; chunk j gets a learned embedding ``{prefix}.chunk_emb[j]`` (width
``chunk_emb``, normal(0, 1)), concatenated to E(γ); one shared MLP emits c values per chunk,
and the surplus of the last chunk is dropped. The head is [c, hidden[-1]] instead of
[N, hidden[-1]]: far fewer hypernetwork parameters for large targets.

Per-sample weights (``per_sample=true``) rewrite each use of a target into a batched form
(the op -> rule tables of :mod:`splice.passes.hyper_batching`):
``linear``/``addmm``/``mm``/``matmul`` (GPT-2's Conv1D, LLaMA's projections) become
``bmm`` over [B, rows, in]; ``conv1d/2d/3d``/``convolution`` become one grouped convolution
over [1, B·C, …] (groups·B); ``embedding`` reads one [B·V, D] table at indices offset by
b·V; ``layer_norm``/``batch_norm`` apply the per-sample affine after
normalising; pointwise ops broadcast [B, 1…, *shape]; ``t``/``transpose``/``permute``/
``view``/… of a target stay per-sample. A 2-D activation [N, in] must be a batch-major
flattening (a view) of a tensor whose dim 0 is the batch, or have N = B. Any other use
(a reduction over a weight, say) raises :class:`PassError` naming the node.

The pass records what it did in ``program.attrs["hyper"][prefix]`` (input, targets with
offsets and the nodes that compute them), which :mod:`splice.passes.specialize` and
:func:`to_module` read.

Invariants (tests/test_hyper.py): ``init=preserve`` equals the original for random γ
(1e-6); ‖E(γ)‖ is constant; the head has Σ numel(targets) rows; targets leave the parameter
list and other weights are untouched (the same tensors); a batched cond equals a per-sample
loop; ``num_chunks == ⌈N/c⌉``; ``specialize`` at γ equals the conditioned program at γ.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
from torch import nn

from splice.errors import PassError, PipelineError
from splice.ir import meta as M
from splice.ir.program import Program, weight_getters, weight_name_problem
from splice.ir.rewriter import Rewriter
from splice.ir.verify import reserved_name_reason
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.globs import matches
from splice.passes.hyper_batching import PerSample
from splice.passes.registry import register_pass
from splice.passes.subgraphs import GraphTree
from splice.passes.training import ProgramModule

aten = torch.ops.aten
Encoding = Literal["mip", "identity"]
Init = Literal["preserve", "fanout"]
NEGATIVE_SLOPE = 0.01  # nn.LeakyReLU's default, as hyperlight uses it
ATTR = "hyper"


# ---------------------------------------------------------------------------------------
# reference pieces (plain torch; the graph the pass builds computes the same)


def encode(cond: torch.Tensor, encoding: str = "mip") -> torch.Tensor:
    """E(γ): ``[cos(πγ/2), sin(πγ/2)]`` along the last dim for ``mip``, γ for ``identity``."""
    if encoding == "identity":
        return cond
    if encoding == "mip":
        z = cond * (math.pi / 2)
        return torch.cat([torch.cos(z), torch.sin(z)], dim=-1)
    raise PassError(f"hyper: unknown encoding {encoding!r}", hint="encodings: mip, identity")


@dataclass
class Target:
    name: str
    shape: tuple[int, ...]
    offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def init_hypernet(
    in_width: int,
    hidden: Sequence[int],
    out_width: int,
    *,
    init: str,
    blocks: Sequence[tuple[str, int]] | None,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> dict[str, torch.Tensor]:
    """The MLP's tensors by ``nn.Sequential`` name (``net.0.weight`` …), initialised as in
    the module docstring. ``blocks`` lists (target name, numel) in head-row order for the
    per-target fan-out init of the head; None initialises the head as one block."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    width = in_width
    for i, h in enumerate(hidden):
        w = torch.empty(h, width, dtype=torch.float64)
        nn.init.kaiming_normal_(w, mode="fan_out", nonlinearity="leaky_relu", generator=g)
        out[f"net.{2 * i}.weight"] = w.to(dtype)
        out[f"net.{2 * i}.bias"] = torch.zeros(h, dtype=dtype)
        width = h
    head = torch.zeros(out_width, width, dtype=torch.float64)
    if init == "fanout":
        offset = 0
        for name, n in blocks or [("", out_width)]:
            if not name.endswith(".bias"):
                nn.init.kaiming_normal_(
                    head[offset : offset + n], mode="fan_out", nonlinearity="leaky_relu",
                    generator=g,
                )  # fmt: skip
            offset += n
    out[f"net.{2 * len(hidden)}.weight"] = head.to(dtype)
    return out


def hypernet_module(hidden: Sequence[int], in_width: int, out_width: int) -> nn.Sequential:
    """An ``nn.Sequential`` whose state_dict names match the pass's ``{prefix}.net.*``."""
    layers: list[nn.Module] = []
    width = in_width
    for h in hidden:
        layers += [nn.Linear(width, h), nn.LeakyReLU(NEGATIVE_SLOPE)]
        width = h
    layers.append(nn.Linear(width, out_width, bias=False))
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------------------------
# the pass


@register_pass
@dataclass(frozen=True)
class Hyper(Pass):
    """Hypernetwork weight injection, MIP form (see the module docstring)."""

    name = "hyper"
    semantics = "exact"  # init=fanout instances are "approximate" (set in validate)
    summary = (
        "replace chosen weights by θ0 + Δθ(E(cond)) from a hypernetwork fed by a new input "
        "`cond` (MIP encoding, residual form, optional chunking, per-sample weights); exact "
        "with init=preserve, approximate with init=fanout"
    )

    targets: str = ""
    exclude: str = ""
    cond_dim: int = 1
    hidden: tuple[int, ...] = (64, 64)
    encoding: Encoding = "mip"
    init: Init = "preserve"
    chunk_size: int | None = None
    chunk_emb: int = 8
    per_sample: bool = False
    input: str | None = None
    prefix: str = "hyper"
    seed: int = 0

    def validate(self) -> None:
        if not self.targets:
            raise PipelineError(
                "hyper needs targets=GLOB (parameter names, `|`-separated)",
                hint="e.g. hyper{targets=*.mlp.*.weight,cond_dim=2}",
            )
        if self.cond_dim < 1:
            raise PipelineError(f"hyper: cond_dim must be >= 1, got {self.cond_dim}")
        if any(h < 1 for h in self.hidden):
            raise PipelineError(
                f"hyper: hidden widths must be >= 1, got {list(self.hidden)}",
                hint="e.g. hidden=[64,64]; hidden=[] is a linear hypernetwork",
            )
        if self.chunk_size is not None and self.chunk_size < 1:
            raise PipelineError(f"hyper: chunk_size must be >= 1, got {self.chunk_size}")
        if self.chunk_emb < 1:
            raise PipelineError(f"hyper: chunk_emb must be >= 1, got {self.chunk_emb}")
        if self.input is not None and not self.input.isidentifier():
            raise PipelineError(f"hyper: input must be an identifier, got {self.input!r}")
        if not all(p.isidentifier() for p in self.prefix.split(".")):
            raise PipelineError(f"hyper: prefix must be a dotted identifier, got {self.prefix!r}")
        problem = weight_name_problem(f"{self.prefix}.theta0")
        if problem is not None:  # its weights are named {prefix}.theta0, {prefix}.net.0.weight...
            raise PipelineError(
                f"hyper: prefix {self.prefix!r} cannot name weights: {problem}",
                hint="choose another prefix=, e.g. prefix=hyper",
            )
        # a per-instance override of the class attribute: a fanout head changes the function
        object.__setattr__(self, "semantics", "exact" if self.init == "preserve" else "approximate")

    # -- selecting ---------------------------------------------------------------------
    def _select(self, program: Program) -> tuple[list[Target], list[dict[str, str]]]:
        chosen: list[Target] = []
        skipped: list[dict[str, str]] = []
        offset = 0
        for name, kind in program.weight_kinds.items():
            if not matches(name, self.targets, self.exclude):
                continue
            t = program.get_weight(name)
            if kind != "param":
                skipped.append({"weight": name, "reason": f"a {kind}, not a parameter"})
                continue
            if not t.dtype.is_floating_point:
                skipped.append({"weight": name, "reason": f"dtype {t.dtype} is not floating"})
                continue
            chosen.append(Target(name, tuple(int(d) for d in t.shape), offset))
            offset += t.numel()
        if not chosen:
            params = list(program.named_parameters())
            listing = ", ".join(params[:8]) + (", …" if len(params) > 8 else "")
            raise PassError(
                f"hyper: no parameter of program {program.name!r} matches "
                f"targets={self.targets!r}"
                + (f" exclude={self.exclude!r}" if self.exclude else ""),
                hint=f"globs match state_dict names; parameters: {listing or '(none)'}",
            )
        dtypes = {program.get_weight(t.name).dtype for t in chosen}
        if len(dtypes) > 1:
            raise PassError(
                f"hyper: targets have different dtypes {sorted(map(str, dtypes))}",
                hint="one hypernetwork emits one dtype; target one dtype per hyper pass",
            )
        return chosen, skipped

    def _batch(self, program: Program) -> int | None:
        if not self.per_sample:
            return None
        for n in program.input_nodes:
            s = M.get_spec(n)
            if isinstance(s, M.TensorSpec) and s.rank >= 1:
                if not isinstance(s.shape[0], int):
                    raise PassError(
                        f"hyper{{per_sample=true}}: the batch dimension of input %{n.name} is "
                        f"symbolic ({s.shape[0]})",
                        hint="capture with a static batch size for per-sample weights, or use "
                        "per_sample=false (one cond for the whole batch)",
                    )
                return int(s.shape[0])
        raise PassError(
            "hyper{per_sample=true}: the program has no tensor input with a batch dimension"
        )

    def _input_name(self, program: Program) -> str:
        """The name of the new program input.

        An explicit ``input=`` is kept as given and is an error when a value of the program
        already has that name. Without it the input is called ``cond``, or ``cond_1``,
        ``cond_2``… when that name is taken (a program from ``capture_dynamic`` has
        ``torch.cond`` nodes named ``cond``): a name the pass generates never collides.
        """
        taken = {n.name for n in program.graph.nodes}
        if self.input is not None:
            if self.input in taken:
                raise PassError(
                    f"hyper: program {program.name!r} already has a value named %{self.input}",
                    hint="choose another input= name, or leave input= out for a fresh one",
                )
            return self.input
        name, i = "cond", 0
        while name in taken or reserved_name_reason(name) is not None:
            i += 1
            name = f"cond_{i}"
        return name

    # -- running -----------------------------------------------------------------------
    def run(self, program: Program, ctx: PassContext) -> PassResult:
        existing = program.attrs.get(ATTR, {})
        if self.prefix in existing:
            raise PassError(
                f"hyper: program {program.name!r} already has a hypernetwork {self.prefix!r}",
                hint="give the second one another prefix= (and input=)",
            )
        if any(w == self.prefix or w.startswith(self.prefix + ".") for w in program.weight_kinds):
            raise PassError(
                f"hyper: program {program.name!r} already has weights under {self.prefix!r}",
                hint="choose another prefix=",
            )
        input_name = self._input_name(program)
        targets, skipped = self._select(program)
        tree = GraphTree(program)
        in_subgraphs = sum(
            1 for t in targets for r in tree.readers(t.name) if not tree.is_top(r)
        )  # reads inside branches/parts: they receive the generated value as an operand
        batch = self._batch(program)
        dtype = program.get_weight(targets[0].name).dtype
        total = sum(t.numel for t in targets)
        chunked = self.chunk_size is not None
        num_chunks = math.ceil(total / self.chunk_size) if chunked else None
        enc_width = self.cond_dim * (2 if self.encoding == "mip" else 1)
        in_width = enc_width + (self.chunk_emb if chunked else 0)
        out_width = self.chunk_size if chunked else total
        tensors = init_hypernet(
            in_width, self.hidden, out_width, init=self.init,
            blocks=None if chunked else [(t.name, t.numel) for t in targets],
            seed=self.seed, dtype=dtype,
        )  # fmt: skip
        if chunked:
            g = torch.Generator().manual_seed(self.seed + 1)
            tensors["chunk_emb"] = torch.randn(num_chunks, self.chunk_emb, generator=g).to(dtype)
        theta0 = torch.cat([program.get_weight(t.name).detach().reshape(-1) for t in targets])

        rw = Rewriter(program, self.name)
        lead = [] if batch is None else [batch]
        cond = rw.placeholder(input_name, M.TensorSpec((*lead, self.cond_dim), dtype))
        loc = M.Loc(module_path=self.prefix, from_passes=(self.name,))
        first = cond.next  # placeholders may follow get_attr nodes: insert after the input
        names: dict[str, str] = {}
        with rw.at(first):
            nodes = {}
            for k, v in tensors.items():
                nodes[k] = rw.add_weight(f"{self.prefix}.{k}", v)
                names[k] = f"{self.prefix}.{k}"
            th0 = rw.add_weight(f"{self.prefix}.theta0", theta0.to(dtype).contiguous())

            def call(op: Any, *args: Any, name: str | None = None) -> fx.Node:
                return rw.call(op, args, name=name, loc=loc)

            h = cond
            if self.encoding == "mip":
                z = call(aten.mul.Tensor, cond, math.pi / 2)
                h = call(
                    aten.cat.default, [call(aten.cos.default, z), call(aten.sin.default, z)], -1
                )
            if chunked:
                h = call(aten.unsqueeze.default, h, -2)  # [*lead, 1, enc]
                h = call(aten.expand.default, h, [*lead, num_chunks, enc_width])
                emb = nodes["chunk_emb"]
                if lead:
                    emb = call(aten.expand.default, emb, [*lead, num_chunks, self.chunk_emb])
                h = call(aten.cat.default, [h, emb], -1)
            for i in range(len(self.hidden)):
                h = call(
                    aten.linear.default, h, nodes[f"net.{2 * i}.weight"], nodes[f"net.{2 * i}.bias"]
                )
                h = call(aten.leaky_relu.default, h, NEGATIVE_SLOPE)
            delta = call(
                aten.linear.default,
                h,
                nodes[f"net.{2 * len(self.hidden)}.weight"],
                name=f"{self.prefix}_delta",
            )
            if chunked:
                delta = call(aten.view.default, delta, [*lead, num_chunks * self.chunk_size])
                if num_chunks * self.chunk_size != total:
                    delta = call(aten.slice.Tensor, delta, len(lead), 0, total)
            flat = call(aten.add.Tensor, delta, th0, name=f"{self.prefix}_theta")
            values: dict[str, fx.Node] = {}
            for t in targets:
                part = call(aten.slice.Tensor, flat, len(lead), t.offset, t.offset + t.numel)
                values[t.name] = call(
                    aten.view.default, part, [*lead, *t.shape], name=f"{self.prefix}_w"
                )

        getters = weight_getters(program)
        if batch is None:
            for t in targets:
                for g in getters.get(t.name, []):
                    rw.replace(g, values[t.name])
        else:
            PerSample(program, rw, batch, cond).rewrite(
                {g: values[t.name] for t in targets for g in getters.get(t.name, [])}
            )
        getters = weight_getters(program)
        for t in targets:  # only the targets leave: other (even unread) weights are untouched
            for g in getters.get(t.name, []):
                rw.erase(g)
            program.remove_weight(t.name)

        info = {
            "input": input_name,
            "cond_dim": self.cond_dim,
            "per_sample": batch is not None,
            "batch": batch,
            "encoding": self.encoding,
            "init": self.init,
            "hidden": list(self.hidden),
            "chunk_size": self.chunk_size,
            "num_chunks": num_chunks,
            "theta0": f"{self.prefix}.theta0",
            "hypernet": [*names.values()],
            "targets": [
                {"name": t.name, "shape": list(t.shape), "offset": t.offset, "value": values[t.name].name}
                for t in targets
            ],
        }  # fmt: skip
        program.attrs[ATTR] = {**existing, self.prefix: info}
        program.bump_version()
        hyper_params = sum(int(v.numel()) for v in tensors.values())
        stats: dict[str, Any] = {
            "changed": True,
            "input": f"{input_name}: {M.TensorSpec((*lead, self.cond_dim), dtype)}",
            "targets": [
                {"name": t.name, "shape": list(t.shape), "numel": t.numel} for t in targets
            ],
            "target_params": total,
            "hypernet_params": hyper_params,
            "output_width": out_width,
            "num_chunks": num_chunks,
            "encoding": self.encoding,
            "init": self.init,
            "per_sample": batch is not None,
            "reads_in_subgraphs": in_subgraphs,
            "skipped": skipped,
        }
        g = torch.Generator().manual_seed(self.seed)
        sample = torch.rand((*lead, self.cond_dim), generator=g).to(dtype)
        return PassResult(program, True, stats, sample_inputs_for_new_inputs={input_name: sample})


# ---------------------------------------------------------------------------------------
# reading a transformed program


def hyper_info(program: Program, prefix: str | None = None) -> tuple[str, dict[str, Any]]:
    """(prefix, record) of the hypernetwork ``prefix`` (default: the only one) of ``program``."""
    nets = program.attrs.get(ATTR) or {}
    if not nets:
        raise PassError(
            f"program {program.name!r} has no hypernetwork", hint="run the hyper pass first"
        )
    if prefix is None:
        if len(nets) > 1:
            raise PassError(
                f"program {program.name!r} has {len(nets)} hypernetworks ({', '.join(nets)})",
                hint="name one with prefix=",
            )
        prefix = next(iter(nets))
    if prefix not in nets:
        raise PassError(
            f"program {program.name!r} has no hypernetwork {prefix!r}",
            hint=f"hypernetworks: {', '.join(nets)}",
        )
    return prefix, nets[prefix]


def hypernet_weight_names(program: Program, prefix: str | None = None) -> list[str]:
    """The hypernetwork's own trainable weights (MLP and chunk embeddings; not θ0)."""
    _, info = hyper_info(program, prefix)
    return list(info["hypernet"])


def value_nodes(program: Program, prefix: str | None = None) -> dict[str, fx.Node]:
    """Target name -> the node computing its generated value (θ0 + Δθ, reshaped)."""
    p, info = hyper_info(program, prefix)
    by_name = {n.name: n for n in program.graph.nodes}
    out = {}
    for t in info["targets"]:
        node = by_name.get(t["value"])
        if node is None:
            raise PassError(
                f"hypernetwork {p!r}: the value %{t['value']} of {t['name']} is missing from "
                f"program {program.name!r}",
                hint="a later pass removed or renamed it; run specialize right after hyper",
            )
        out[t["name"]] = node
    return out


def generated_weights(
    program: Program, cond: Any, prefix: str | None = None
) -> dict[str, torch.Tensor]:
    """The weights the hypernetwork generates for ``cond`` ([d] or [B, d] per the program),
    by target name; differentiable in the hypernetwork's parameters."""
    p, info = hyper_info(program, prefix)
    values = value_nodes(program, p)
    sub = program.extract([info["input"]], [n.name for n in values.values()], name=f"{p}_weights")
    node = next(n for n in program.input_nodes if n.name == info["input"])
    cond = torch.as_tensor(cond, dtype=M.tensor_spec(node).dtype)
    outs = sub.run(cond)
    return dict(zip(values, outs))


class HyperModule(ProgramModule):
    """A hypernetwork-conditioned program as a trainable ``nn.Module``
    (:class:`~splice.passes.training.ProgramModule` with the hypernetwork's parameters
    trainable).

    ``forward(*inputs)`` runs the program (``cond`` positionally last, or by keyword). Its
    weights are copies of the program's; :meth:`to_program` returns a Program with the
    trained values (for :mod:`~splice.passes.specialize`, ``splice.compile`` or ``save``).
    """

    def __init__(
        self, program: Program, *, prefix: str | None = None, freeze_original: bool = True
    ):
        prefix, info = hyper_info(program, prefix)
        hyper_names = list(info["hypernet"])
        super().__init__(program, trainable=lambda n: not freeze_original or n in hyper_names)
        self.prefix, self.info, self.hyper_names = prefix, info, hyper_names

    def hypernet_parameters(self) -> list[nn.Parameter]:
        params = self.named_program_parameters()
        return [params[n] for n in self.hyper_names]

    def generated_weights(self, cond: Any) -> dict[str, torch.Tensor]:
        return generated_weights(self._program, cond, self.prefix)


def to_module(
    program: Program, *, freeze_original: bool = True, prefix: str | None = None
) -> HyperModule:
    """A trainable :class:`HyperModule` of a program transformed by ``hyper``.

    The hypernetwork's parameters (``{prefix}.net.*``, ``{prefix}.chunk_emb``) require
    gradients; with ``freeze_original`` every other weight — θ0 and the untargeted original
    weights — is frozen (MIP's ``freeze_independent_weights``). The program is not changed.
    """
    return HyperModule(program, prefix=prefix, freeze_original=freeze_original)


__all__ = [
    "Hyper",
    "HyperModule",
    "encode",
    "generated_weights",
    "hyper_info",
    "hypernet_module",
    "hypernet_weight_names",
    "init_hypernet",
    "to_module",
    "value_nodes",
]
