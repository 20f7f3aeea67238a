"""HuggingFace ``Trainer`` integration: the PFQ Scheduler, DFQ's gate loss, logs and checkpoints.

    sched = fracpass.Scheduler(qmodel)
    trainer = FracpassTrainer(model=qmodel, args=args, train_dataset=data, scheduler=sched)
    trainer.train()                                   # later: trainer.train(resume_from_checkpoint=True)

``FracpassTrainer`` is a ``Trainer`` that adds ``fracpass.gate_loss`` to the training loss, steps the
Scheduler once per optimizer step with the task loss (summed over gradient-accumulation micro-batches,
as the Trainer logs it; under several processes the Scheduler averages each window over the ranks, so
they all switch at the same step), adds the stage, its bits and the gates' mix to every training log
(so to TensorBoard or W&B where ``report_to`` has them), and saves the Scheduler's state in every
checkpoint folder (``fracpass_scheduler.json``) and restores it on resume.

With a plain ``Trainer`` and a schedule of fixed steps (``fracpass.AtSteps``, ``fracpass.AtEpochs``) and
no gates, the callback alone does: ``Trainer(..., callbacks=[FracpassCallback(sched)])``. A loss-driven
schedule (``LossPlateau``, the default) or a gated plan needs the loss; pass the callback and a loss
function built from it:

    cb = FracpassCallback(sched)
    trainer = Trainer(model=qmodel, args=args, train_dataset=data, callbacks=[cb],
                      compute_loss_func=cb.compute_loss_func(my_loss))   # my_loss(outputs, labels, num_items_in_batch)

A model transformed without ``labels`` in its ``example_kwargs`` does not take them, and the Trainer
drops dataset columns its ``forward`` does not take: set ``TrainingArguments(label_names=["labels"])``.
The Trainer hands its callbacks no loss, which is why the callback needs its loss function (or
``FracpassTrainer``) to see it. Two differences from ``FracpassTrainer``: reporting callbacks
(TensorBoard, W&B) run before user callbacks, so they do not get the fracpass entries (the console and
``trainer.state.log_history`` do); and resuming from a checkpoint outside ``args.output_dir`` needs
``cb.resume_from(folder)`` before ``trainer.train(resume_from_checkpoint=folder)``.
"""
from __future__ import annotations

import os
from typing import Callable, Optional

from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from fracpass.errors import FracpassError
from fracpass.switch import LossPlateau
from fracpass.integrations._common import PREFIX, gate_hubs, load_scheduler_state, log_entries, save_scheduler_state, state_file

__all__ = ["FracpassCallback", "FracpassTrainer"]


