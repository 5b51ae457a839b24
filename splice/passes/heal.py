"""``heal``: distil the original program into the transformed one, recovering the quality an
approximate pass cost.

Papers: SVD-LLM (Wang et al., 2024: after truncation, a sequential low-rank *parameter
update* fits the factors to the original layer's outputs), MoEfication (Zhang et al., 2022)
and LLaMA-MoE (Zhu et al., 2024: router training and continued training after splitting the
FFNs into experts), SN-Net (Pan et al., CVPR 2023: all stitched configurations are trained
jointly, one sampled route per step).

**Teacher.** ``ctx.programs["teacher"]`` when given, else ``ctx.original``: the program
before the pipeline's first approximate pass (the PassManager records it), so
``lowrank{...},heal{...}`` heals the factored program against the dense one. Its inputs must
be inputs of the transformed program by name (an input a transform added — ``stitch``'s
``config``, ``hyper``'s ``cond`` — is only given to the student). Without a teacher, or when
the teacher is the program itself (no approximate pass ran before ``heal``), it raises
:class:`~splice.errors.PassError`.

**What trains** (``train``): ``new`` — the weights the transforms created: every float
parameter that is none of the teacher's or of the context's programs' (``stitch`` anchors)
— not their name with its shape, and not their value (``stitch`` copies anchor weights under
new names), i.e. low-rank factors, experts and
routers, stitching layers, a hypernetwork; every other weight stays bit-identical. ``all`` —
every float parameter. Anything else is a ``|``-separated glob of weight names. No trainable
weight in scope is a PassError.

**Data.** ``ctx.calibration`` (tuples of the program's inputs; at least two): a fraction
``holdout`` of them, chosen with ``seed``, is held out, never trained on, and the loss on them
before and after is in the stats (``held_out``). Each step uses ``batch`` tuples.

**Never worse on its own measure** (``keep``): with ``keep=better`` (the default) the trained
weights are written back only when the held-out loss fell; when training raised it (a
transform that was already close to its teacher, an lr too high for the start), the program
is returned unchanged (``changed`` False, ``stats["kept"] == "original"``, the losses in
``held_out``). ``keep=last`` always writes the trained weights; so does ``holdout=0`` (no
rows to judge by).

**Scope.**

* ``global``: end to end; the loss compares every float output the two programs share (by
  name, else by position) and Adam (``lr``) updates all trainable weights for ``steps``
  steps (``schedule``: ``constant`` lr, or ``cosine``: decayed from ``lr`` to 0 along a
  half cosine over the steps). ``match`` (a ``|``-separated glob of value names, i.e. node
  names, empty by default) adds intermediate values to the comparison — hidden states, e.g.
  ``match=layer_norm*`` on a BERT: each token's state, far more signal than one pooled
  embedding. A matched value is one both programs compute under the same name with the same
  shape (a transform keeps the names of the nodes it does not replace); the training loss is
  the outputs' loss plus the mean of the matched values' losses. A glob matching no shared
  value, or ``match`` on a ``stitch`` program, is a PassError. The held-out loss stays the
  outputs' loss alone, comparable with and without ``match``. A ``stitch`` program (``attrs["stitch"]``, a ``config`` input) trains its
  configurations in turn, step ``i`` running the ``i mod n``-th of the n that read a
  trainable weight, so the layers a
  window shares learn a map that serves every pair (each configuration runs as its static
  program, :func:`~splice.passes.stitch.select_config`, on the same parameters: autograd
  through ``cond`` re-traces the branches on every call). With unit gates a ``moe_ffn`` router
  gets no gradient from the output (top-k is a step function); the experts do.
* ``local``: op by op, on the inputs each op receives in the transformed program (computed
  once, before training): a ``lowrank_linear`` against the teacher's dense Linear of the
  same layer (``{layer}.weight``, either orientation) and bias — SVD-LLM's update; a
  ``moe_ffn`` against itself with every expert selected and unit gates (the dense FFN it
  was cut from), its router against each expert's share of the output norm (binary cross
  entropy on the logits, MoEfication's router target with the output in place of the
  activation). Each op trains alone for ``steps`` steps. A trainable weight that no such op
  reads (a stitching layer, a hypernetwork) is a PassError: use ``scope=global``.
* ``sequential``: no gradient steps (``steps``, ``lr``, ``batch``, ``loss`` are not used
  for training): every ``lowrank_linear`` of the top graph, in program order, is refit in
  closed form to the teacher's Linear outputs on the inputs it receives in the student
  *after the layers before it were refit* — SVD-LLM's sequential low-rank update, solved as
  reduced-rank regression (float64, whitened truncation at the rank the transform chose;
  ``damp`` adds a ridge of damp · mean(diag X'X'ᵀ)); the bias is refit only when it trains.
  :mod:`splice.passes.heal_sequential` states the contract. No such op with trainable
  factors is a PassError. It composes before a gradient heal:
  ``heal{scope=sequential},heal{steps=600,...}``.

**Memory.** The teacher's values for a training row (its outputs, and with ``match`` every
matched hidden state) are computed the first time the row is drawn and kept while all kept
values fit in ``cache_mb`` MiB (default -1: a quarter of the machine's physical memory);
rows beyond that are recomputed each time they are drawn (one teacher run per row and step).
The weights trained do not depend on it: the teacher is deterministic.

Losses: ``mse``; ``cosine`` (1 − cosine similarity over the last dimension, averaged);
``kl`` (KL(teacher ‖ student) of the softmax over the last dimension: logits of an LM).

Deterministic: the held-out choice, the batch order and the global RNG (restored after) all
come from ``seed``. Progress through ``ctx.progress`` every few steps. Training runs through
:class:`~splice.passes.training.ProgramModule` (the program's GraphModule under autograd, the
mechanism ``hyper.to_module`` uses too); the trained values are written back with
:meth:`~splice.ir.rewriter.Rewriter.set_weight`, so shapes, specs and every other weight are
unchanged and the result compiles like the program before it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.fx as fx
import torch.nn.functional as F

from splice.errors import PassError, PipelineError
from splice.ir.ops import lowrank_linear, moe_ffn, op_def
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.globs import matches
from splice.passes.heal_sequential import fit_sequential
from splice.passes.linears import LinearSite, find_linears
from splice.passes.registry import register_pass
from splice.passes.stitch import select_config
from splice.passes.training import ProgramModule

Loss = Literal["mse", "cosine", "kl"]
Scope = Literal["local", "global", "sequential"]
Schedule = Literal["constant", "cosine"]
Keep = Literal["better", "last"]
Row = tuple[Any, ...]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

#: how often (in steps) progress is reported
_REPORT_EVERY = 10


@register_pass
@dataclass(frozen=True)
class Heal(Pass):
    """Train the transformed program to match its teacher (see the module docstring)."""

    name = "heal"
    semantics = "approximate"
    summary = "distil the program before the approximate passes into the transformed one"

    steps: int = 100
    lr: float = 1e-3
    batch: int = 4
    loss: Loss = "mse"
    scope: Scope = "global"
    train: str = "new"
    holdout: float = 0.25
    seed: int = 0
    schedule: Schedule = "constant"
    match: str = ""
    damp: float = 0.0
    keep: Keep = "better"
    cache_mb: int = -1

    def validate(self) -> None:
        if self.steps < 1:
            raise PipelineError(f"heal: steps must be >= 1, got {self.steps}")
        if not self.lr > 0:
            raise PipelineError(f"heal: lr must be > 0, got {self.lr}")
        if self.batch < 1:
            raise PipelineError(f"heal: batch must be >= 1, got {self.batch}")
        if self.cache_mb < -1:
            raise PipelineError(
                f"heal: cache_mb must be >= 0 (MiB), or -1 for a quarter of physical memory, "
                f"got {self.cache_mb}"
            )
        if not 0.0 <= self.holdout < 1.0:
            raise PipelineError(f"heal: holdout must be in [0, 1), got {self.holdout}")
        if self.match and self.scope != "global":
            raise PipelineError(
                "heal: match compares intermediate values end to end; it needs scope=global",
                hint="drop match=, or use scope=global",
            )
        if self.damp < 0 or (self.damp > 0 and self.scope != "sequential"):
            raise PipelineError(
                f"heal: damp={self.damp}: a ridge of the sequential fit, >= 0 and only with "
                "scope=sequential",
                hint="drop damp=, or use scope=sequential",
            )
        if not self.train:
            raise PipelineError(
                "heal: train is empty", hint="train=new, train=all or a glob of weight names"
            )

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        teacher, source = _teacher(program, ctx)
        t_index = _teacher_inputs(program, teacher)
        names = _trainable(program, [teacher, *ctx.programs.values()], self.train)
        rows, held = split_holdout(ctx.calibration, self.holdout, self.seed)
        loss_fn = _LOSSES[self.loss]
        module = ProgramModule(program, trainable=set(names))
        configs = _configs(program, module, set(names))
        pairs = _output_pairs(program, teacher)
        matched: list[str] = []
        if self.match:
            if configs[0].drop is not None:
                raise PassError(
                    "heal: match= is not supported on a stitch program (its configurations "
                    "compute different intermediate values)",
                    hint="drop match= to heal a stitch program on its outputs",
                )
            matched = _matched_values(program, teacher, self.match, ctx.calibration[0])
        rng = torch.random.fork_rng(devices=[])
        with rng:
            torch.manual_seed(self.seed)
            gen = torch.Generator().manual_seed(self.seed)
            with torch.no_grad():
                t_held = [teacher.run(*[r[i] for i in t_index]) for r in held]
                before = _end_to_end(held, t_held, pairs, configs, loss_fn)
            stats: dict[str, Any] = {}
            if self.scope == "global":
                runners, t_prog, t_pairs = configs, teacher, pairs
                if matched:
                    s_ext, t_prog, t_pairs = _with_values(program, teacher, pairs, matched)
                    params = module.named_program_parameters()
                    ext = ProgramModule(s_ext, trainable=set(names), shared=params)
                    runners = [_Runner(ext, None)]
                t_rows = TeacherValues(t_prog, t_index, rows, _cache_bytes(self.cache_mb))
                stats["train_loss"] = self._global(
                    module, rows, t_rows, t_pairs, runners, loss_fn, gen, ctx, len(pairs)
                )
                if matched:
                    stats["matched_values"] = len(matched)
                stats["teacher_cache"] = t_rows.summary()
            elif self.scope == "sequential":
                stats["sequential"] = fit_sequential(
                    module, teacher, t_index, rows, damp=self.damp, progress=ctx.progress
                )
            else:
                stats["local"] = self._local(module, teacher, rows, held, loss_fn, gen, ctx)
            with torch.no_grad():
                after = _end_to_end(held, t_held, pairs, configs, loss_fn)
        trained = module.named_program_parameters()
        improved = self.keep == "last" or not held or after < before
        if improved:
            rw = Rewriter(program, self.name)
            for n in names:
                rw.set_weight(n, trained[n].detach().clone())
        stats.update(
            teacher=source,
            scope=self.scope,
            loss=self.loss,
            steps=self.steps,
            trained_weights=len(names),
            trained_params=sum(trained[n].numel() for n in names),
            train_rows=len(rows),
            held_out_rows=len(held),
            held_out={"before": before, "after": after},
        )
        if configs[0].drop is not None:
            stats["configs"] = len(configs)
        stats["kept"] = "trained" if improved else "original"
        if not improved:
            stats["reason"] = (
                f"the held-out loss rose ({before:.4g} -> {after:.4g}): the program's weights "
                "are unchanged (keep=last writes them anyway)"
            )
        return PassResult(program, improved, stats)

    # -- global: end to end ----------------------------------------------------------------
    def _global(
        self,
        module: ProgramModule,
        rows: list[Row],
        t_rows: TeacherValues,
        pairs: list[tuple[int, int]],
        configs: list[_Runner],
        loss_fn: LossFn,
        gen: torch.Generator,
        ctx: PassContext,
        n_outputs: int,
    ) -> dict[str, float]:
        params = list(module.trainable_parameters().values())
        opt = torch.optim.Adam(params, lr=self.lr)
        sched = (
            torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=self.steps)
            if self.schedule == "cosine"
            else None
        )
        # configurations that read no trainable weight (an anchor alone) have nothing to learn
        trainable = [c for c in configs if c.module.trainable_parameters()] or configs
        order: list[int] = []
        first = last = math.nan
        for step in range(self.steps):
            picked = []
            for _ in range(min(self.batch, len(rows))):
                if not order:
                    order = torch.randperm(len(rows), generator=gen).tolist()
                picked.append(order.pop())
            config = trainable[step % len(trainable)]
            opt.zero_grad()
            loss = sum(
                _row_loss(config, rows[i], t_rows[i], pairs, loss_fn, n_outputs) for i in picked
            ) / len(picked)
            _check_finite(loss, step)
            loss.backward()
            _check_grads(module.trainable_parameters(), step)
            opt.step()
            if sched is not None:
                sched.step()
            last = float(loss.detach())
            first = last if step == 0 else first
            if (step + 1) % _REPORT_EVERY == 0 or step + 1 == self.steps:
                ctx.progress(f"heal: step {step + 1}, loss {last:.4g}", step + 1, self.steps)
        return {"first": first, "last": last}

    # -- local: op by op -------------------------------------------------------------------
    def _local(
        self,
        module: ProgramModule,
        teacher: Program,
        rows: list[Row],
        held: list[Row],
        loss_fn: LossFn,
        gen: torch.Generator,
        ctx: PassContext,
    ) -> dict[str, Any]:
        prog = module.program
        params = module.named_program_parameters()
        trainable = {n for n, p in params.items() if p.requires_grad}
        sites = [s for s in _local_sites(prog) if trainable & set(s.weights.values())]
        covered = {w for s in sites for w in s.weights.values()}
        stray = sorted(trainable - covered)
        if stray:
            raise PassError(
                f"heal{{scope=local}}: {len(stray)} trainable weight(s) are read by no "
                f"lowrank_linear or moe_ffn of the top graph, e.g. @{stray[0]}",
                hint="use scope=global (stitching layers, hypernetworks, ops inside "
                "sub-graphs train end to end), or narrow train= to the factors and experts",
            )
        xs = [s.node.args[0].name for s in sites]  # type: ignore[union-attr]
        grab = prog.extract(prog.input_names, list(dict.fromkeys(xs)), name="heal_inputs")
        unique = list(dict.fromkeys(xs))
        x_rows = _stack_rows(grab, rows, unique)
        x_held = _stack_rows(grab, held, unique)
        linears = {s.layer: s for s in find_linears(teacher) if s.factors is None}
        out: dict[str, Any] = {"sites": len(sites), "before": 0.0, "after": 0.0}
        for k, site in enumerate(sites):
            name = site.node.args[0].name  # type: ignore[union-attr]
            X, Xh = x_rows[name], x_held[name]
            with torch.no_grad():
                target = site.target(params, teacher, linears)
                T, Th = target(X), target(Xh) if Xh.numel() else Xh
            mine = [params[w] for w in site.weights.values() if w in trainable]
            opt = torch.optim.Adam(mine, lr=self.lr)
            per_step = max(1, self.batch * max(1, X.shape[0] // max(1, len(rows))))

            def loss_at(x: torch.Tensor, t: torch.Tensor, site: _Site = site) -> torch.Tensor:
                y = site.call(params, x)
                return loss_fn(y, t) + site.aux(params, x)

            with torch.no_grad():
                out["before"] += float(loss_at(Xh, Th)) if Xh.numel() else 0.0
            for _ in range(self.steps):
                idx = torch.randint(0, X.shape[0], (min(per_step, X.shape[0]),), generator=gen)
                opt.zero_grad()
                loss = loss_at(X[idx], T[idx])
                _check_finite(loss, _, site.node.name)
                loss.backward()
                _check_grads({w: params[w] for w in site.weights.values() if w in trainable}, _)
                opt.step()
            with torch.no_grad():
                out["after"] += float(loss_at(Xh, Th)) if Xh.numel() else 0.0
            ctx.progress(f"heal: {site.node.name} done", k + 1, len(sites))
        return out


# ---------------------------------------------------------------------------------------
# teacher, trainable weights, data


def _teacher(program: Program, ctx: PassContext) -> tuple[Program, str]:
    given = ctx.programs.get("teacher")
    if given is not None:
        return given, "programs['teacher']"
    orig = ctx.original
    if orig is None or orig.version == program.version:
        raise PassError(
            "heal: no teacher: no approximate pass changed the program before heal in this "
            "pipeline, and PassContext.programs has no 'teacher'",
            hint="run heal after the transform in one pipeline (lowrank{ratio=0.5},heal), or "
            "give the program to match as PassContext(programs={'teacher': original})",
        )
    return orig, "original"


def _teacher_inputs(program: Program, teacher: Program) -> list[int]:
    """Positions in ``program``'s inputs of the teacher's inputs (matched by name)."""
    names = program.input_names
    missing = [n for n in teacher.input_names if n not in names]
    if missing:
        raise PassError(
            f"heal: the teacher {teacher.name!r} takes inputs {missing} that program "
            f"{program.name!r} does not (its inputs: {names})",
            hint="the teacher must be the program before the transforms, with the same inputs",
        )
    return [names.index(n) for n in teacher.input_names]


def _trainable(program: Program, known: list[Program], train: str) -> list[str]:
    """The parameters ``train`` selects; ``new``: those of none of the ``known`` programs."""
    params = {n: t for n, t in program.named_parameters().items() if t.is_floating_point()}
    if train == "all":
        names = list(params)
    elif train == "new":
        theirs = _Weights(known)
        names = [n for n, t in params.items() if not theirs.has(n, t)]
    else:
        names = [n for n in params if matches(n, train)]
    if not names:
        what = {"new": "no weight the transforms created", "all": "no float parameter"}.get(
            train, f"no float parameter matches {train!r}"
        )
        raise PassError(
            f"heal: nothing to train in program {program.name!r}: {what}",
            hint="heal trains what an approximate pass created (lowrank, experts, stitch, "
            "hyper before it), or give train=all / train=GLOB naming parameters",
        )
    return names


class _Weights:
    """The weights of some programs, to ask whether a tensor is one of them: by name and
    shape, by identity, or (a copy under another name, as ``stitch`` makes) by value."""

    def __init__(self, programs: list[Program]):
        self.by_name: dict[str, list[torch.Tensor]] = {}
        self.by_shape: dict[tuple[Any, ...], list[torch.Tensor]] = {}
        for p in programs:
            for n, t in p.weights.items():
                self.by_name.setdefault(n, []).append(t)
                self.by_shape.setdefault((tuple(t.shape), t.dtype), []).append(t)

    def has(self, name: str, value: torch.Tensor) -> bool:
        if any(t.shape == value.shape for t in self.by_name.get(name, [])):
            return True
        same = self.by_shape.get((tuple(value.shape), value.dtype), [])
        return any(t is value for t in same) or any(torch.equal(t, value) for t in same)


def split_holdout(
    calibration: Sequence[Row], holdout: float, seed: int
) -> tuple[list[Row], list[Row]]:
    """(training, held-out) calibration tuples as ``heal{holdout,seed}`` splits them: a
    seeded choice of round(holdout·n) tuples (at least 1 when holdout > 0, at most n − 1)
    is held out; both keep the calibration order."""
    rows = [tuple(r) for r in calibration]
    need = 2 if holdout > 0 else 1
    if len(rows) < need:
        raise PassError(
            f"heal: {len(rows)} calibration input(s); it needs at least {need} (one to train "
            "on" + (", one held out)" if need == 2 else ")"),
            hint="give calibration tuples of the program's inputs (PassContext("
            "calibration_inputs=...) or `splice opt --calib`), or holdout=0",
        )
    n_held = min(len(rows) - 1, max(1, round(holdout * len(rows)))) if holdout > 0 else 0
    perm = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:n_held])
    return [rows[i] for i in sorted(perm[n_held:])], [rows[i] for i in held]


def _configs(program: Program, module: ProgramModule, names: set[str]) -> list[_Runner]:
    """How to run each configuration: the module itself, or for a ``stitch`` program one
    module per configuration over its static program (:func:`~splice.passes.stitch.
    select_config`) sharing ``module``'s parameters, with the ``config`` input dropped.
    (Autograd through ``cond`` re-traces both branches on every call: far too slow.)"""
    info = program.attrs.get("stitch")
    if not info or "config" not in program.input_names or not info.get("configs"):
        return [_Runner(module, None)]
    pos = program.input_names.index("config")
    params = module.named_program_parameters()
    return [
        _Runner(ProgramModule(select_config(program, c), trainable=names, shared=params), pos)
        for c in range(len(info["configs"]))
    ]


@dataclass
class _Runner:
    """A module to run and the input position it does not take (``config``), if any."""

    module: ProgramModule
    drop: int | None

    def run(self, row: Row) -> list[Any]:
        values = [v for i, v in enumerate(row) if i != self.drop]
        return self.module.run(*values)


def _output_pairs(program: Program, teacher: Program) -> list[tuple[int, int]]:
    """(student output, teacher output) positions compared: shared names, else positions."""
    s, t = program.output_names, teacher.output_names
    pairs = [(i, t.index(n)) for i, n in enumerate(s) if n in t]
    if not pairs and len(s) == len(t):
        pairs = list(zip(range(len(s)), range(len(t))))
    if not pairs:
        raise PassError(
            f"heal: program {program.name!r} (outputs {s}) and its teacher {teacher.name!r} "
            f"(outputs {t}) share no output",
            hint="the teacher must compute the same outputs as the program",
        )
    return pairs


def _row_loss(
    runner: _Runner,
    row: Row,
    t_out: list[Any],
    pairs: list[tuple[int, int]],
    loss_fn: LossFn,
    n_outputs: int | None = None,
) -> torch.Tensor:
    """The sum of the losses of the first ``n_outputs`` pairs (the outputs; all when None)
    plus the mean of the losses of the rest (matched intermediate values)."""
    outs = runner.run(row)
    n = len(pairs) if n_outputs is None else n_outputs
    terms = [
        loss_fn(outs[i], t_out[j])
        for i, j in pairs[:n]
        if torch.is_tensor(outs[i]) and outs[i].is_floating_point()
    ]
    if not terms:
        raise PassError(
            "heal: the program has no floating-point output to compare with its teacher's"
        )
    total = sum(terms[1:], terms[0])
    extra = [loss_fn(outs[i], t_out[j]) for i, j in pairs[n:]]
    return total + sum(extra) / len(extra) if extra else total


def _output_values(program: Program) -> list[str]:
    """The names of the nodes whose values are ``program``'s outputs, in output order."""
    leaves = torch.utils._pytree.tree_leaves(program.graph.output_node().args[0])
    names = [v.name for v in leaves if isinstance(v, fx.Node)]
    if len(names) != len(leaves) or len(names) != len(program.output_names):
        raise PassError(
            f"heal: match= needs every output of program {program.name!r} to be a computed "
            "value (one of them is a constant or a nested structure)",
            hint="drop match=",
        )
    return names


