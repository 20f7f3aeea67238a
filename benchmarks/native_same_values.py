"""Native execution's values before and after a change, bit for bit (issue 27's check of the package split).

    python benchmarks/native_same_values.py OUT.pt          # in each checkout's environment
    python benchmarks/native_same_values.py compare A.pt B.pt

Runs ResNet-20 (NCHW and channels_last, the 3/4/6/8 ladder at stages 0 and 3, channels_last per-tensor at 8/8/8),
a transformer (4/8 ladder) and a gated ``Plan.fractrain("cifar")`` ResNet-20, two training steps each with fixed
seeds, and saves every output and gradient plus each op's path. The int8 and bf16 units are claimed, so that the
native paths run on any CPU (slowly where it lacks them): the values compare the code, not the machine. It works
with the module of 5cdc406 (``fracpass/native.py``, thresholds as globals) and with the package
(``NativeOptions``). ``compare`` prints how many tensors differ. Run both saves with the same thread count
(``OMP_NUM_THREADS=1``): aten's reductions sum in another order with another count."""
import sys, torch, fracpass
from fracpass.models import resnet20, transformer

FLAGS = frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_int8", "amx_bf16"})
NEW = hasattr(fracpass, "NativeOptions")
if NEW:
    from fracpass.native import units
    units._cpu_flags = lambda: FLAGS
else:
    import fracpass.native as n
    n._cpu_flags = lambda: FLAGS
    n.MIN_CONV_MACS = 0
    n.MIN_INTENSITY = 0.0
    n.MIN_BMM_INTENSITY = 0.0


def transform(model, plan, x):
    kw = dict(native=fracpass.NativeOptions(min_conv_macs=0, min_intensity=0.0, min_bmm_intensity=0.0)) if NEW else {}
    return fracpass.transform(model, plan, example_inputs=(x,), execution="native", **kw)


def case(name, make, plan, x, y=None, channels_last=False, stages=(0, -1), steps=2):
    torch.manual_seed(0)
    q = transform(make(), plan, x)
    if channels_last:
        q = q.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    out = {}
    for stage in stages:
        fracpass.set_stage(q, stage if stage >= 0 else plan.num_stages - 1)
        for step in range(steps):
            torch.manual_seed(100 + step)
            q.zero_grad(set_to_none=True)
            o = q(x)
            loss = o.float().pow(2).mean() if y is None else torch.nn.functional.cross_entropy(o, y)
            loss.backward()
            out[f"{name}/s{stage}/{step}/out"] = o.detach().clone()
            for k, p in q.named_parameters():
                if p.grad is not None:
                    out[f"{name}/s{stage}/{step}/{k}"] = p.grad.clone()
    paths = fracpass.native.op_paths(q)
    out[f"{name}/paths"] = sorted((k, v[0]) for k, v in paths.items())
    return out


def main(path):
    torch.manual_seed(0)
    xr, yr = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    xt = torch.randint(0, 100, (4, 16))
    ladder = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), exclude=("conv1", "fc"))
    res = {}
    res.update(case("r20_nchw_ladder", resnet20, ladder, xr, yr))
    res.update(case("r20_cl_ladder", resnet20, ladder, xr, yr, channels_last=True))
    try:
        pt = fracpass.Plan.static(w=8, a=8, g=8, rules=(fracpass.Rule(weight_scale="tensor"),))
    except TypeError:
        import dataclasses
        pt = dataclasses.replace(fracpass.Plan.static(w=8, a=8, g=8), rules=(fracpass.Rule(weight_scale="tensor"),))
    res.update(case("r20_cl_pertensor", resnet20, pt, xr, yr, channels_last=True, stages=(0,)))
    res.update(case("transformer", transformer, fracpass.Plan.progressive(fw=(4, 8), bw=(8, 8)), xt))
    res.update(case("r20_gated", resnet20, fracpass.Plan.fractrain("cifar"), xr, yr, stages=(0, -1)))
    torch.save(res, path)
    print("saved", len(res), "entries")


def compare(a, b):
    A, B = torch.load(a, weights_only=False), torch.load(b, weights_only=False)
    assert A.keys() == B.keys(), set(A) ^ set(B)
    bad = []
    for k in A:
        if isinstance(A[k], torch.Tensor):
            if not torch.equal(A[k], B[k]):
                bad.append((k, float((A[k] - B[k]).abs().max())))
        elif A[k] != B[k]:
            bad.append((k, A[k], B[k]))
    print(f"{len(A)} entries, {len(bad)} differ")
    for b_ in bad[:20]:
        print(" ", b_)
    paths = [v for k, v in A.items() if k.endswith("/paths")]
    print("paths seen:", sorted({p for v in paths for _, p in v}))


if __name__ == "__main__":
    compare(sys.argv[2], sys.argv[3]) if sys.argv[1] == "compare" else main(sys.argv[1])
