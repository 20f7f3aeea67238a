"""Step time of ResNet-20 at 8/8/8 (batch 128, 2 threads): gradient quantizers as tensor hooks on the
op's output (since 20e0da0, so in-place users of that output are allowed) against the autograd.Function
that returned a view before, swapped in the same process, rounds interleaved in alternating order.

    python benchmarks/grad_hook_overhead.py
"""
import statistics
import time

import torch, torch.nn.functional as F
import fracpass
from fracpass import quant
from fracpass.models import resnet20

class OldFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, bits):
        ctx.bits = bits
        return x.view_as(x)
    @staticmethod
    def backward(ctx, grad):
        return quant.quantize_grad_stochastic(grad, ctx.bits), None

hook = quant._GradQuantFn
torch.set_num_threads(2)
torch.manual_seed(0)
q = fracpass.transform(resnet20(), fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(2, 3, 32, 32),))
opt = torch.optim.SGD(q.parameters(), lr=0.01)
x, y = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
def step():
    t = time.perf_counter()
    loss = F.cross_entropy(q(x), y); opt.zero_grad(); loss.backward(); opt.step()
    return time.perf_counter() - t
for _ in range(3): step()
res = {"hook": [], "function": []}
for r in range(10):
    for name, impl in ((("hook", hook), ("function", OldFn)) if r % 2 == 0 else (("function", OldFn), ("hook", hook))):
        quant._GradQuantFn = impl
        res[name].append(statistics.median([step() for _ in range(3)]))
ratios = [h / f for h, f in zip(res["hook"], res["function"])]
print({k: round(statistics.median(v) * 1000, 1) for k, v in res.items()}, "ms; hook/function per round: median %.3f (%.3f-%.3f)" % (statistics.median(ratios), min(ratios), max(ratios)))
