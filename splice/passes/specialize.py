"""``specialize``: bind a program input to a value and fold what it decides.

``specialize{input=NAME,value=[…]}`` fixes input ``NAME`` to ``value`` (reshaped to the
input's shape) and folds (:func:`splice.passes.bind.bind_input`): every value computed from
the input, weights and literals is evaluated once, every ``cond`` whose predicate it decides
is replaced by the branch taken, and the input leaves the program. Two spellings name the
input for the two passes whose programs take one:

* ``specialize{cond=[γ1,…,γd]}`` — the input of a :mod:`~splice.passes.hyper` program (or
  ``input=`` naming it): its hypernetwork θ = θ0 + Δθ(E(γ)) is evaluated for this γ and the
  results are stored as parameters under the targets' original names and shapes; the input,
  the hypernetwork's nodes and its weights (``{prefix}.net.*``, ``{prefix}.chunk_emb``,
  ``{prefix}.theta0``) are removed. The deployed program carries no hypernetwork: same graph
  as the original around the targets, new weight values — so it composes with ``lowrank``
  (which factors the restored weights) and ``splice.compile``. For a program made with
  ``per_sample=true`` the one γ is given to every sample: the weights are restored under
  their names and shapes and broadcast to the batch (``expand``) where the per-sample forms
  read them. ``prefix`` picks the hypernetwork when a program has several.
* ``specialize{config=i}`` — ``input=config,value=[i]`` on a :mod:`~splice.passes.stitch`
  program (:func:`splice.passes.stitch.select_config`): its ``cond(config == k)`` chain is
  decided and the chosen route inlined, with only the weights that route reads.

Any other input is folded generically: values it decides that run-time code still reads
become ``constant`` weights ``specialize.<value>``.

Semantics: ``exact`` — the result equals the program before it run with that input value
(NumericCheck feeds the value to the program before the pass, through
``PassResult.bound_inputs``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from splice.errors import PassError, PipelineError
from splice.ir import meta as M
from splice.ir.program import Program
from splice.ir.rewriter import Rewriter
from splice.passes.base import Pass, PassContext, PassResult
from splice.passes.bind import bind_input
from splice.passes.hyper import ATTR, generated_weights, hyper_info, value_nodes
from splice.passes.registry import register_pass
from splice.passes.stitch import select_config

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class Specialize(Pass):
    """Bind an input to a value and fold what it decides (module docstring): ``cond=`` for a
    hyper program's input, ``config=`` for a stitched program's, ``input=,value=`` for any."""

    name = "specialize"
    semantics = "exact"
    summary = (
        "bind a program input to a value and fold what it decides: a hyper program's "
        "hypernetwork (cond=), a stitch configuration (config=), any input (input=,value=)"
    )

    cond: tuple[float, ...] = ()
    prefix: str | None = None
    config: int | None = None
    input: str | None = None
    value: tuple[float, ...] = ()

    def validate(self) -> None:
        given = [k for k, v in (("cond", self.cond), ("value", self.value)) if v]
        if self.config is not None:
            given.append("config")
        if not given:
            raise PipelineError(
                "specialize needs cond=[...] (the hypernetwork input to fold) or config=i "
                "(the stitch configuration to keep)",
                hint="e.g. specialize{cond=[0.25,1.0]} or specialize{config=3}; any other "
                "input: specialize{input=NAME,value=[...]}",
            )
        if given == ["cond", "config"]:
            raise PipelineError("specialize takes cond=[...] or config=i, not both")
        if len(given) > 1:
            raise PipelineError(
                f"specialize takes one of cond=[...], config=i or value=[...], not "
                f"{' and '.join(given)}"
            )
        if self.value and not self.input:
            raise PipelineError(
                "specialize{value=[...]} needs input=NAME, the input to bind",
                hint="e.g. specialize{input=mode,value=[1]}",
            )
        if self.config is not None and self.input not in (None, "config"):
            raise PipelineError(
                f"specialize{{config=i}} binds the input 'config', not {self.input!r}",
                hint=f"write specialize{{input={self.input},value=[i]}}",
            )

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if self.config is not None:
            out = select_config(program, self.config)
            stats = {"config": self.config, "weights": len(out.weight_kinds)}
            return PassResult(out, True, stats, bound_inputs={"config": torch.tensor(self.config)})
        if self.value:
            prefix = _hyper_prefix_of_input(program, self.input, self.prefix)
            if prefix is None:
                return self._bind(program)
            return self._fold_hyper(program, prefix, self.value)
        prefix = self.prefix
        if self.input is not None:
            prefix = _hyper_prefix_of_input(program, self.input, self.prefix)
            if prefix is None:
                raise PassError(
                    f"specialize: no hypernetwork reads input {self.input!r}",
                    hint="cond=[...] folds a hyper program; bind other inputs with value=[...]",
                )
        return self._fold_hyper(program, prefix, self.cond)

    def _bind(self, program: Program) -> PassResult:
        """Generic: bind ``input`` to ``value`` and fold (:func:`bind_input`)."""
        r = bind_input(program, self.input, list(self.value), pass_name=self.name)
        stats = {
            "input": self.input,
            "decided": r.decided,
            "folded": r.folded,
            "constants": r.constants,
            "weights": len(r.program.weight_kinds),
        }
        return PassResult(r.program, True, stats, bound_inputs={self.input: r.value})

    def _fold_hyper(
        self, program: Program, prefix: str | None, cond: tuple[float, ...]
    ) -> PassResult:
        """A hyper program: the hypernetwork for ``cond``, restored under the targets' names."""
        prefix, info = hyper_info(program, prefix)
        d = int(info["cond_dim"])
        if len(cond) != d:
            raise PassError(
                f"specialize: cond has {len(cond)} values but hypernetwork {prefix!r} takes "
                f"cond_dim={d}",
                hint=f"give {d} values: specialize{{cond=[{','.join(['0.5'] * d)}]}}",
            )
        cond_node = next((n for n in program.input_nodes if n.name == info["input"]), None)
        if cond_node is None:
            raise PassError(
                f"specialize: program {program.name!r} has no input %{info['input']} for "
                f"hypernetwork {prefix!r}"
            )
        spec = M.tensor_spec(cond_node)
        gamma = torch.tensor(cond, dtype=spec.dtype)
        full = gamma.expand(*spec.shape).contiguous()  # [d], or [B, d] for per-sample
        values = value_nodes(program, prefix)
        region = self._region(program, values, cond_node)
        region_weights = {n.target for n in region if n.op == "get_attr"}
        with torch.no_grad():
            generated = generated_weights(program, full, prefix)

        rw = Rewriter(program, self.name)
        restored = []
        for t in info["targets"]:
            name = t["name"]
            w = generated[name]
            if info["per_sample"]:
                w = w[0]
            if program.has_weight(name):
                raise PassError(
                    f"specialize: weight @{name} exists already; cannot restore target {name}",
                    hint="rename that weight first",
                )
            node = values[name]
            with rw.at(node):
                g = rw.add_weight(name, w.detach().clone().contiguous())
                new = g
                if info["per_sample"]:
                    new = rw.call(aten.expand.default, (g, list(M.tensor_spec(node).shape)))
            rw.replace_all_uses(node, new)
            restored.append({"name": name, "shape": list(w.shape)})
        removed = 0
        for node in reversed(list(program.graph.nodes)):
            if node in region and not node.users and node.op in ("call_function", "get_attr"):
                rw.erase(node)
                removed += node.op == "call_function"
        if cond_node.users:  # pragma: no cover - _region guarantees it
            raise PassError(f"specialize: input %{cond_node.name} is still used")
        program.remove_input(cond_node.name)
        # only the hypernetwork's weights leave; unread weights of the model stay. They are
        # the ones hyper recorded and those its nodes read now (a later pass, e.g. lowrank,
        # may have replaced the recorded ones)
        read = {n.target for n in program.graph.find_nodes(op="get_attr")}
        own = [*info["hypernet"], info["theta0"], *sorted(region_weights)]
        dropped = [w for w in dict.fromkeys(own) if program.has_weight(w) and w not in read]
        for w in dropped:
            program.remove_weight(w)
        nets = dict(program.attrs.get(ATTR, {}))
        nets.pop(prefix)
        if nets:
            program.attrs[ATTR] = nets
        else:
            program.attrs.pop(ATTR, None)
        program.bump_version()
        stats: dict[str, Any] = {
            "changed": True,
            "prefix": prefix,
            "cond": list(cond),
            "restored": restored,
            "nodes_removed": removed,
            "weights_dropped": dropped,
        }
        return PassResult(program, True, stats, bound_inputs={cond_node.name: full})

    def _region(self, program: Program, values: dict[str, fx.Node], cond: fx.Node) -> set[fx.Node]:
        """The hypernetwork's nodes; it must depend on ``cond`` and weights only."""
        region: set[fx.Node] = set()
        stack = list(values.values())
        while stack:
            n = stack.pop()
            if n in region:
                continue
            if n.op == "placeholder" and n is not cond:
                raise PassError(
                    f"specialize: the hypernetwork reads program input %{n.name}",
                    hint="only the hyper input may feed the hypernetwork",
                )
            region.add(n)
            stack.extend(n.all_input_nodes)
        users = [u for u in cond.users if u not in region]
        if users:
            raise PassError(
                f"specialize: input %{cond.name} is also read outside the hypernetwork, by "
                + ", ".join(f"%{u.name}" for u in users),
                hint="specialize folds only the hypernetwork; the other reads need cond at run time",
            )
        return region


def _hyper_prefix_of_input(program: Program, name: str | None, prefix: str | None) -> str | None:
    """The hypernetwork (its prefix) that reads input ``name``, if one does."""
    nets = program.attrs.get(ATTR, {})
    found = [p for p, info in nets.items() if info.get("input") == name]
    if prefix is not None:
        return prefix if prefix in found else None
    return found[0] if found else None


def specialize(program: Program, cond: Any, *, prefix: str | None = None) -> Program:
    """A copy of ``program`` with its hypernetwork folded for ``cond`` (see the module doc)."""
    vals = [float(v) for v in torch.as_tensor(cond).reshape(-1).tolist()]
    p = Specialize(cond=tuple(vals), prefix=prefix)
    return p.run(program.copy(), PassContext()).program


__all__ = ["Specialize", "specialize"]
