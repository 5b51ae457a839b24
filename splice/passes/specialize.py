"""``specialize``: fold a hypernetwork for a fixed input back into constant weights.

A program from :mod:`~splice.passes.hyper` computes its target weights at run time as
θ = θ0 + Δθ(E(cond)). ``specialize{cond=[γ1,…,γd]}`` evaluates that hypernetwork once, for
this γ, and stores the results as parameters under the targets' original names and shapes;
the input ``cond``, the hypernetwork's nodes and its weights (``{prefix}.net.*``,
``{prefix}.chunk_emb``, ``{prefix}.theta0``) are removed. The deployed program carries no
hypernetwork: same graph as the original around the targets, new weight values — so it
composes with ``lowrank`` (which factors the restored weights) and ``splice.compile``.

For a program made with ``per_sample=true`` the one γ is given to every sample: the weights
are restored under their names and shapes and broadcast to the batch (``expand``) where the
per-sample forms read them; the numbers equal the conditioned program fed γ for each sample.

``specialize{config=i}`` does the same for a program made by :mod:`~splice.passes.stitch`:
it decides every ``cond(config == k)`` for ``config = i``, inlines the chosen route and
drops the input ``config`` (:func:`splice.passes.stitch.select_config`), so one stitch
configuration deploys as a static program with only the weights that route reads.

Semantics: ``exact`` — the result equals the conditioned program run with ``cond = γ``
(NumericCheck runs the program before the pass with that value, through
``PassResult.bound_inputs``). ``prefix`` picks the hypernetwork when a program has several.
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
from splice.passes.hyper import ATTR, generated_weights, hyper_info, value_nodes
from splice.passes.registry import register_pass

aten = torch.ops.aten


@register_pass
@dataclass(frozen=True)
class Specialize(Pass):
    """Evaluate a hypernetwork for a fixed cond and fold its weights into constants."""

    name = "specialize"
    semantics = "exact"
    summary = (
        "fold a hyper program's hypernetwork for a fixed cond into constant weights, or "
        "pick one configuration of a stitched program"
    )

    cond: tuple[float, ...] = ()
    prefix: str | None = None
    config: int | None = None

    def validate(self) -> None:
        if not self.cond and self.config is None:
            raise PipelineError(
                "specialize needs cond=[...] (the hypernetwork input to fold) or config=i "
                "(the stitch configuration to keep)",
                hint="e.g. specialize{cond=[0.25,1.0]} or specialize{config=3}",
            )
        if self.cond and self.config is not None:
            raise PipelineError("specialize takes cond=[...] or config=i, not both")

    def run(self, program: Program, ctx: PassContext) -> PassResult:
        if self.config is not None:
            from splice.passes.stitch import select_config

            out = select_config(program, self.config)
            stats = {"config": self.config, "weights": len(out.weight_kinds)}
            return PassResult(out, True, stats, bound_inputs={"config": torch.tensor(self.config)})
        prefix, info = hyper_info(program, self.prefix)
        d = int(info["cond_dim"])
        if len(self.cond) != d:
            raise PassError(
                f"specialize: cond has {len(self.cond)} values but hypernetwork {prefix!r} takes "
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
        gamma = torch.tensor(self.cond, dtype=spec.dtype)
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
            "cond": list(self.cond),
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


def specialize(program: Program, cond: Any, *, prefix: str | None = None) -> Program:
    """A copy of ``program`` with its hypernetwork folded for ``cond`` (see the module doc)."""
    vals = [float(v) for v in torch.as_tensor(cond).reshape(-1).tolist()]
    p = Specialize(cond=tuple(vals), prefix=prefix)
    return p.run(program.copy(), PassContext()).program


__all__ = ["Specialize", "specialize"]
