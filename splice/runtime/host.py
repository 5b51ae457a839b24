"""The host program: the control flow between the compiled parts of a split program.

The ``branches`` pass leaves a Program in *split form* (:mod:`splice.passes.branches`): host
graphs of part calls (``invoke_subgraph``), ``cond`` nodes and tuple indexing. This module
turns that into a small JSON program, ``host.json`` in an artifact, and runs it. Nothing
in it is Python code: a host program is data, so an artifact never unpickles anything.

Format ``splice-host/1``::

    {"format": "splice-host/1",
     "main": BLOCK}
    BLOCK = {"params": [value...], "body": [STEP...], "results": [value...]}
    STEP  = {"op": "call", "part": "part_0", "args": [value...], "results": [value...]}
          | {"op": "const", "weight": "branches.const_0", "result": value}
          | {"op": "eq", "arg": value, "value": 3, "result": value}   (integer scalar == k)
          | {"op": "branch", "pred": value, "site": "model.py:42",
             "args": [value...], "then": BLOCK, "else": BLOCK, "results": [value...]}
          | {"op": "signature", "args": [value...],
             "cases": [{"inputs": [{"shape": [...], "dtype": "f32"}...], "block": BLOCK}...],
             "results": [value...]}

Values are names (``v12``) in one flat namespace; a branch binds its chosen block's
``params`` to its ``args`` and its ``results`` to the block's results. Weights are not
values: each part lists the weights it reads (``parts`` below), bound once at load time.
``site`` is the model source line whose condition the branch decides; a run records
``(site, taken)`` per branch, the *branch trace*, which tests compare with eager PyTorch's.
A ``signature`` step (the first and only step of ``main`` for a
:class:`~splice.ir.signatures.SignatureSet`) runs the case whose input shapes and dtypes its
arguments have, and records the case's index as the run's ``signature``; arguments that
match no case are an error.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from splice.errors import ArtifactError
from splice.ir import meta as M
from splice.ir.host_steps import COND, INVOKE, is_host_compare
from splice.ir.program import Program, build_graph_module, get_attr_path, weight_for_input

HOST_FORMAT = "splice-host/1"


@dataclass
class PartInfo:
    """One part of a split program: its graph and what its placeholders are bound to."""

    name: str
    graph_module: fx.GraphModule
    n_values: int  # leading placeholders are run-time values, the rest weights
    weights: list[str]

    def program(self, weights: dict[str, tuple[torch.Tensor, str]]) -> Program:
        """The part as a branch-free Program (weights as get_attr nodes)."""
        src = self.graph_module.graph
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        phs = [n for n in src.nodes if n.op == "placeholder"]
        for i, ph in enumerate(phs):
            if i < self.n_values:
                env[ph] = g.node_copy(ph)
            else:
                env[ph] = weight_for_input(g, self.weights[i - self.n_values], ph)
        for n in src.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                g.output(tuple(env[a] for a in n.args[0]))
                continue
            env[n] = g.node_copy(n, env.__getitem__)
        ws = {w: weights[w] for w in dict.fromkeys(self.weights)}
        gm = build_graph_module(g, ws, {}, class_name=f"Part_{self.name}")
        n_out = len(next(iter(src.find_nodes(op="output"))).args[0])
        return Program(
            gm,
            output_names=[f"out{i}" for i in range(n_out)],
            weight_kinds={w: k for w, (_, k) in ws.items()},
            name=self.name,
        )


@dataclass
class _Ctx:
    parts: dict[str, PartInfo] = field(default_factory=dict)
    counter: int = 0

    def fresh(self) -> str:
        self.counter += 1
        return f"v{self.counter}"


def build_host(program: Program) -> tuple[dict[str, Any], dict[str, PartInfo]]:
    """The host program (JSON-able dict) and the parts of a split ``program``."""
    ctx = _Ctx()
    main = _block(program.graph_module, None, ctx, list(program.input_names))
    return {"format": HOST_FORMAT, "main": main}, ctx.parts


# a host value is ("value", name) or ("weight", weight name)
_Val = tuple[str, str]


def _block(
    gm: fx.GraphModule, binds: list[_Val] | None, ctx: _Ctx, names: list[str] | None = None
) -> dict[str, Any]:
    env: dict[fx.Node, Any] = {}
    params: list[str] = []
    body: list[dict[str, Any]] = []
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, ph in enumerate(phs):
        if binds is None:
            name = names[i] if names else ph.name
            env[ph] = ("value", name)
            params.append(name)
        elif binds[i][0] == "weight":
            env[ph] = binds[i]
        else:
            env[ph] = ("value", ctx.fresh())
            params.append(env[ph][1])

    def value(v: _Val) -> str:
        if v[0] == "value":
            return v[1]
        name = ctx.fresh()
        body.append({"op": "const", "weight": v[1], "result": name})
        return name

    for n in gm.graph.nodes:
        if n.op == "placeholder":
            continue
        if n.op == "get_attr":
            child = get_attr_path(gm, n.target)
            if not isinstance(child, fx.GraphModule):
                env[n] = ("weight", n.target)
            continue
        if n.op == "output":
            results = [value(env[a]) for a in n.args[0]]
            return {"params": params, "body": body, "results": results}
        if n.target is INVOKE:
            part_gm = get_attr_path(gm, n.args[0].target)
            name = n.args[1]
            ops = [env[a] for a in n.args[2:]]
            n_values = sum(1 for o in ops if o[0] == "value")
            if any(o[0] == "value" for o in ops[n_values:]):
                raise ArtifactError(f"part {name}: weight operands must follow value operands")
            weights = [o[1] for o in ops[n_values:]]
            known = ctx.parts.get(name)
            if known is None:
                ctx.parts[name] = PartInfo(name, part_gm, n_values, weights)
            elif known.weights != weights:
                raise ArtifactError(f"part {name} is called with different weights at two places")
            results = [ctx.fresh() for _ in M.spec(n).items]
            body.append(
                {
                    "op": "call",
                    "part": name,
                    "args": [o[1] for o in ops[:n_values]],
                    "results": results,
                }
            )
            env[n] = [("value", r) for r in results]
            continue
        if n.target is COND:
            pred, t_ref, f_ref, operands = n.args
            binds_ = [env[o] for o in operands]
            blocks = [_block(get_attr_path(gm, ref.target), binds_, ctx) for ref in (t_ref, f_ref)]
            results = [ctx.fresh() for _ in M.spec(n).items]
            body.append(
                {
                    "op": "branch",
                    "pred": value(env[pred]),
                    "site": M.loc(n).source,
                    "args": [b[1] for b in binds_ if b[0] == "value"],
                    "then": blocks[0],
                    "else": blocks[1],
                    "results": results,
                }
            )
            env[n] = [("value", r) for r in results]
            continue
        if n.target is operator.getitem:
            env[n] = env[n.args[0]][n.args[1]]
            continue
        if is_host_compare(n):
            result = ctx.fresh()
            body.append(
                {"op": "eq", "arg": value(env[n.args[0]]), "value": n.args[1], "result": result}
            )
            env[n] = ("value", result)
            continue
        raise ArtifactError(
            f"node %{n.name} ({n.target}) is host code that the host program cannot run",
            hint="host graphs hold only part calls, cond, getitem and scalar compares: run "
            "the branches pass",
        )
    raise ArtifactError("a host graph has no output")


class HostProgram:
    """Runs a host program, calling ``parts[name](*values) -> list of tensors``.

    ``force``: decisions to take instead of the computed ones (the explorer uses it to reach
    every part). After a run, ``trace`` is the list of ``(site, taken)`` of its branches.
    """

    def __init__(
        self,
        host: dict[str, Any],
        parts: dict[str, Callable[..., Sequence[torch.Tensor]]],
        constants: dict[str, torch.Tensor] | None = None,
    ):
        if host.get("format") != HOST_FORMAT:
            raise ArtifactError(f"unknown host program format {host.get('format')!r}")
        self.host = host
        self.parts = parts
        self.constants = constants or {}
        self.trace: list[tuple[str, bool]] = []
        self.steps: list[int] = []  # id() of each branch step in ``trace``
        self.signature: int | None = None
        self._force: list[bool] = []

    def __call__(self, *inputs: torch.Tensor, force: Sequence[bool] = ()) -> list[torch.Tensor]:
        self.trace = []
        self.steps = []
        self.signature = None
        self._force = list(force)
        main = self.host["main"]
        if len(inputs) != len(main["params"]):
            raise ArtifactError(
                f"the host program takes {len(main['params'])} inputs, got {len(inputs)}"
            )
        env = dict(zip(main["params"], inputs))
        return self._run(main, env)

    def _run(self, block: dict[str, Any], env: dict[str, Any]) -> list[Any]:
        for step in block["body"]:
            op = step["op"]
            if op == "call":
                outs = self.parts[step["part"]](*(env[a] for a in step["args"]))
                for r, o in zip(step["results"], outs, strict=True):
                    env[r] = o
            elif op == "const":
                env[step["result"]] = self.constants[step["weight"]]
            elif op == "eq":
                env[step["result"]] = torch.as_tensor(env[step["arg"]] == step["value"])
            elif op == "branch":
                k = len(self.trace)
                taken = self._force[k] if k < len(self._force) else bool(env[step["pred"]])
                self.trace.append((step["site"], taken))
                self.steps.append(id(step))
                self._enter(step["then"] if taken else step["else"], step, env)
            elif op == "signature":
                k = _match_signature(step["cases"], [env[a] for a in step["args"]])
                self.signature = k
                self._enter(step["cases"][k]["block"], step, env)
            else:
                raise ArtifactError(f"unknown host step {op!r}")
        return [env[r] for r in block["results"]]

    def _enter(self, sub: dict[str, Any], step: dict[str, Any], env: dict[str, Any]) -> None:
        """Run block ``sub`` with its params bound to ``step``'s args; bind its results."""
        inner = dict(env)
        inner.update(zip(sub["params"], (env[a] for a in step["args"]), strict=True))
        outs = self._run(sub, inner)
        for r, o in zip(step["results"], outs, strict=True):
            env[r] = o