def _matched_values(program: Program, teacher: Program, match: str, row: Row) -> list[str]:
    """The value names ``match`` selects that both programs compute with one shape and
    float dtype on ``row``, in the program's order."""
    t_nodes = {n.name for n in teacher.graph.nodes if n.op == "call_function"}
    cand = [
        n.name
        for n in program.graph.nodes
        if n.op == "call_function" and n.name in t_nodes and matches(n.name, match)
    ]
    found: list[str] = []
    if cand:
        s_vals = program.extract(program.input_names, cand).run(*row)
        t_row = [row[program.input_names.index(n)] for n in teacher.input_names]
        t_vals = teacher.extract(teacher.input_names, cand).run(*t_row)
        found = [
            n
            for n, s, t in zip(cand, s_vals, t_vals)
            if torch.is_tensor(s) and torch.is_tensor(t) and s.is_floating_point()
            and s.shape == t.shape and s.dtype == t.dtype
        ]  # fmt: skip
    if not found:
        raise PassError(
            f"heal: match={match!r} selects no value that program {program.name!r} and its "
            "teacher both compute (same node name, shape and float dtype)",
            hint="name values the transform kept, e.g. match=layer_norm* for a BERT's "
            "hidden states (`splice opt IN` prints the IR with its value names)",
        )
    return found


