"""FracTrain in a Lightning loop: a LightningModule that adds the gates' cost loss, and
``fracpass.integrations.lightning.FracpassCallback`` stepping the PFQ Scheduler, logging it and
keeping it in checkpoints.

    python examples/lightning_train.py --steps 8 --switch-at 4 --out runs/lightning
    python examples/lightning_train.py --steps 12 --switch-at 4 --out runs/lightning --resume runs/lightning/last.ckpt

Synthetic CIFAR-sized images keep it self-contained; swap in a real DataLoader for real training.
Needs ``pip install lightning`` (or ``fracpass[lightning]``).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import fracpass
from fracpass.models import resnet20

try:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import CSVLogger
except ImportError:  # the standalone package
    import pytorch_lightning as L
    from pytorch_lightning.callbacks import ModelCheckpoint
    from pytorch_lightning.loggers import CSVLogger

from fracpass.integrations.lightning import FracpassCallback


class FracTrainModule(L.LightningModule):
    def __init__(self, qmodel, lr: float = 0.05):
        super().__init__()
        self.qmodel, self.lr = qmodel, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        task = F.cross_entropy(self.qmodel(x), y)
        # backward through the task loss plus the gates' cost regulariser; the Scheduler gets the task loss
        return {"loss": task + fracpass.gate_loss(self.qmodel), "task_loss": task}

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


def synthetic_cifar(samples: int = 256, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    return torch.utils.data.TensorDataset(x, y)


def build(switch_at: int):
    """ResNet-20 with a 4 -> 8 bit ladder that switches after ``switch_at`` steps, and DFQ gates per block."""
    torch.manual_seed(0)
    plan = fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8), switch=fracpass.AtSteps((switch_at,)),
                                     exclude=("conv1", "fc"))
    plan = plan.with_gates(fracpass.Gates(a=(4, 6, 8), g=(8, 8, 8), w=8, target=3.0))
    qmodel = fracpass.transform(resnet20(), plan, example_inputs=(torch.randn(2, 3, 32, 32),))
    return qmodel, fracpass.Scheduler(qmodel)


def run(steps: int, switch_at: int, out: str, resume: str | None = None, batch_size: int = 16):
    qmodel, sched = build(switch_at)
    loader = torch.utils.data.DataLoader(synthetic_cifar(), batch_size=batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", devices=1, default_root_dir=out, log_every_n_steps=1,
                        logger=CSVLogger(out, name="logs"), enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[FracpassCallback(sched, loss_key="task_loss"),
                                   ModelCheckpoint(dirpath=out, every_n_train_steps=2, save_top_k=-1, save_last=True)])
    trainer.fit(FracTrainModule(qmodel), loader, ckpt_path=resume)
    return sched, trainer


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps to train in all (default 8)")
    parser.add_argument("--switch-at", type=int, default=4, help="step after which the ladder moves to 8 bits")
    parser.add_argument("--out", default="lightning_run", help="folder for checkpoints and the CSV log")
    parser.add_argument("--resume", help="a checkpoint to resume from (e.g. OUT/last.ckpt)")
    args = parser.parse_args(argv)
    sched, trainer = run(args.steps, args.switch_at, args.out, args.resume)
    print(sched)
    for iteration, old, new, reason in sched.history:
        print(f"step {iteration}: stage {old} -> {new} ({reason})")
    print(f"gates on the last batch: {fracpass.gate_stats(sched.qmodel).mean_cost:.3f}% of FP32")


if __name__ == "__main__":
    main()
