"""Per op kind: the registry classifies it on both capture paths and the passes quantize it right."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass import meta, registry


class _Wrap(nn.Module):
    def __init__(self, fn, **params):
        super().__init__()
        self.fn = fn
        for name, p in params.items():
            setattr(self, name, nn.Parameter(p))


class _Wrap1(_Wrap):
    def forward(self, x):
        return self.fn(self, x)


class _Wrap2(_Wrap):
    def forward(self, a, b):
        return self.fn(self, a, b)


class _Wrap3(_Wrap):
    def forward(self, a, b, c):
        return self.fn(self, a, b, c)


def Wrap(fn, **params):
    """A module whose forward is ``fn(self, *inputs)`` with a fixed arity, so fx can trace it."""
    return {1: _Wrap1, 2: _Wrap2, 3: _Wrap3}[fn.__code__.co_argcount - 1](fn, **params)


r = lambda *s: torch.randn(*s)
# name -> (module, inputs, kind, #activation quantizers, #weight quantizers, weight axis, traits)
CASES = {
    "conv1d": (nn.Conv1d(3, 4, 3), (r(2, 3, 9),), "conv1d", 1, 1, 0, ()),
    "conv2d": (nn.Conv2d(3, 4, 3), (r(2, 3, 6, 6),), "conv2d", 1, 1, 0, ()),
    "conv3d": (nn.Conv3d(2, 4, 3), (r(2, 2, 4, 4, 4),), "conv3d", 1, 1, 0, ()),
    "conv2d_grouped": (nn.Conv2d(4, 8, 3, groups=2), (r(2, 4, 6, 6),), "conv2d", 1, 1, 0, ("grouped",)),
    "conv2d_depthwise": (nn.Conv2d(4, 4, 3, groups=4), (r(2, 4, 6, 6),), "conv2d", 1, 1, 0, ("grouped", "depthwise")),
    "conv2d_reflect": (nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"), (r(2, 3, 6, 6),), "conv2d", 1, 1, 0, ()),
    # wrapped: fx traces the root's own forward, and ConvTranspose's has shape-dependent control flow
    "conv_transpose1d": (nn.Sequential(nn.ConvTranspose1d(3, 4, 3, stride=2)), (r(2, 3, 5),), "conv_transpose1d", 1, 1, 1, ()),
    "conv_transpose2d": (nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2)), (r(2, 4, 5, 5),), "conv_transpose2d", 1, 1, 1,
                         ("grouped",)),
    "linear": (nn.Linear(5, 3), (r(2, 5),), "linear", 1, 1, 0, ()),
    "F.linear": (Wrap(lambda m, x: F.linear(x, m.w), w=r(3, 5)), (r(2, 5),), "linear", 1, 1, 0, ()),
    "F.conv2d": (Wrap(lambda m, x: F.conv2d(x, m.w, stride=2), w=r(4, 3, 3, 3)), (r(2, 3, 7, 7),), "conv2d", 1, 1, 0, ()),
    "matmul_act_act": (Wrap(lambda m, a, b: torch.matmul(a, b)), (r(2, 3, 4), r(2, 4, 5)), "matmul", 2, 0, None, ()),
    "@_param_right": (Wrap(lambda m, x: x @ m.w, w=r(4, 6)), (r(2, 4),), "matmul", 1, 1, -1, ()),
    "matmul_param_left": (Wrap(lambda m, x: m.w @ x, w=r(6, 4)), (r(4, 3),), "matmul", 1, 1, -2, ()),
    "mm": (Wrap(lambda m, a: torch.mm(a, m.w), w=r(4, 6)), (r(3, 4),), "mm", 1, 1, -1, ()),
    "bmm": (Wrap(lambda m, a, b: torch.bmm(a, b)), (r(2, 3, 4), r(2, 4, 5)), "bmm", 2, 0, None, ()),
    "addmm": (Wrap(lambda m, x: torch.addmm(m.b, x, m.w), b=r(6), w=r(4, 6)), (r(3, 4),), "addmm", 1, 1, -1, ()),
    "baddbmm": (Wrap(lambda m, c, a, b: torch.baddbmm(c, a, b)), (r(2, 3, 5), r(2, 3, 4), r(2, 4, 5)), "baddbmm", 2, 0,
                None, ()),
    "sdpa": (Wrap(lambda m, q, k, v: F.scaled_dot_product_attention(q, k, v)), (r(2, 2, 5, 4), r(2, 2, 5, 4), r(2, 2, 5, 4)),
             "sdpa", 3, 0, None, ()),
    "einsum": (Wrap(lambda m, x: torch.einsum("bi,io->bo", x, m.w), w=r(4, 6)), (r(3, 4),), "einsum", 1, 1, 1, ()),
    "einsum_act": (Wrap(lambda m, a, b: torch.einsum("bij,bjk->bik", a, b)), (r(2, 3, 4), r(2, 4, 5)), "einsum", 2, 0,
                   None, ()),
}


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_op_kind_is_quantized(case, method):
    module, inputs, kind, n_act, n_weight, axis, traits = CASES[case]
    qmodel = fracpass.transform(module, fracpass.Plan.static(4, 4, 8), example_inputs=inputs, capture_method=method)
    ops = [n for n in qmodel.graph.nodes if meta.op_info(n)]
    assert len(ops) == 1, [n.format_node() for n in ops]
    op, info = ops[0], meta.op_info(ops[0])
    assert info.kind == kind and info.traits == traits
    inserted = [n for n in qmodel.graph.nodes if meta.inserted(n)]
    roles = sorted(meta.inserted(n).role for n in inserted)
    assert roles == sorted(["act"] * n_act + ["weight"] * n_weight + ["grad"])
    # act and weight quantizers feed the op directly; the grad quantizer is the op's only user
    feeding = {a for a in op.all_input_nodes if meta.inserted(a)}
    assert len(feeding) == n_act + n_weight
    assert [meta.inserted(u).role for u in op.users] == ["grad"]
    wqs = [m for _, m in fracpass.quantizers(qmodel) if m.role == "weight"]
    if n_weight:
        assert wqs[0].axis == axis
    # numerics: at 32 bits outputs equal the original; at 4 bits they are close but not equal
    fracpass.set_stage(qmodel, 0)
    with torch.no_grad():
        ref = module(*inputs)
        out = qmodel(*inputs)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert (out - ref).abs().max() <= 0.5 * ref.abs().max() + 0.5
    exact = fracpass.transform(module, fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(4, 4, 8))),
                               example_inputs=inputs, capture_method=method)
    with torch.no_grad():
        assert torch.equal(exact(*inputs), ref)


def test_non_contraction_einsum_is_not_a_compute_op():
    module = Wrap(lambda m, x: torch.einsum("ij->ji", x))
    qmodel = fracpass.transform(module, fracpass.Plan.static(4, 4, 8))
    assert not any(meta.op_info(n) for n in qmodel.graph.nodes)


def test_registered_kinds_cover_the_issue_list():
    assert set(registry.registered_kinds()) >= {
        "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "linear", "matmul", "mm", "bmm",
        "addmm", "baddbmm", "sdpa", "einsum"}


def my_op(x, w):
    return x @ w.t()


torch.fx.wrap("my_op")  # fx records calls to it as one call_function node


def test_registering_a_new_kind():
    entry = registry.register(registry.OpKind(
        "my_op", (registry.Operand(0, "x", "act"), registry.Operand(1, "w", "weight", axis=0)), functions=(my_op,)))
    try:
        module = Wrap(lambda m, x: my_op(x, m.w), w=torch.randn(3, 5))
        gm = torch.fx.symbolic_trace(module)
        node = next(n for n in gm.graph.nodes if n.op == "call_function")
        assert node.target is my_op
        info = registry.classify(gm, node)
        assert info.kind == "my_op" and info.act_args == ((0,),) and info.weight_args == ((1,),)
    finally:
        registry._KINDS.pop("my_op"), registry._BY_FUNCTION.pop(my_op)
    assert entry.kind == "my_op"


def test_module_without_lowering_gets_a_registry_error():
    class Custom(nn.Linear):
        pass

    registry.register(registry.OpKind("custom_linear", (registry.Operand(0, "input", "act"),), modules=(Custom,)))
    try:
        with pytest.raises(fracpass.RegistryError, match=r"op kind 'custom_linear' has no lowering.*add `lower=`"):
            fracpass.transform(nn.Sequential(Custom(3, 3)), fracpass.Plan.static(), leaf_modules=[Custom])
        # excluded, it is left alone
        q = fracpass.transform(nn.Sequential(Custom(3, 3)), fracpass.Plan.static(exclude=("0",)), leaf_modules=[Custom])
        assert not list(fracpass.quantizers(q))
    finally:
        registry._KINDS.pop("custom_linear"), registry._BY_MODULE.pop(Custom)