def validate_host(
    host: Any,
    parts: dict[str, tuple[int | None, int | None]],
    weights: Collection[str],
    n_inputs: int,
    *,
    where: str | None = None,
) -> None:
    """Raise ArtifactError unless ``host`` (a parsed host.json) is a well-formed host program:
    known steps with fields of the right types, every value defined before it is used,
    calls only of ``parts`` (name -> (inputs, outputs), None where unknown) with that many
    arguments and results, constants only of ``weights``, and ``n_inputs`` inputs. Running
    a validated program cannot fail with a KeyError or TypeError."""

    def bad(path: str, what: str) -> ArtifactError:
        return ArtifactError(
            f"host.json: {path} {what}",
            where=where,
            hint="rebuild the artifact; never edit its files",
        )

    def names(v: Any, path: str) -> list[str]:
        if not isinstance(v, list) or not all(isinstance(x, str) and x for x in v):
            raise bad(path, "must be a list of value names")
        return v

    def used(v: Any, path: str, env: set[str]) -> list[str]:
        vs = names(v, path)
        undefined = [x for x in vs if x not in env]
        if undefined:
            raise bad(path, f"uses {undefined[0]!r} before it is defined")
        return vs

    def block(b: Any, path: str, env: set[str], n_params: int, n_results: int | None) -> int:
        if not isinstance(b, dict):
            raise bad(path, "must be an object with params, body and results")
        params = names(b.get("params"), f"{path}.params")
        if len(params) != n_params:
            raise bad(f"{path}.params", f"has {len(params)} values, its caller passes {n_params}")
        env = env | set(params)
        body = b.get("body")
        if not isinstance(body, list):
            raise bad(f"{path}.body", "must be a list of steps")
        for i, st in enumerate(body):
            env |= step(st, f"{path}.body[{i}]", env)
        results = used(b.get("results"), f"{path}.results", env)
        if n_results is not None and len(results) != n_results:
            raise bad(f"{path}.results", f"has {len(results)} values, its caller takes {n_results}")
        return len(results)

    def step(st: Any, path: str, env: set[str]) -> set[str]:
        if not isinstance(st, dict):
            raise bad(path, "must be an object")
        op = st.get("op")
        if op not in ("call", "const", "eq", "branch", "signature"):
            raise bad(f"{path}.op", f"is unknown: {op!r} (call, const, eq, branch, signature)")
        if op == "const":
            if not isinstance(st.get("weight"), str) or st["weight"] not in weights:
                raise bad(
                    f"{path}.weight", f"names no weight of the artifact: {st.get('weight')!r}"
                )
            return set(names([st.get("result")], f"{path}.result"))
        if op == "eq":
            used([st.get("arg")], f"{path}.arg", env)
            value = st.get("value")
            if not isinstance(value, int) or isinstance(value, bool):
                raise bad(f"{path}.value", "must be an integer")
            return set(names([st.get("result")], f"{path}.result"))
        args = used(st.get("args"), f"{path}.args", env)
        results = names(st.get("results"), f"{path}.results")
        if op == "call":
            part = st.get("part")
            if not isinstance(part, str) or part not in parts:
                raise bad(f"{path}.part", f"names no part of the artifact: {part!r}")
            n_in, n_out = parts[part]
            if n_in is not None and len(args) != n_in:
                raise bad(f"{path}.args", f"passes {len(args)} values, part {part} takes {n_in}")
            if n_out is not None and len(results) != n_out:
                raise bad(f"{path}.results", f"takes {len(results)}, part {part} returns {n_out}")
        elif op == "branch":
            used([st.get("pred")], f"{path}.pred", env)
            if not isinstance(st.get("site", ""), (str, type(None))):
                raise bad(f"{path}.site", "must be a string")
            for key in ("then", "else"):
                block(st.get(key), f"{path}.{key}", env, len(args), len(results))
        elif op == "signature":
            cases = st.get("cases")
            if not isinstance(cases, list) or not cases:
                raise bad(f"{path}.cases", "must be a non-empty list")
            for k, case in enumerate(cases):
                cp = f"{path}.cases[{k}]"
                specs = case.get("inputs") if isinstance(case, dict) else None
                if (
                    not isinstance(specs, list)
                    or len(specs) != len(args)
                    or not all(
                        isinstance(i, dict)
                        and isinstance(i.get("shape"), list)
                        and all(isinstance(d, int) for d in i["shape"])
                        and isinstance(i.get("dtype"), str)
                        for i in specs
                    )
                ):
                    raise bad(f"{cp}.inputs", f"must be {len(args)} specs (shape, dtype)")
                block(case.get("block"), f"{cp}.block", env, len(args), len(results))
        return set(results)

    if not isinstance(host, dict) or host.get("format") != HOST_FORMAT:
        got = host.get("format") if isinstance(host, dict) else type(host).__name__
        raise bad("format", f"must be {HOST_FORMAT!r}, got {got!r}")
    block(host.get("main"), "main", set(), n_inputs, None)