def _with_values(
    program: Program, teacher: Program, pairs: list[tuple[int, int]], matched: list[str]
) -> tuple[Program, Program, list[tuple[int, int]]]:
    """``program`` and ``teacher`` computing their outputs then the ``matched`` values, and
    the compared pairs: ``pairs`` then each matched value with the teacher's."""
    s_out, t_out = _output_values(program), _output_values(teacher)
    s = program.extract(program.input_names, [*s_out, *matched], name=program.name)
    t = teacher.extract(teacher.input_names, [*t_out, *matched], name=teacher.name)
    extra = [(len(s_out) + k, len(t_out) + k) for k in range(len(matched))]
    return s, t, [*pairs, *extra]


def _cache_bytes(cache_mb: int) -> int:
    """``cache_mb`` in bytes; -1: a quarter of physical memory (0 where unknown)."""
    if cache_mb >= 0:
        return cache_mb << 20
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 0


class TeacherValues:
    """The teacher's values on each training row, computed on first use and kept while the
    kept values fit in ``budget`` bytes; other rows are recomputed on every use."""

    def __init__(self, teacher: Program, index: list[int], rows: list[Row], budget: int):
        self.teacher, self.index, self.rows, self.budget = teacher, index, rows, budget
        self.kept: dict[int, list[Any]] = {}
        self.used = 0
        self.recomputed = 0

    def __getitem__(self, i: int) -> list[Any]:
        got = self.kept.get(i)
        if got is not None:
            return got
        with torch.no_grad():
            got = self.teacher.run(*[self.rows[i][j] for j in self.index])
        size = sum(t.numel() * t.element_size() for t in got if isinstance(t, torch.Tensor))
        if self.used + size <= self.budget:
            self.kept[i] = got
            self.used += size
        else:
            self.recomputed += 1
        return got

    def summary(self) -> dict[str, int]:
        """Rows kept, the MiB they hold, and teacher runs repeated for rows not kept."""
        return {"rows_kept": len(self.kept), "mib": self.used >> 20, "recomputed": self.recomputed}


