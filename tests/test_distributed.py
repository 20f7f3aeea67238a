"""The Scheduler under torch.distributed: every rank switches at the same iteration.

Two processes on loopback (gloo). Each rank sees its own losses; the window loss is averaged over
ranks before the plateau rule decides, so the ranks agree even though their local losses alone
would switch at different iterations.
"""
import os
import socket
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from conftest import ROOT

RULE_KW = dict(threshold=0.1, decay=0.5, window=3, eval_every=2, scale_windows=2)
# Rank 0's windows alone would plateau at window 5 (iteration 10); rank 1's alone not until later.
# Their mean plateaus at window 6 (iteration 12): both ranks must switch there.
WINDOWS = {0: [10, 6, 5, 5.1, 5.05, 5.0, 5.0, 5.0], 1: [10, 6, 5, 4.0, 3.0, 3.05, 3.0, 3.0]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, results) -> None:
    sys.path.insert(0, str(ROOT))
    import fracpass
    from torch import nn

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 4))
        plan = fracpass.Plan.progressive(switch=fracpass.LossPlateau(**RULE_KW))
        qmodel = fracpass.transform(model, plan, example_inputs=(torch.randn(2, 4),))
        ddp = torch.nn.parallel.DistributedDataParallel(qmodel)  # the transformed model trains under DDP
        out = ddp(torch.randn(2, 4)).sum()
        out.backward()
        sched = fracpass.Scheduler(qmodel)
        for w in WINDOWS[rank]:
            for _ in range(2):
                sched.step(torch.tensor(w))
        results[rank] = [h[:3] for h in sched.history]
        # a gated model under DDP: gate parameters get gradients from every rank's samples, averaged
        gated = fracpass.transform(nn.Sequential(nn.Linear(4, 4)), fracpass.Plan.static().with_gates(
            fracpass.Gates(a=(2, 8), g=(8, 8), granularity="op")), example_inputs=(torch.randn(2, 4),))
        ddp = torch.nn.parallel.DistributedDataParallel(gated)
        torch.manual_seed(rank)  # each rank its own batch
        (ddp(torch.randn(8, 4)).square().sum() + fracpass.gate_loss(gated)).backward()
        results[f"gate{rank}"] = gated.gates.proj.weight.grad.clone()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_switch_together():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(2, _free_port(), results), nprocs=2, join=True)
    assert results[0] == results[1] == [(12, 0, 1)]
    assert results["gate0"].abs().sum() > 0 and torch.equal(results["gate0"], results["gate1"])