def _match_signature(cases: Sequence[dict[str, Any]], args: Sequence[torch.Tensor]) -> int:
    have = [(list(a.shape), M.dtype_name(a.dtype)) for a in args]
    for k, case in enumerate(cases):
        if [(list(i["shape"]), i["dtype"]) for i in case["inputs"]] == have:
            return k
    known = "; ".join(
        "(" + ", ".join(_spec_text(i) for i in case["inputs"]) + ")" for case in cases
    )
    got = "(" + ", ".join(f"{d}{s}" for s, d in have) + ")"
    raise ArtifactError(
        f"inputs {got} match none of the compiled signatures: {known}",
        hint="capture and compile the model with an example of this shape too",
    )


def signature_host(
    hosts: Sequence[tuple[Sequence[M.Spec], dict[str, Any]]],
    members: Sequence[tuple[dict[str, PartInfo], dict[str, Any], dict[str, Any]]],
) -> tuple[dict[str, Any], dict[str, PartInfo], dict[str, Any], dict[str, Any]]:
    """One host program over the host programs of a SignatureSet's members.

    ``hosts``: each member's input specs and host program; ``members``: each member's parts,
    eager parts and part example inputs (all keyed by part name). Member ``k``'s parts are
    renamed ``s<k>_<name>``. Returns the host program and the merged parts, eager parts and
    examples."""
    parts: dict[str, PartInfo] = {}
    eager: dict[str, Any] = {}
    examples: dict[str, Any] = {}
    cases = []
    for k, ((specs, host), (m_parts, m_eager, m_examples)) in enumerate(zip(hosts, members)):

        def new(name: str, k: int = k) -> str:
            return f"s{k}_{name}"

        for name, info in m_parts.items():
            parts[new(name)] = dataclasses.replace(info, name=new(name))
            eager[new(name)] = m_eager[name]
            if name in m_examples:
                examples[new(name)] = m_examples[name]
        cases.append(
            {"inputs": [M.spec_json(s) for s in specs], "block": _rename_parts(host["main"], new)}
        )
    first = hosts[0][1]["main"]
    params = list(first["params"])
    results = [f"r{i}" for i in range(len(first["results"]))]
    step = {"op": "signature", "args": params, "cases": cases, "results": results}
    main = {"params": params, "body": [step], "results": results}
    return {"format": HOST_FORMAT, "main": main}, parts, eager, examples


