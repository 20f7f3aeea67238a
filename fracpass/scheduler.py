"""The runtime Scheduler: advances a transformed model through its plan's PFQ stages."""
from __future__ import annotations

import dataclasses
import logging
from typing import Any, Dict, List, Optional, Tuple

import torch

from fracpass.errors import FracpassError
from fracpass.plan import Plan
from fracpass.switch import AtSteps, Budget, LossPlateau, PlateauState, SwitchRule

__all__ = ["Scheduler", "schedule"]

log = logging.getLogger("fracpass.scheduler")


def schedule(qmodel, plan: Optional[Plan] = None, example_inputs=(), example_kwargs=None):
    """The scheduler pass: a StagePlan of every op's bits per stage (budgets resolved to AtSteps)."""
    from fracpass.api import _state, cost
    from fracpass.passes.schedule import SchedulePass

    state = _state(qmodel)
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
    ``load_state_dict()`` resume mid-training exactly. Under ``torch.distributed`` the window loss
    is averaged over ranks, so every rank switches at the same iteration.
    """

    def __init__(self, qmodel, plan: Optional[Plan] = None):
        from fracpass.api import _state, current_stage

        state = _state(qmodel)
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
        self._window_sum: Any = 0.0
        self._window_count = 0

    def gate_loss(self):
        """``fracpass.gate_loss(qmodel)``: the DFQ cost regulariser at the target of the current stage."""
        from fracpass.api import gate_loss

        return gate_loss(self.qmodel)

    @property
    def last_stage(self) -> int:
        return self.plan.num_stages - 1

    def step(self, loss: Any = None) -> bool:
        """Record one iteration's training loss; returns True if the stage switched."""
        self.iteration += 1
        if self.rule is None:
            return False
        window_loss = None
        if isinstance(self._rule_state, PlateauState):
            if loss is None:
                raise FracpassError("Scheduler.step(loss): LossPlateau needs the iteration's training loss")
            # accumulate on the loss's device; read it back once per window, not once per step
            self._window_sum = self._window_sum + (loss.detach().double() if torch.is_tensor(loss) else float(loss))
            self._window_count += 1
            if not self._rule_state.end_of_window(self.rule, self.iteration):
                return False
            window_loss = self._reduce_window()
        reason = self._rule_state.decide(self.rule, self.iteration, window_loss, self.stage, self.last_stage)
        if reason is None:
            return False
        self._switch(reason)
        return True

    def _reduce_window(self) -> float:
        total, count = self._window_sum, self._window_count
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            device = total.device if torch.is_tensor(total) else torch.device("cpu")
            both = torch.stack([torch.as_tensor(total, dtype=torch.float64, device=device),
                                torch.tensor(float(count), dtype=torch.float64, device=device)])
            torch.distributed.all_reduce(both)
            total, count = both[0], both[1]
        mean = float(total) / float(count)
        self._window_sum, self._window_count = 0.0, 0
        return mean

    def _switch(self, reason: str) -> None:
        from fracpass.api import set_stage

        old = self.stage
        self.stage = old + 1
        set_stage(self.qmodel, self.stage)
        self.history.append((self.iteration, old, self.stage, reason))
        s = self.plan.stages[self.stage]
        log.info("iteration %d: stage %d -> %d (w/a/g %d/%d/%d): %s", self.iteration, old, self.stage, s.w, s.a, s.g,
                 reason)

    # -- checkpointing ----------------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        return {
            "iteration": self.iteration, "stage": self.stage, "history": [list(h) for h in self.history],
            "window_sum": float(self._window_sum), "window_count": self._window_count,
            "rule": dataclasses.asdict(self._rule_state) if self._rule_state is not None else None,
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        from fracpass.api import set_stage

        self.iteration, self.stage = int(state["iteration"]), int(state["stage"])
        self.history = [tuple(h) for h in state["history"]]
        self._window_sum, self._window_count = float(state["window_sum"]), int(state["window_count"])
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