class FracpassCallback(TrainerCallback):
    """Steps ``scheduler`` at every optimizer step with the loss its loss function (or
    ``FracpassTrainer``) recorded, logs the stage, bits and gate mix, and saves/restores the Scheduler
    with the Trainer's checkpoints."""

    def __init__(self, scheduler, *, log_gates: bool = True):
        self.scheduler = scheduler
        self.log_gates = log_gates
        self.resume_dir: Optional[str] = None
        self._step_loss = None  # this optimizer step's task loss, summed over its micro-batches, on the device
        self._accumulation = 1

    def record_loss(self, loss) -> None:
        """Add one micro-batch's task loss (already divided as the Trainer divides it for accumulation)."""
        loss = loss.detach()
        self._step_loss = loss if self._step_loss is None else self._step_loss + loss

    def compute_loss_func(self, loss_func: Callable) -> Callable:
        """For ``Trainer(compute_loss_func=...)``: ``loss_func(outputs, labels, num_items_in_batch=...)``
        plus the gate loss; the task loss goes to the Scheduler. The Trainer takes a ``compute_loss_func``
        loss as already normalized over the accumulated batch, so the gate loss is divided by the
        accumulation steps to weigh the same as without accumulation."""
        if not callable(loss_func):
            raise FracpassError(f"FracpassCallback.compute_loss_func: loss_func must be callable as "
                                f"loss_func(outputs, labels, num_items_in_batch=None), got {loss_func!r}")

        def compute_loss(outputs, labels, num_items_in_batch=None):
            loss = loss_func(outputs, labels, num_items_in_batch=num_items_in_batch)
            if not self.scheduler.qmodel.training:
                return loss
            self.record_loss(loss)
            if gate_hubs(self.scheduler.qmodel):
                loss = loss + self.scheduler.gate_loss() / self._accumulation
            return loss

        compute_loss.fracpass_callback = self  # FracpassTrainer then adds nothing itself
        return compute_loss

    def resume_from(self, checkpoint_dir) -> None:
        """Restore the Scheduler from ``checkpoint_dir`` when the next ``train`` resumes."""
        self.resume_dir = os.fspath(checkpoint_dir)

    # -- Trainer events ---------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, **kwargs):
        self._accumulation = args.gradient_accumulation_steps
        self._step_loss = None
        if state.global_step > 0:  # the Trainer resumed from a checkpoint
            folder = self.resume_dir or os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            load_scheduler_state(self.scheduler, state_file(folder, args.process_index, args.world_size),
                                 state.global_step)
        self.resume_dir = None

    def on_step_end(self, args, state, control, **kwargs):
        loss, self._step_loss = self._step_loss, None
        if loss is None:  # no loss function recorded it: fine for a schedule of fixed steps without gates
            need = self._what_needs_the_loss()
            if need:
                raise FracpassError(
                    f"FracpassCallback: the Trainer gave this step's loss to nobody, but {need}; use "
                    "fracpass.integrations.transformers.FracpassTrainer, or pass "
                    "compute_loss_func=callback.compute_loss_func(your_loss) to the Trainer")
        self.scheduler.step(loss)

    def _what_needs_the_loss(self) -> Optional[str]:
        """Why this step needs the task loss, or None: AtSteps / AtEpochs switch on the step count alone."""
        rule = self.scheduler.rule
        if isinstance(rule, LossPlateau):
            return "the plan's LossPlateau switch rule reads it to decide when to switch stage"
        if gate_hubs(self.scheduler.qmodel):
            return "the plan's gates need their cost loss added to it"
        return None

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is None or "loss" not in logs or PREFIX + "stage" in logs:
            return
        entries = log_entries(self.scheduler, self.log_gates)
        logs.update(entries)
        if state.log_history and state.log_history[-1].get("loss") == logs["loss"]:
            state.log_history[-1].update(entries)

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        save_scheduler_state(self.scheduler, state_file(folder, args.process_index, args.world_size),
                             state.global_step)


class FracpassTrainer(Trainer):
    """A ``Trainer`` with ``FracpassCallback(scheduler)`` in place, the gate loss added to the training
    loss, the fracpass entries in every training log, and resume restoring the Scheduler."""

    def __init__(self, *args, scheduler, log_gates: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        found = [cb for cb in self.callback_handler.callbacks if isinstance(cb, FracpassCallback)]
        if found and found[0].scheduler is not scheduler:
            raise FracpassError("FracpassTrainer: callbacks hold a FracpassCallback for another Scheduler; pass "
                                "only scheduler=..., the trainer adds its callback")
        self.fracpass_callback = found[0] if found else FracpassCallback(scheduler, log_gates=log_gates)
        if not found:
            self.add_callback(self.fracpass_callback)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                      num_items_in_batch=num_items_in_batch)
        if not model.training or getattr(self.compute_loss_func, "fracpass_callback", None) is not None:
            return result  # evaluation, or the callback's loss function already recorded it and added the gates'
        loss, outputs = result if return_outputs else (result, None)
        # mirror Trainer.training_step: an unscaled loss is divided by the accumulation steps after this
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or \
                self.compute_loss_func is not None
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        callback = self.fracpass_callback
        callback.record_loss(loss if scaled else loss / steps)
        if gate_hubs(callback.scheduler.qmodel):
            loss = loss + callback.scheduler.gate_loss() / (steps if scaled else 1)
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        if "loss" in logs:  # a training log: reporting callbacks run before user callbacks, so add it here
            logs.update(log_entries(self.fracpass_callback.scheduler, self.fracpass_callback.log_gates))
        super().log(logs, start_time)

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        folder = resume_from_checkpoint
        if isinstance(folder, bool):
            folder = get_last_checkpoint(self.args.output_dir) if folder else None
        if folder is not None:
            self.fracpass_callback.resume_from(folder)
        return super().train(resume_from_checkpoint, *args, **kwargs)