def _rename_parts(block: dict[str, Any], new: Callable[[str], str]) -> dict[str, Any]:
    body = []
    for s in block["body"]:
        s = dict(s)
        if s["op"] == "call":
            s["part"] = new(s["part"])
        elif s["op"] == "branch":
            s["then"] = _rename_parts(s["then"], new)
            s["else"] = _rename_parts(s["else"], new)
        body.append(s)
    return {**block, "body": body}


def format_host(host: dict[str, Any], parts: Sequence[dict[str, Any]] = ()) -> str:
    """The host program as indented text (``splice show`` on an artifact)."""
    lines = [f"host program ({host.get('format')}), {branch_count(host)} branches"]
    for p in parts:
        ins = ", ".join(_spec_text(s) for s in p.get("inputs", []))
        outs = ", ".join(_spec_text(s) for s in p.get("outputs", []))
        file = p.get("library") or p.get("model", "")  # a TVM library or an ONNX model
        lines.append(f"  part {p['name']}: ({ins}) -> ({outs})  [{file}]")

    def block(b: dict[str, Any], indent: str) -> None:
        for s in b["body"]:
            if s["op"] == "call":
                lines.append(
                    f"{indent}{', '.join(s['results'])} = {s['part']}({', '.join(s['args'])})"
                )
            elif s["op"] == "const":
                lines.append(f"{indent}{s['result']} = @{s['weight']}")
            elif s["op"] == "eq":
                lines.append(f"{indent}{s['result']} = {s['arg']} == {s['value']}")
            elif s["op"] == "signature":
                res = ", ".join(s["results"])
                lines.append(f"{indent}{res} = match shapes of ({', '.join(s['args'])}):")
                for k, case in enumerate(s["cases"]):
                    sub = case["block"]
                    specs = ", ".join(
                        f"{p}: {_spec_text(i)}" for p, i in zip(sub["params"], case["inputs"])
                    )
                    lines.append(f"{indent}  signature {k} ({specs}):")
                    block(sub, indent + "    ")
                    lines.append(f"{indent}    yield {', '.join(sub['results'])}")
            else:
                res = ", ".join(s["results"])
                lines.append(f"{indent}{res} = if {s['pred']}:  # {s.get('site') or '?'}")
                for key in ("then", "else"):
                    sub = s[key]
                    binds = ", ".join(f"{p}={a}" for p, a in zip(sub["params"], s["args"]))
                    lines.append(f"{indent}  {key}({binds}):")
                    block(sub, indent + "    ")
                    lines.append(f"{indent}    yield {', '.join(sub['results'])}")
        return None

    main = host["main"]
    lines.append(f"main({', '.join(main['params'])}):")
    block(main, "  ")
    lines.append(f"  return {', '.join(main['results'])}")
    return "\n".join(lines) + "\n"


