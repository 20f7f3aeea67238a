"""Train a transformed model under DistributedDataParallel (or FSDP2), started with torchrun.

    torchrun --nproc-per-node 2 examples/ddp_train.py --recipe static|pfq|gated [--steps 60]

Each rank trains the same small residual CNN on its own shard of a synthetic 10-class image task,
on CPU with the gloo backend. Recipes:

* ``static``: every op at 8/8/8 bits;
* ``pfq``: FracTrain's precision ladder (w/a 4 -> 6 -> 8, g 6 -> 8 -> 8); ``fracpass.Scheduler``
  averages the window loss over ranks, so all ranks switch stage at the same iteration although
  their local losses differ;
* ``gated``: FracTrain's full method (PFQ + DFQ): per sample and per block a gate picks the
  (activation, gradient) bits; each rank's gates choose for its own samples, and the gates'
  parameters are averaged like any other.

After training, every rank switches the model to eval (which captures the eval-mode graph the
first time, on every rank together) and reports the accuracy on a held-out set; with gates it
also records the choices on a probe batch, one sample at a time.

``--recipe`` takes a comma-separated list to run several in one launch. ``--compile [BACKEND]``
wraps the DDP or FSDP model in ``torch.compile``. ``--fsdp`` shards the model
with FSDP2 (``torch.distributed.fsdp.fully_shard``) instead of wrapping it in DDP; the first switch
to eval then gathers the full parameters while it captures. FSDP does not synchronise buffers:
before eval, rank 0's batch-norm statistics and activation ranges are broadcast, as DDP does. ``--out DIR`` saves, per recipe and
rank, the trained parameters, the stage history, the local losses, the gates' choices and the eval
results (``DIR/<recipe>-rank<r>.pt``), which the tests compare across ranks. Run without torchrun,
it trains as a world of one process.

On several machines, start the same command on each node (here 2 nodes of 4 processes; the
endpoint is one node's address and a free port)::

    torchrun --nnodes 2 --nproc-per-node 4 --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --rdzv-id fracpass-run examples/ddp_train.py --recipe pfq
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import pathlib
import socket
import sys
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import fracpass  # noqa: E402
from examples.digits_fractrain import DigitsResNet  # noqa: E402  (1 channel in, 10 classes)

log = logging.getLogger("ddp_train")
RECIPES = ("static", "pfq", "gated")
NUM_CLASSES, SIZE = 10, 8


def dataset(n: int, seed: int = 0, held_out: bool = False):
    """A learnable synthetic task: one fixed pattern per class (from ``seed``) plus noise. Every rank
    builds the same set and trains on its own shard of each global batch; ``held_out`` draws other
    samples of the same classes."""
    patterns = torch.randn(NUM_CLASSES, 1, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(2 * seed + 1 + held_out)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return patterns[y] + 0.8 * torch.randn(n, 1, SIZE, SIZE, generator=g), y


def make_plan(recipe: str, eval_every: int, threshold: float, gate_beta: float = 1e-3) -> fracpass.Plan:
    # short windows, so a short run climbs the ladder; a real run keeps the defaults (an epoch's worth)
    switch = fracpass.LossPlateau(threshold=threshold, decay=0.5, window=2, eval_every=eval_every, scale_windows=2)
    if recipe == "static":
        return fracpass.Plan.static(8, 8, 8)
    if recipe == "pfq":
        return fracpass.Plan.progressive(fw=(4, 6, 8), bw=(6, 8, 8), exclude=("conv1",), switch=switch)
    if recipe == "gated":
        plan = fracpass.Plan.fractrain("cifar")
        return dataclasses.replace(plan, switch=switch, gates=dataclasses.replace(plan.gates, beta=gate_beta))
    raise SystemExit(f"ddp_train: --recipe {recipe!r}: use one of {', '.join(RECIPES)}")


def init_distributed() -> None:
    """Join the process group torchrun describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
    environment), or make a world of one when started without torchrun."""
    if "RANK" in os.environ:
        dist.init_process_group("gloo")
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def local_batch_sizes(text: str, world: int) -> List[int]:
    sizes = [int(b) for b in text.split(",")]
    if len(sizes) == 1:
        return sizes * world
    if len(sizes) != world:
        raise SystemExit(f"ddp_train: --batch-size {text}: give one size, or one per rank ({world} ranks)")
    return sizes


def wrap(qmodel: nn.Module, fsdp: bool, compile_backend: Optional[str] = None) -> nn.Module:
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        model = fully_shard(qmodel)  # shards in place; the module keeps its fracpass state
    else:
        model = nn.parallel.DistributedDataParallel(qmodel)
    # compiled around the wrapper, as PyTorch's DDP and FSDP2 guides do; the Scheduler, gate_loss and
    # gate_stats take the transformed model itself
    return torch.compile(model, backend=compile_backend) if compile_backend else model


def full_parameters(qmodel: nn.Module) -> Dict[str, torch.Tensor]:
    """Every parameter as a full tensor (FSDP holds each rank's shard as a DTensor)."""
    return {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
            for name, p in qmodel.named_parameters()}


def train(recipe: str, steps: int, batch_sizes: List[int], lr: float = 0.05, eval_every: int = 5,
          threshold: float = 0.1, gate_beta: float = 1e-3, fsdp: bool = False, seed: int = 0,
          compile_backend: Optional[str] = None) -> Dict[str, object]:
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = make_plan(recipe, eval_every, threshold, gate_beta)
    global_batch = sum(batch_sizes)
    start = sum(batch_sizes[:rank])
    x, y = dataset(global_batch * steps, seed)
    torch.manual_seed(seed)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    qmodel = fracpass.transform(DigitsResNet(c=8, blocks=2), plan, example_inputs=(x[:2],))
    model = wrap(qmodel, fsdp, compile_backend)
    sched = fracpass.Scheduler(qmodel)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    losses, gates = [], []
    for step in range(steps):
        lo = step * global_batch + start
        xb, yb = x[lo:lo + batch_sizes[rank]], y[lo:lo + batch_sizes[rank]]
        loss = F.cross_entropy(model(xb), yb)
        total = loss + sched.gate_loss() if plan.gates is not None else loss
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step(loss)  # the rank-averaged window loss decides the switch
        losses.append(loss.item())
        if plan.gates is not None:
            stats = fracpass.gate_stats(qmodel)
            gates.append({"batch": stats.batch, "units": dict(stats.units), "stage": stats.stage})
    history = [h[:3] for h in sched.history]
    params = full_parameters(qmodel)
    if fsdp:
        broadcast_buffers(qmodel)
    accuracy, logits, probe = evaluate(model, qmodel, plan.gates is not None, seed)
    if rank == 0:
        log.info("%s: %d ranks, local batches %s, final loss %.3f, switches %s, held-out accuracy %.2f", recipe,
                 world, batch_sizes, losses[-1], history or "none", accuracy)
    return {"recipe": recipe, "rank": rank, "world": world, "local_batch": batch_sizes[rank], "losses": losses,
            "history": history, "stage": fracpass.current_stage(qmodel), "gates": gates, "params": params,
            "accuracy": accuracy, "eval_logits": logits, "probe": probe}


@torch.no_grad()
def broadcast_buffers(qmodel: nn.Module) -> None:
    """Rank 0's buffers everywhere, as DDP does before each forward. FSDP leaves buffers alone, so
    each rank's batch-norm statistics and activation quantizers' running ranges follow its own data,
    and eval would differ across ranks."""
    for buffer in qmodel.buffers():
        dist.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(model: nn.Module, qmodel: nn.Module, gated: bool, seed: int, n: int = 64):
    """Eval-mode accuracy on a held-out set, its logits, and with gates each probe sample's choices.

    The probe's choices come one sample at a time (``gate_stats`` of a batch of one): per unit, the
    index of the option that sample took, plus the whole probe batch's per-option fractions, so a test
    can see that each sample's choice does not depend on the batch or the rank it runs in.
    """
    model.eval()  # every rank at once: the first eval captures the eval graph (and under FSDP gathers)
    x, y = dataset(n, seed, held_out=True)
    logits = model(x)
    accuracy = (logits.argmax(1) == y).float().mean().item()
    probe = None
    if gated:
        probe_x = x[:8]
        model(probe_x)
        batch = dict(fracpass.gate_stats(qmodel).units)
        samples = []
        for i in range(len(probe_x)):
            model(probe_x[i:i + 1])
            samples.append({unit: max(range(len(mix)), key=mix.__getitem__)
                            for unit, mix in fracpass.gate_stats(qmodel).units.items()})
        probe = {"batch": batch, "samples": samples}
    model.train()
    return accuracy, logits, probe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="pfq", help=f"one of {', '.join(RECIPES)}, or a comma-separated list")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", default="32", help="per-rank batch size, or one per rank, e.g. 32,24")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--eval-every", type=int, default=5, help="LossPlateau window length, in steps")
    parser.add_argument("--threshold", type=float, default=0.1, help="LossPlateau threshold")
    parser.add_argument("--gate-beta", type=float, default=1e-3,
                        help="weight of the gates' cost term (FracTrain: 1e-3); larger moves the gates sooner")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 fully_shard instead of DDP")
    parser.add_argument("--compile", nargs="?", const="inductor", metavar="BACKEND",
                        help="torch.compile the wrapped model (default backend: inductor)")
    parser.add_argument("--out", help="save each rank's results here (<recipe>-rank<r>.pt)")
    args = parser.parse_args(argv)
    init_distributed()
    # one rank reports: every rank switches at the same iteration and logs the same line
    logging.basicConfig(level=logging.INFO if dist.get_rank() == 0 else logging.WARNING, format="%(name)s: %(message)s")
    try:
        sizes = local_batch_sizes(args.batch_size, dist.get_world_size())
        for recipe in args.recipe.split(","):
            result = train(recipe, args.steps, sizes, args.lr, args.eval_every, args.threshold, args.gate_beta,
                           args.fsdp, args.seed, args.compile)
            if args.out:
                torch.save(result, pathlib.Path(args.out) / f"{recipe}-rank{result['rank']}.pt")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
