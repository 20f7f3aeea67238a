"""torch.compile and torch.export of transformed models (issue 28).

A transformed model compiles as one graph (``fullgraph=True``, no graph break) in train and eval, for
static, ladder and gated plans in simulate mode: the quantizer kernels run as ``torch.ops.fracpass.*`` with
their fakes, the stochastic rounding's seed is drawn in the graph from torch's generator (no
``int(tensor)``), and the gradient hooks decide from forward what they read of the gradient. With a
backend that keeps aten's arithmetic (``aot_eager``), compiled and eager give the same outputs, loss,
gradients, running ranges and generator state bit for bit after the same seed; Inductor re-fuses the
float32 ops around the quantizers (its BatchNorm, its reductions), which moves values by float32 rounding,
and a quantizer amplifies such a move into one step where a value lies next to a rounding boundary
(see test_inductor_stays_within_a_step). A stage switch recompiles once per stage, never per step.

Native execution compiles with a graph break at each native call (its products are autograd Functions
over pybind kernels, run eagerly between graphs): the same values as eager.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass.models import resnet20


class SmallNet(nn.Module):
    """Two convolutions with BatchNorm and ReLU (one in place), a residual add, a linear classifier."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        z = torch.relu_(self.bn2(self.conv2(y)) + y)
        return self.fc(z.mean((2, 3)))


def _data(n=8, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.randint(0, 10, (n,), generator=g)


class Counting:
    """A Dynamo backend that counts the graphs it is given, then runs them as aot_eager does."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)


def _step(model, params, x, y, seed=7, gated=False):
    """One forward and backward after ``torch.manual_seed(seed)``: (output, loss, gradients, buffers, the
    generator's next draw)."""
    torch.manual_seed(seed)
    out = model(x)
    loss = F.cross_entropy(out, y)
    if gated:
        loss = loss + fracpass.gate_loss(params)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in params.named_parameters() if p.grad is not None}
    for p in params.parameters():
        p.grad = None
    buffers = {n: b.clone() for n, b in params.named_buffers()}
    return out.detach(), loss.detach(), grads, buffers, torch.rand(())


def _assert_same(got, want):
    out, loss, grads, buffers, after = got
    assert torch.equal(out, want[0]) and torch.equal(loss, want[1])
    assert grads.keys() == want[2].keys() and len(grads) > 0
    for name in grads:
        assert torch.equal(grads[name], want[2][name]), name
    for name in buffers:
        assert torch.equal(buffers[name], want[3][name]), name
    assert torch.equal(after, want[4])  # the graph drew from torch's generator what eager drew


def _transform(model, plan, x, **kw):
    torch.manual_seed(0)
    return fracpass.transform(model, plan, example_inputs=(x,), **kw)


PLANS = {
    "static": lambda: fracpass.Plan.static(w=8, a=8, g=8, exclude=("conv1", "fc")),
    "ladder": lambda: fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), exclude=("conv1", "fc")),
    "gated": lambda: fracpass.Plan.fractrain("cifar"),
}


@pytest.mark.parametrize("plan", sorted(PLANS))
def test_resnet20_compiles_as_one_graph_and_equals_eager(plan):
    torch.manual_seed(0)
    x, y = _data(size=32)
    q = _transform(resnet20(), PLANS[plan](), x)
    explained = torch._dynamo.explain(q)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    eager, compiled = copy.deepcopy(q), copy.deepcopy(q)
    run = torch.compile(compiled, backend="aot_eager", fullgraph=True)
    gated = plan == "gated"
    for _ in range(2):  # the second step reads the running ranges the first one moved
        _assert_same(_step(run, compiled, x, y, gated=gated), _step(eager, eager, x, y, gated=gated))
    eager.eval(), compiled.eval()
    with torch.no_grad():
        torch.manual_seed(3)
        got = run(x)
        torch.manual_seed(3)
        assert torch.equal(got, eager(x))


def test_a_stage_switch_recompiles_once_per_stage():
    """A 4-stage ladder stepped by the Scheduler every 2 steps: 4 compilations in 8 steps, and each step
    equals the eager model's at the same stage."""
    x, y = _data()
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), switch=fracpass.AtSteps((2, 4, 6)))
    q = _transform(SmallNet(), plan, x)
    eager, compiled = copy.deepcopy(q), copy.deepcopy(q)
    backend = Counting()
    run = torch.compile(compiled, backend=backend, fullgraph=True)
    schedulers = fracpass.Scheduler(eager), fracpass.Scheduler(compiled)
    stages = []
    for i in range(8):
        want, got = _step(eager, eager, x, y, seed=i), _step(run, compiled, x, y, seed=i)
        _assert_same(got, want)
        stages.append(schedulers[1].stage)
        for s, loss in zip(schedulers, (want[1], got[1])):
            s.step(loss)
    assert stages == [0, 0, 1, 1, 2, 2, 3, 3]
    assert backend.graphs == 4


def test_set_stage_on_a_compiled_model():
    x, y = _data()
    q = _transform(SmallNet(), PLANS["ladder"](), x)
    eager = copy.deepcopy(q)
    run = torch.compile(q, backend="aot_eager", fullgraph=True)
    for stage in (3, 0):
        fracpass.set_stage(q, stage), fracpass.set_stage(eager, stage)
        _assert_same(_step(run, q, x, y), _step(eager, eager, x, y))


def test_native_execution_compiles_with_a_break_at_each_native_call():
    x, y = _data()
    q = _transform(SmallNet(), fracpass.Plan.static(8, 8, 8), x, execution="native")
    natives = [n for n in q.graph.nodes if n.op == "call_function" and "native" in n.target.__module__]
    assert natives, "the plan lowers the convolutions and the linear layer to native calls"
    eager, compiled = copy.deepcopy(q), copy.deepcopy(q)
    run = torch.compile(compiled, backend="aot_eager")
    for _ in range(2):
        _assert_same(_step(run, compiled, x, y), _step(eager, eager, x, y))
    with pytest.raises(Exception, match=r"torch\.compiler\.disable"):
        torch.compile(copy.deepcopy(q), backend="aot_eager", fullgraph=True)(x)
