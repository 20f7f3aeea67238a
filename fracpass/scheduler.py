"""The runtime Scheduler: advances a transformed model through its plan's PFQ stages."""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Dict, List, Optional, Tuple

import torch

from fracpass.errors import FracpassError
from fracpass.plan import Plan
from fracpass.quant import warn_nonfinite
from fracpass.switch import AtSteps, Budget, LossPlateau, PlateauState, SwitchRule

__all__ = ["Scheduler", "schedule"]

log = logging.getLogger("fracpass.scheduler")


def schedule(qmodel, plan: Optional[Plan] = None, example_inputs=(), example_kwargs=None):
    """The scheduler pass: a StagePlan of every op's bits per stage (budgets resolved to AtSteps)."""
    from fracpass.api import parts_of, cost
    from fracpass.state import model_state
    from fracpass.passes.schedule import SchedulePass

    parts = parts_of(qmodel)
    if parts is not None:  # a model holding transformed parts: one schedule over all of them
        from fracpass.parts import parts_schedule

        return parts_schedule(qmodel, parts, plan, example_inputs, example_kwargs)
    state = model_state(qmodel)
    plan = plan or state.plan
    if plan.num_stages != state.plan.num_stages:
        raise FracpassError(f"schedule: the plan has {plan.num_stages} stages but the model was transformed with "
                            f"{state.plan.num_stages}; transform the model with this plan")
    costs = None
    if isinstance(plan.switch, Budget):
        report = cost(qmodel, example_inputs, example_kwargs)
        costs = [report.bitops(k)["total"] for k in range(plan.num_stages)]
    return SchedulePass(plan, costs)(qmodel).result