def _end_to_end(
    rows: list[Row],
    t_rows: list[list[Any]],
    pairs: list[tuple[int, int]],
    configs: list[_Runner],
    loss_fn: LossFn,
) -> float | None:
    """The mean loss over ``rows`` and every configuration (None without rows)."""
    if not rows:
        return None
    total = [
        float(_row_loss(c, r, t, pairs, loss_fn)) for c in configs for r, t in zip(rows, t_rows)
    ]
    return sum(total) / len(total)


def _stack_rows(grab: Program, rows: list[Row], names: list[str]) -> dict[str, torch.Tensor]:
    """Each value ``names`` computes over ``rows``, flattened to [N, features] and stacked."""
    got: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with torch.no_grad():
        for r in rows:
            for n, v in zip(names, grab.run(*r)):
                got[n].append(v.detach().reshape(-1, v.shape[-1]))
    return {n: torch.cat(v) if v else torch.empty(0, 0) for n, v in got.items()}


# ---------------------------------------------------------------------------------------
# local sites


@dataclass
class _Site:
    """One op trained locally: its node, the weights it reads by schema argument, and how
    to call it (``call``), its target (``target``) and an auxiliary loss (``aux``)."""

    node: fx.Node
    args: dict[str, Any]
    weights: dict[str, str]

    def _value(self, params: dict[str, torch.nn.Parameter], arg: str, x: torch.Tensor) -> Any:
        if arg == "x":
            return x
        if arg in self.weights:
            return params[self.weights[arg]]
        return self.args[arg]

    def call(
        self, params: dict[str, torch.nn.Parameter], x: torch.Tensor, **override: Any
    ) -> torch.Tensor:
        vals = {a: override[a] if a in override else self._value(params, a, x) for a in self.args}
        return self.node.target(*vals.values())  # type: ignore[operator]

    def is_moe(self) -> bool:
        return op_def(self.node.target) is moe_ffn

    def target(
        self,
        params: dict[str, torch.nn.Parameter],
        teacher: Program,
        linears: dict[str, LinearSite],
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The op's local target: the dense FFN (moe_ffn) or the teacher's Linear."""
        if self.is_moe():
            E = int(params[self.weights["router_w"]].shape[0])
            dense = {"top_k": E, "top_p": 0.0, "scale": "none", "weighted": False}
            frozen = {a: params[w].detach().clone() for a, w in self.weights.items()}
            return lambda x: self.call(params, x, **frozen, **dense)
        W, b = self._dense(params, teacher, linears)
        return lambda x: F.linear(x, W, b)

    def _dense(
        self,
        params: dict[str, torch.nn.Parameter],
        teacher: Program,
        linears: dict[str, LinearSite],
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        layer = self.weights.get("A", "").removesuffix(".lowrank_A")
        A, B = params[self.weights["A"]], params[self.weights["B"]]
        m, n = A.shape[0], B.shape[1]
        site = linears.get(layer)
        W = None
        if site is not None:
            W = teacher.get_weight(site.weight)
            W = W.T if site.transposed else W
        if W is None or W.shape != (m, n):
            raise PassError(
                f"heal{{scope=local}}: the teacher has no dense Linear of layer {layer!r} "
                f"({m}x{n}) for %{self.node.name}",
                hint="scope=local fits each factored Linear to the teacher's Linear of the "
                "same layer; use scope=global when the teacher is not the dense program",
            )
        bias = self.weights.get("bias")
        return W.detach(), None if bias is None else params[bias].detach().clone()

    def aux(self, params: dict[str, torch.nn.Parameter], x: torch.Tensor) -> torch.Tensor:
        """The router's loss for a ``moe_ffn`` whose router trains (0 otherwise)."""
        rw = params[self.weights["router_w"]] if self.is_moe() else None
        if rw is None or not rw.requires_grad or x.numel() == 0:
            return x.new_zeros(())
        E = rw.shape[0]
        with torch.no_grad():
            share = []
            for e in range(E):
                pick = torch.full((E,), -1e4, dtype=x.dtype)
                pick[e] = 0.0
                y = self.call(
                    params, x, router_w=torch.zeros_like(rw), router_b=pick, b_out=None,
                    top_k=1, top_p=0.0, scale="none", weighted=False,
                )  # fmt: skip
                share.append(torch.linalg.vector_norm(y, dim=-1))
            m = torch.stack(share, -1)
            t = m / m.amax(-1, keepdim=True).clamp_min(1e-12)
        rb = self.weights.get("router_b")
        xn = x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)
        xn = xn if self.args.get("router_norm", True) else x
        logits = F.linear(xn, rw, None if rb is None else params[rb])
        return F.binary_cross_entropy_with_logits(logits, t)


