"""schedule: the per-stage precision plan (StagePlan) of an annotated graph (an analysis pass)."""
from __future__ import annotations

import logging
import math
import warnings
from typing import Optional, Sequence

import sympy
import torch.fx

from fracpass import meta
from fracpass.errors import PlanError
from fracpass.pass_base import PassBase, PassResult
from fracpass.plan import Plan
from fracpass.quant import FULL_PRECISION
from fracpass.stageplan import BudgetResult, OpStages, StagePlan
from fracpass.switch import AtSteps, Budget

log = logging.getLogger("fracpass.schedule")


class SchedulePass(PassBase):
    """Read every compute op's QSpec into a StagePlan; the graph is not changed::

        conv.meta QSpec(w=(3,4,6,8), a=(3,4,6,8), g=(6,6,8,8))   ->   [[ops]] op = "conv" w = [3, 4, 6, 8] ...

    Checks: a rule that sets bits after an exclude rule matched the same op is a conflict
    (PlanError naming the ops); an op whose bits go down between stages, or whose last stage is not
    its highest precision, is warned about. A Budget switch is resolved into AtSteps boundaries
    from ``stage_costs`` (per-sample BitOPs of each stage, from the cost analysis).
    """

    name = "schedule"

    def __init__(self, plan: Plan, stage_costs: Optional[Sequence[float]] = None):
        self.plan = plan
        self.stage_costs = stage_costs

    def requires(self, gm: torch.fx.GraphModule) -> None:
        if not any(meta.qspec(n) for n in gm.graph.nodes):
            raise PlanError("schedule: the graph has no annotated compute ops; run fracpass.transform first")

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        ops, conflicts, descending = [], [], []
        for node in gm.graph.nodes:
            info, spec = meta.op_info(node), meta.qspec(node)
            if info is None or spec is None:
                continue
            self._check_conflict(node.name, spec, conflicts)
            full = (FULL_PRECISION,) * self.plan.num_stages
            bits = {f: full if spec.excluded else spec.stage_bits(f) for f in "wag"}
            if any(list(b) != sorted(b) for b in bits.values()):
                descending.append(node.name)
            ops.append(OpStages(node.name, info.kind, info.module_path, bits["w"], bits["a"], bits["g"], spec.excluded,
                                meta.gated(node) or ""))
        if conflicts:
            raise PlanError("conflicting plan rules: " + "; ".join(conflicts[:10]) +
                            (f"; and {len(conflicts) - 10} more" if len(conflicts) > 10 else "") +
                            ". Put the exclude rule last, or narrow one of the rules so they do not both match")
        if descending:
            message = (f"precision goes down between stages (the last stage should be the highest) for "
                       f"{len(descending)} op(s): {', '.join(descending[:5])}{' ...' if len(descending) > 5 else ''}")
            warnings.warn(message, UserWarning, stacklevel=2)
            log.warning(message)
        switch, budget = self.plan.switch, None
        if isinstance(switch, Budget):
            budget = self._resolve_budget(switch)
            switch = AtSteps(budget.boundaries)
        targets = self.plan.gates.targets(self.plan.num_stages) if self.plan.gates is not None else ()
        staged = StagePlan(self.plan.stages, tuple(ops), switch, budget, targets)
        return PassResult(gm, modified=False, stats={"ops": len(ops), "descending": len(descending)}, result=staged)

    def _check_conflict(self, op: str, spec, conflicts) -> None:
        excluding = [i for i in spec.rules if self.plan.rules[i].exclude]
        if not excluding:
            return
        later = [i for i in spec.rules if i > excluding[0] and not self.plan.rules[i].exclude]
        if later:
            conflicts.append(f"{op}: rule {excluding[0]} ({self.plan.rules[excluding[0]].describe()}) excludes it but "
                             f"later rule {later[0]} ({self.plan.rules[later[0]].describe()}) sets its bits")

    def _resolve_budget(self, budget: Budget) -> BudgetResult:
        """Boundaries meeting the budget. Stage k runs for a share of the steps proportional to
        lam**k; the run's cost, sum(c_k lam**k) / sum(lam**k), rises monotonically with lam, so
        sum((c_k - fraction * c_last) lam**k) = 0 has exactly one positive root (one sign change),
        found with sympy. Inner boundaries are rounded to the granularity; the last one is then
        solved for exactly and rounded up, so the run costs at most the budget and at most one
        granule of last-stage steps less."""
        costs = [sympy.nsimplify(c, rational=True) for c in (self.stage_costs or ())]
        n, total, gran = len(costs), budget.total_steps, budget.granularity
        if n != self.plan.num_stages:
            raise PlanError("schedule: budget mode needs the per-stage costs; call fracpass.schedule(qmodel, plan), "
                            "which runs the cost analysis")
        if n < 2:
            raise PlanError("schedule: budget mode needs a ladder of at least two stages")
        last = costs[-1]
        if any(c >= last for c in costs[:-1]):
            raise PlanError(f"schedule: budget mode needs every stage cheaper than the last; per-sample BitOPs "
                            f"are {[f'{float(c):.3g}' for c in costs]}")
        fraction = sympy.Rational(str(budget.fraction))
        if fraction * last <= min(costs):
            raise PlanError(f"schedule: budget {budget.fraction:.1%} is at or below the cheapest stage's cost "
                            f"({float(min(costs) / last):.1%} of the static plan); no schedule can meet it")
        lam = sympy.Symbol("lam", positive=True)
        roots = [r for r in sympy.Poly(sum((c - fraction * last) * lam**k for k, c in enumerate(costs)), lam).nroots()
                 if r.is_real and r > 0]
        shares = [float(roots[0]) ** k for k in range(n)]
        shares = [x / sum(shares) for x in shares]
        spend = lambda bounds: sum((bounds[k] - (bounds[k - 1] if k else 0)) * costs[k] for k in range(n - 1)) + \
            (total - bounds[-1]) * last
        inner = [int(round(total * sum(shares[: k + 1]) / gran)) * gran for k in range(n - 2)]
        b_last = sympy.Symbol("b_last")
        solved = sympy.solve(sympy.Eq(spend(inner + [b_last]), fraction * last * total), b_last)
        boundary = int(math.ceil(solved[0] / gran)) * gran
        bounds = inner + [boundary]
        if boundary > total or any(b2 <= b1 for b1, b2 in zip([0] + bounds, bounds)):
            raise PlanError(f"schedule: cannot place {n - 1} stage boundaries for budget {budget.fraction:.1%} in "
                            f"{total} steps at a granularity of {gran}; lower the granularity or change the budget")
        predicted = float(spend(bounds) / (last * total))
        log.info("budget %.1f%%: boundaries %s use %.2f%% of the static plan", 100 * budget.fraction, bounds,
                 100 * predicted)
        return BudgetResult(budget.fraction, predicted, total, tuple(bounds))
