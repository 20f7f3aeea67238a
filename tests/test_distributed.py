"""The Scheduler under torch.distributed: every rank switches at the same iteration.

Two processes on loopback (gloo). Each rank sees its own losses; the window loss is averaged over
ranks before the plateau rule decides, so the ranks agree even though their local losses alone
would switch at different iterations.
"""
import os
import socket
import subprocess
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


# -- examples/ddp_train.py under torchrun --------------------------------------------------------------------------
RECIPES = ("static", "pfq", "gated")
LOCAL_BATCHES = (16, 12)  # unequal, so each rank's loss and gate mix differ


def _torchrun(tmp_path, *flags) -> dict:
    """Run examples/ddp_train.py on 2 gloo ranks with torchrun; {(recipe, rank): result}."""
    out = tmp_path / ("fsdp" if "--fsdp" in flags else "ddp")
    out.mkdir()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), str(ROOT / "examples" / "ddp_train.py"), "--recipe", ",".join(RECIPES),
           "--steps", "20", "--batch-size", ",".join(map(str, LOCAL_BATCHES)), "--out", str(out), *flags]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return {(recipe, rank): torch.load(out / f"{recipe}-rank{rank}.pt", weights_only=True)
            for recipe in RECIPES for rank in (0, 1)}


def _check_ranks_agree(results: dict) -> None:
    for recipe in RECIPES:
        r0, r1 = results[recipe, 0], results[recipe, 1]
        assert r0["world"] == r1["world"] == 2
        assert r0["losses"] != r1["losses"]  # each rank trained on its own shard
        assert r0["params"].keys() == r1["params"].keys()
        assert all(torch.equal(r0["params"][k], r1["params"][k]) for k in r0["params"]), recipe
        # stage switches: decided on the rank-averaged window loss, so at the same iteration everywhere
        assert r0["history"] == r1["history"] and r0["stage"] == r1["stage"]
        assert (len(r0["history"]) > 0) == (recipe != "static"), (recipe, r0["history"])
        # eval after training (the eval graph captured on every rank together): the same model everywhere
        assert torch.equal(r0["eval_logits"], r1["eval_logits"])
    for rank, local in enumerate(LOCAL_BATCHES):
        gated = results["gated", rank]
        # the gates chose for this rank's own samples at every step: fractions over its local batch
        assert [g["batch"] for g in gated["gates"]] == [local] * 20
        for step in gated["gates"]:
            for mix in step["units"].values():
                assert all(abs(p * local - round(p * local)) < 1e-6 for p in mix)
        # each probe sample's choice is its own: one at a time it adds up to the whole probe batch's mix
        probe = gated["probe"]
        for unit, mix in probe["batch"].items():
            counts = [sum(s[unit] == k for s in probe["samples"]) / len(probe["samples"]) for k in range(len(mix))]
            assert counts == pytest.approx(list(mix)), unit
    assert results["gated", 0]["probe"] == results["gated", 1]["probe"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.slow  # two torchrun launches of 3 recipes: ~40 s each on 2 cores
def test_ddp_example_under_torchrun_keeps_ranks_identical_and_switches_together(tmp_path):
    _check_ranks_agree(_torchrun(tmp_path))


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.slow
def test_fsdp2_example_under_torchrun_trains_switches_and_evaluates_like_ddp(tmp_path):
    fsdp = _torchrun(tmp_path, "--fsdp")
    _check_ranks_agree(fsdp)
    ddp = _torchrun(tmp_path)
    for key, result in fsdp.items():
        # the same training: reduce-scatter vs all-reduce may round the averaged gradients apart
        assert result["history"] == ddp[key]["history"]
        for name, p in result["params"].items():
            torch.testing.assert_close(p, ddp[key]["params"][name], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(result["eval_logits"], ddp[key]["eval_logits"], rtol=1e-3, atol=1e-4)


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
@pytest.mark.slow
@pytest.mark.parametrize("wrapper", ["ddp", "fsdp"])
def test_a_compiled_ddp_or_fsdp_model_trains_with_ranks_identical(tmp_path, wrapper):
    """torch.compile around DDP and FSDP2 (issue 28): the ranks stay identical, switch stages together and
    evaluate alike, as uncompiled (aot_eager: the graphs as Inductor gets them, without its build time)."""
    flags = ("--compile", "aot_eager") + (("--fsdp",) if wrapper == "fsdp" else ())
    _check_ranks_agree(_torchrun(tmp_path, *flags))