def _local_sites(program: Program) -> list[_Site]:
    sites = []
    for n in program.graph.nodes:
        od = op_def(n.target) if n.op == "call_function" else None
        if od not in (lowrank_linear, moe_ffn):
            continue
        bound = od.bind(*n.args, **n.kwargs)
        args = {p.name: getattr(bound, p.name) for p in od.params}
        weights = {
            a: v.target
            for a, v in args.items()
            if isinstance(v, fx.Node) and v.op == "get_attr" and a != "x"
        }
        if not isinstance(args["x"], fx.Node) or any(
            isinstance(v, fx.Node) and a != "x" and a not in weights for a, v in args.items()
        ):
            continue
        sites.append(_Site(n, args, weights))
    return sites


def _check_finite(loss: torch.Tensor, step: int, where: str = "") -> None:
    """Raise before a non-finite loss poisons the weights (nothing is written back)."""
    if not torch.isfinite(loss.detach()):
        at = f" of %{where}" if where else ""
        raise PassError(
            f"heal: the training loss{at} became {float(loss.detach())} at step {step + 1}",
            hint="lower lr, or heal a program whose outputs are finite on the calibration "
            "inputs; the program is unchanged",
        )


def _check_grads(params: dict[str, torch.nn.Parameter], step: int) -> None:
    """Raise before a non-finite gradient poisons the weights (a finite loss can have one:
    activations past float32's range in the backward of a badly scaled layer)."""
    grads = [(n, p.grad) for n, p in params.items() if p.grad is not None]
    if not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all()):
        return
    bad = [n for n, g in grads if not torch.isfinite(g).all()]
    big = max(params.items(), key=lambda kv: float(kv[1].detach().abs().max()))
    raise PassError(
        f"heal: the gradient of {len(bad)} weight(s) became non-finite at step {step + 1}, "
        f"e.g. @{bad[0]} (the largest trainable weight: @{big[0]}, "
        f"max |w| {float(big[1].detach().abs().max()):.3g})",
        hint="the program's activations overflow float32 in the backward: rescale the "
        "weights heal starts from (e.g. better-conditioned stitching layers), or lower lr; "
        "the program is unchanged",
    )


# ---------------------------------------------------------------------------------------
# losses


def _mse(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(s.float(), t.float())


def _cosine(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return (1 - F.cosine_similarity(s.float(), t.float(), dim=-1, eps=1e-8)).mean()


def _kl(s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    ls = F.log_softmax(s.float().reshape(-1, s.shape[-1]), -1)
    lt = F.log_softmax(t.float().reshape(-1, t.shape[-1]), -1)
    return F.kl_div(ls, lt, log_target=True, reduction="batchmean")


_LOSSES: dict[str, LossFn] = {"mse": _mse, "cosine": _cosine, "kl": _kl}


__all__ = ["Heal", "split_holdout"]