class Scheduler:
    """Call ``step(loss)`` once per training iteration; switches stage when the plan's rule fires.

    ``history`` lists (iteration, old stage, new stage, reason). ``state_dict()`` /
    ``load_state_dict()`` resume the schedule mid-training; ``fracpass.save_checkpoint`` saves it
    with the model, the optimizer and torch's RNG state, which an exact resume needs too. Under
    ``torch.distributed`` the window loss is averaged over ranks, so every rank switches at the
    same iteration.

    A non-finite loss (NaN/Inf) counts as an iteration but is left out of the plateau window's
    mean and counted in ``nonfinite_steps``; each window's end logs how many there were and
    which activation quantizers skipped a non-finite batch's range. Skip ``backward()`` and
    ``optimizer.step()`` for such a loss, as in plain PyTorch, and still call ``step(loss)``.
    """

    def __init__(self, qmodel, plan: Optional[Plan] = None):
        from fracpass.api import parts_of, current_stage
        from fracpass.state import model_state

        parts = parts_of(qmodel)  # None, or the transformed parts qmodel holds: they switch together
        if parts is None:
            state = model_state(qmodel)
        else:
            from fracpass.parts import common_stages, parts_plan

            common_stages(parts, "Scheduler")
            state = dataclasses.replace(parts[0][1].fracpass, plan=plan or parts_plan(parts))
        self.qmodel = qmodel
        self.plan = plan or state.plan
        if self.plan.num_stages != state.plan.num_stages:
            raise FracpassError(f"Scheduler: the plan has {self.plan.num_stages} stages but the model was "
                                f"transformed with {state.plan.num_stages}")
        rule: Optional[SwitchRule] = self.plan.switch
        if rule is None and self.plan.num_stages > 1:
            rule = LossPlateau()
        if isinstance(rule, Budget):
            rule = schedule(qmodel, self.plan).switch
        self.rule = rule
        self._rule_state = rule.new_state(self.plan.num_stages) if rule is not None else None
        self.iteration = 0
        self.stage = current_stage(qmodel)
        self.history: List[Tuple[int, int, int, str]] = []
        self._window_sum: Any = 0.0  # finite losses of the window, on the loss's device
        self._window_count: Any = 0  # how many
        self._window_nonfinite: Any = 0  # non-finite losses since the last read-back
        self._nonfinite_seen = 0  # those read back already

    def gate_loss(self):
        """``fracpass.gate_loss(qmodel)``: the DFQ cost regulariser at the target of the current stage."""
        from fracpass.api import gate_loss

        return gate_loss(self.qmodel)

    @property
    def last_stage(self) -> int:
        return self.plan.num_stages - 1

    @property
    def nonfinite_steps(self) -> int:
        """Iterations whose loss was NaN or Inf (reads the device-side count back)."""
        return self._nonfinite_seen + int(self._window_nonfinite)

    def step(self, loss: Any = None) -> bool:
        """Record one iteration's training loss; returns True if the stage switched."""
        self.iteration += 1
        if loss is not None:
            self._record(loss)
        if self.rule is None:
            return False
        window_loss = None
        if isinstance(self._rule_state, PlateauState):
            if loss is None:
                raise FracpassError("Scheduler.step(loss): LossPlateau needs the iteration's training loss")
            if not self._rule_state.end_of_window(self.rule, self.iteration):
                return False
            window_loss = self._reduce_window()
        reason = self._rule_state.decide(self.rule, self.iteration, window_loss, self.stage, self.last_stage)
        if reason is None:
            return False
        self._switch(reason)
        return True

    def _record(self, loss: Any) -> None:
        # accumulate on the loss's device, finite and non-finite apart; read back once per window
        if torch.is_tensor(loss):
            value = loss.detach().double()
            finite = torch.isfinite(value)
            self._window_sum = self._window_sum + torch.where(finite, value, 0.0)
            self._window_count = self._window_count + finite.long()
            self._window_nonfinite = self._window_nonfinite + (~finite).long()
        else:
            value = float(loss)
            finite = math.isfinite(value)
            self._window_sum = self._window_sum + (value if finite else 0.0)
            self._window_count = self._window_count + int(finite)
            self._window_nonfinite = self._window_nonfinite + int(not finite)

    def _reduce_window(self) -> Optional[float]:
        """The window's mean finite loss (over ranks), None if it had none; logs its non-finite losses."""
        total, count = self._window_sum, self._window_count
        device = total.device if torch.is_tensor(total) else torch.device("cpu")
        pair = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=device) for v in (total, count)])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(pair)
        bad = torch.as_tensor(self._window_nonfinite, dtype=torch.float64, device=device).view(1)
        total, count, bad = torch.cat([pair, bad]).tolist()  # one read-back per window
        self._window_sum, self._window_count, self._window_nonfinite = 0.0, 0, 0
        self._nonfinite_seen += int(bad)
        if bad:
            log.warning("iteration %d: non-finite training loss at %d of the last %d iterations, left out of the "
                        "plateau window; skip backward() and optimizer.step() for such a loss", self.iteration,
                        int(bad), self.rule.eval_every)
        warn_nonfinite(self.qmodel.named_modules())
        return total / count if count else None

    def _switch(self, reason: str) -> None:
        from fracpass.api import set_stage

        old = self.stage
        self.stage = old + 1
        set_stage(self.qmodel, self.stage)
        warn_nonfinite(self.qmodel.named_modules())  # a switch is rare: a fine time to read the counts back
        self.history.append((self.iteration, old, self.stage, reason))
        s = self.plan.stages[self.stage]
        log.info("iteration %d: stage %d -> %d (w/a/g %d/%d/%d): %s", self.iteration, old, self.stage, s.w, s.a, s.g,
                 reason)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "iteration": self.iteration, "stage": self.stage, "history": [list(h) for h in self.history],
            "window_sum": float(self._window_sum), "window_count": int(self._window_count),
            "rule": dataclasses.asdict(self._rule_state) if self._rule_state is not None else None,
            "nonfinite_steps": self.nonfinite_steps,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        from fracpass.api import set_stage

        self.iteration, self.stage = int(state["iteration"]), int(state["stage"])
        self.history = [tuple(h) for h in state["history"]]
        self._window_sum, self._window_count = float(state["window_sum"]), int(state["window_count"])
        self._window_nonfinite, self._nonfinite_seen = 0, int(state.get("nonfinite_steps", 0))
        if state["rule"] is not None:
            self._rule_state = type(self._rule_state)(**state["rule"])
        set_stage(self.qmodel, self.stage)

    def __repr__(self) -> str:
        s = self.plan.stages[self.stage]
        text = (f"Scheduler(stage {self.stage}/{self.last_stage} w/a/g {s.w}/{s.a}/{s.g}, iteration {self.iteration}, "
                f"switches {len(self.history)}")
        if isinstance(self._rule_state, PlateauState):
            r = self._rule_state
            to_go = self.rule.eval_every - self.iteration % self.rule.eval_every
            text += (f", plateau: {len(r.recent)}/{self.rule.window} windows, threshold {r.threshold:.4g}, "
                     f"next window in {to_go} it")
        elif isinstance(self.rule, AtSteps) and self.stage < self.last_stage:
            text += f", next switch at step {self.rule.boundaries()[self.stage]}"
        return text + ")"
