"""Lightning integration: a ``Callback`` that runs the PFQ Scheduler, logs it, and checkpoints it.

    class Module(lightning.LightningModule):
        def __init__(self, qmodel):
            super().__init__()
            self.qmodel = qmodel
        def training_step(self, batch, batch_idx):
            x, y = batch
            task = F.cross_entropy(self.qmodel(x), y)
            return {"loss": task + fracpass.gate_loss(self.qmodel), "task_loss": task}
        ...

    sched = fracpass.Scheduler(qmodel)
    trainer = lightning.Trainer(max_steps=..., callbacks=[FracpassCallback(sched, loss_key="task_loss")])
    trainer.fit(Module(qmodel), loader)                     # later: trainer.fit(..., ckpt_path="last.ckpt")

``FracpassCallback`` reads ``outputs[loss_key]`` (default ``"loss"``) after every training batch and
steps the Scheduler once per optimizer step: Lightning divides ``outputs["loss"]`` by the
accumulation steps, so those micro-batch values are summed; any other key is averaged. Under several
processes the Scheduler averages each window's loss over the ranks, so they all switch together. It
logs the stage, its w/a/g bits, the switch count and, for gated models, the gates' mean cost, target
and option mix (``pl_module.log_dict``, so to every logger the Trainer has; reading the gates syncs
with the device once per step, ``log_gates=False`` avoids it), and its ``state_dict`` (the
Scheduler's) goes into Lightning checkpoints and comes back on ``fit(ckpt_path=...)``.
"""
from __future__ import annotations

try:
    from lightning.pytorch import Callback
except ImportError:  # the standalone package
    from pytorch_lightning import Callback

from fracpass.errors import FracpassError
from fracpass.integrations._common import log_entries

__all__ = ["FracpassCallback"]


class FracpassCallback(Callback):
    """Steps ``scheduler`` from ``outputs[loss_key]`` once per optimizer step, logs it, checkpoints it."""

    def __init__(self, scheduler, *, loss_key: str = "loss", log_gates: bool = True):
        self.scheduler = scheduler
        self.loss_key = loss_key
        self.log_gates = log_gates
        self._losses = []  # this optimizer step's micro-batch losses, on the device
        self._global_step = None

    def on_train_start(self, trainer, pl_module):
        self._losses, self._global_step = [], trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if outputs is None:  # training_step returned None: Lightning skipped the batch
            return
        loss = outputs if not isinstance(outputs, dict) else outputs.get(self.loss_key)
        if loss is None:
            raise FracpassError(f"FracpassCallback: training_step returned {sorted(outputs)} but no {self.loss_key!r}; "
                                f"return the task loss under that key, or pass loss_key= naming the key that has it")
        self._losses.append(loss.detach())
        if trainer.global_step == self._global_step:
            return  # accumulating gradients: the optimizer has not stepped yet
        self._global_step = trainer.global_step
        losses, self._losses = self._losses, []
        step_loss = sum(losses[1:], losses[0])
        if self.loss_key != "loss" or not isinstance(outputs, dict):
            step_loss = step_loss / len(losses)  # Lightning divided only outputs["loss"] by the accumulation steps
        self.scheduler.step(step_loss)
        pl_module.log_dict({k: float(v) for k, v in log_entries(self.scheduler, self.log_gates).items()},
                           on_step=True, on_epoch=False, batch_size=1)

    def state_dict(self):
        return {"scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state_dict):
        self.scheduler.load_state_dict(state_dict["scheduler"])