def _spec_text(s: dict[str, Any]) -> str:
    return f"{s.get('dtype', '?')}{list(s.get('shape', []))}"


def branch_count(host: dict[str, Any]) -> int:
    """The number of data-dependent branches (over all signatures)."""

    def count(block: dict[str, Any]) -> int:
        n = 0
        for s in block["body"]:
            if s["op"] == "branch":
                n += 1 + count(s["then"]) + count(s["else"])
            elif s["op"] == "signature":
                n += sum(count(c["block"]) for c in s["cases"])
        return n

    return count(host["main"])


def eager_part(
    info: PartInfo, weights: dict[str, torch.Tensor]
) -> Callable[..., list[torch.Tensor]]:
    """A part run by PyTorch (the reference for its compiled version)."""
    ws = [weights[w] for w in info.weights]

    def run(*values: torch.Tensor) -> list[torch.Tensor]:
        with torch.no_grad():
            return list(info.graph_module(*values, *ws))

    return run


def explore_part_inputs(
    host: HostProgram, inputs: Sequence[torch.Tensor], *, max_paths: int = 256
) -> dict[str, tuple[torch.Tensor, ...]]:
    """Run ``host`` on ``inputs``, forcing branches so that every side of every branch step
    runs at least once, and record the first arguments each part receives: its
    predecessors' outputs, the parts' example inputs. One run per branch side not taken
    (linear in the branch steps, not in the paths: sequential branches that rejoin do not
    multiply); ``max_paths`` bounds the runs."""
    seen: dict[str, tuple[torch.Tensor, ...]] = {}
    parts = dict(host.parts)

    def recorder(name: str, fn: Callable[..., Sequence[torch.Tensor]]) -> Callable[..., Any]:
        def call(*args: torch.Tensor) -> Sequence[torch.Tensor]:
            seen.setdefault(name, tuple(a.clone() for a in args))
            return fn(*args)

        return call

    host.parts = {k: recorder(k, v) for k, v in parts.items()}
    try:
        stack: list[list[bool]] = [[]]
        scheduled: set[tuple[int, bool]] = set()  # (branch step, side) reached or queued
        runs = 0
        while stack and runs < max_paths:
            force = stack.pop()
            host(*inputs, force=force)
            runs += 1
            taken = [t for _, t in host.trace]
            scheduled |= set(zip(host.steps, taken))
            for k in range(len(force), len(taken)):
                other = (host.steps[k], not taken[k])
                if other not in scheduled:
                    scheduled.add(other)
                    stack.append([*taken[:k], not taken[k]])
    finally:
        host.parts = parts
    return seen


__all__ = [
    "HOST_FORMAT",
    "HostProgram",
    "PartInfo",
    "branch_count",
    "build_host",
    "eager_part",
    "explore_part_inputs",
    "format_host",
    "signature_host",
]
