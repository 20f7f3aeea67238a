"""Attention hidden in nn.MultiheadAttention or in a torch.fx.wrap'ped function (issue 13, item 3).

fx keeps ``nn.MultiheadAttention`` as a leaf and a wrapped function as one opaque call. fracpass
traces into the former (``fracpass.traced``) and quantizes its projections and attention products;
``coverage`` and ``cost`` count what stays opaque with FlopCounterMode's rules, as unquantized.
"""
import copy

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fracpass
import patterns
from fracpass.costing import CPU_ATTENTION_FLOPS
from patterns import PATTERNS
from test_real_patterns import _units, train_steps

PLAN = fracpass.Plan.static(w=4, a=4, g=8)
FULL = fracpass.Plan.static(w=32, a=32, g=32)


def reference_macs(model, x):
    """torch.utils.flop_counter's forward and backward MACs (CPU attention added: torch 2.13 leaves it out)."""
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        out = model(x)
    forward = counter.get_total_flops() // 2
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        model(x).float().pow(2).mean().backward()
    return forward, counter.get_total_flops() // 2 - forward


def transformed(name, plan=PLAN, **kwargs):
    factory, make_input = PATTERNS[name]
    torch.manual_seed(0)
    model = factory()
    return model, fracpass.transform(model, plan, example_inputs=(make_input(2),), **kwargs), make_input


def mha_ops(qmodel):
    """Compute ops captured from inside nn.MultiheadAttention, by kind."""
    return [(n.name, fracpass.meta.op_info(n).kind) for n in qmodel.graph.nodes
            if fracpass.meta.op_info(n) is not None and "self_attention" in fracpass.meta.op_info(n).module_path]


def quantizer_roles(qmodel, op):
    return sorted(fracpass.meta.inserted(n).role for n in qmodel.graph.nodes
                  if fracpass.meta.inserted(n) is not None and fracpass.meta.inserted(n).source == op)


# -- nn.MultiheadAttention ---------------------------------------------------------------------------
@pytest.mark.parametrize("need_weights, product", [(False, "sdpa"), (True, "bmm")])
def test_multihead_attention_internals_get_every_quantizer(need_weights, product):
    _, qmodel, _ = transformed("multihead_attention") if not need_weights else \
        (None, fracpass.transform(patterns.ViTLike(need_weights=True), PLAN,
                                  example_inputs=(PATTERNS["multihead_attention"][1](2),)), None)
    ops = mha_ops(qmodel)
    kinds = [k for _, k in ops]
    per_block = ["linear", product, "linear"] if product == "sdpa" else ["linear", "bmm", "bmm", "linear"]
    assert kinds == per_block * 2
    assert not any(n.op == "call_module" and isinstance(qmodel.get_submodule(n.target), nn.MultiheadAttention)
                   for n in qmodel.graph.nodes)
    for name, kind in ops:
        roles = quantizer_roles(qmodel, name)
        if kind == "linear":  # in- and out-projection: the packed weight is quantized per output channel
            assert roles == ["act", "grad", "weight"]
        elif kind == "sdpa":  # q, k, v
            assert roles == ["act", "act", "act", "grad"]
        else:  # both attention products: two activations each
            assert roles == ["act", "act", "grad"]
    in_proj = next(n for n in qmodel.graph.nodes if n.name == ops[0][0] + "_wq")
    assert qmodel.get_submodule(in_proj.target).axis == 0
    assert str(in_proj.args[0].target) == "layers.0.self_attention.in_proj_weight"
    cov = fracpass.coverage(qmodel)
    assert cov.minimum == 1.0 and cov.fraction("act", "macs") == 1.0 and cov.unquantized == []


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [False, True, None], ids=["no-weights", "weights", "default"])
def test_multihead_attention_at_32_bits_is_bit_identical(batch_first, need_weights):
    torch.manual_seed(0)
    model = patterns.ViTLike(batch_first=batch_first, need_weights=need_weights)
    for block in model.layers:
        block.self_attention.dropout = 0.1  # the dropout on the attention weights draws the same numbers
    x = torch.randn(3, 3, 8, 8)
    qmodel = fracpass.transform(model, FULL, example_inputs=(x,))
    assert len(mha_ops(qmodel)) >= 6
    reference = copy.deepcopy(model)
    for mode in (True, False, True):
        reference.train(mode)
        qmodel.train(mode)
        results = []
        for m in (reference, qmodel):
            m.zero_grad(set_to_none=True)
            torch.manual_seed(1)
            out = m(x)
            out.pow(2).mean().backward()
            results.append((out.detach(), {k: p.grad for k, p in m.named_parameters() if p.grad is not None}))
        (ref, ref_grads), (out, grads) = results
        assert torch.equal(out, ref), f"train={mode}"
        assert grads.keys() == ref_grads.keys()
        assert all(torch.equal(grads[k], ref_grads[k]) for k in grads), f"train={mode}"


def test_multihead_attention_under_no_grad_in_eval_agrees_to_rounding():
    """There the module takes its fused fast path, which sums in another order (fracpass.traced)."""
    model, qmodel, make_input = transformed("multihead_attention", FULL)
    model.eval()
    qmodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(qmodel(make_input(3)), model(make_input(3)), rtol=1e-5, atol=1e-6)


def test_multihead_attention_cost_matches_the_flop_counter_and_the_model_trains_and_exports(tmp_path):
    model, qmodel, make_input = transformed("multihead_attention")
    forward, _ = reference_macs(model, make_input(2))
    report = fracpass.cost(qmodel)
    assert report.forward_macs.per_batch == pytest.approx(forward, rel=0.01)
    assert not report.not_costed and all(op.kind != "opaque" for op in report.ops)
    loss, grads = train_steps(qmodel, make_input)
    assert torch.isfinite(loss) and grads["layers.0.self_attention.in_proj_weight"].abs().sum() > 0
    fracpass.export_onnx(qmodel, tmp_path / "vit.onnx")  # verified against onnxruntime


def test_gates_leave_the_attention_residuals_whose_ops_run_sequence_first():
    """Block gates would find both residuals of every block, but the attention one's ops run inside
    nn.MultiheadAttention on (L, B, E) and (L*B, E) tensors, where per-sample rows cannot be read off
    dim 0: only the MLP residuals are gated (tests/test_real_patterns.py trains it at batch == L)."""
    qmodel = fracpass.transform(patterns.ViTLike(), PLAN.with_gates(fracpass.Gates()),
                                example_inputs=(PATTERNS["multihead_attention"][1](2),))
    units = _units(qmodel)
    assert [u.name for u in units] == ["layers_0_mlp", "layers_1_mlp"]
    attention = dict(mha_ops(qmodel))
    assert attention and not any(op in attention for u in units for op in u.ops)


def test_multihead_attention_kept_as_a_leaf_is_counted_as_unquantized():
    model, qmodel, make_input = transformed("multihead_attention", leaf_modules=[nn.MultiheadAttention])
    forward, backward = reference_macs(model, make_input(2))
    report = fracpass.cost(qmodel)
    assert report.forward_macs.per_batch == pytest.approx(forward, rel=0.01)
    assert report.backward_macs.per_batch == pytest.approx(backward, rel=0.01)
    leaves = [op for op in report.ops if op.kind == "opaque"]
    assert [op.op for op in leaves] == ["layers_0_self_attention", "layers_1_self_attention"]
    assert all(op.w == op.a == op.g == (32,) for op in leaves)
    cov = fracpass.coverage(qmodel)
    assert cov.ops["act"] == (6, 8) and cov.minimum < 1.0
    assert cov.fraction("act", "macs") == pytest.approx(1 - 2 * leaves[0].forward_macs / forward)
    assert "not quantized: layers_0_self_attention [act,grad,weight]: inside leaf module 'layers.0.self_attention' " \
           "(MultiheadAttention)" in str(cov)
    assert "(11,840 forward MACs)" in str(cov)


def test_multihead_attention_with_a_mask_stays_a_leaf_and_is_counted():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x, mask):
            return self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0])

    x, mask = torch.randn(2, 5, 8), torch.zeros(5, 5)
    model = Masked()
    qmodel = fracpass.transform(model, PLAN, example_inputs=(x, mask))
    cov = fracpass.coverage(qmodel)
    assert any(op == "attn" and "inside leaf module 'attn'" in why for op, _, why in cov.unquantized)
    assert cov.fraction("act", "macs") < 0.1  # the head is 2 % of the MACs
    with FlopCounterMode(display=False, custom_mapping=CPU_ATTENTION_FLOPS) as counter:
        model(x, mask)
    assert fracpass.cost(qmodel).forward_macs.per_batch == pytest.approx(counter.get_total_flops() // 2, rel=0.01)


# -- a torch.fx.wrap'ped attention function ----------------------------------------------------------
def test_wrapped_function_is_counted_as_an_unquantized_opaque_call():
    model, qmodel, make_input = transformed("fx_wrapped_attention")
    forward, backward = reference_macs(model, make_input(2))
    report = fracpass.cost(qmodel)
    assert report.forward_macs.per_batch == pytest.approx(forward, rel=0.01)
    assert report.backward_macs.per_batch == pytest.approx(backward, rel=0.01)
    (opaque,) = [op for op in report.ops if op.kind == "opaque"]
    assert opaque.op == "window_attention" and opaque.g == (32,)
    assert "opaque call 'window_attention'" in opaque.excluded and "capture_method='export'" in opaque.excluded
    cov = fracpass.coverage(qmodel)
    assert cov.ops["act"] == (4, 5) and cov.minimum == pytest.approx(0.8)
    assert cov.fraction("grad", "macs") == pytest.approx(1 - opaque.forward_macs / forward)
    assert cov.fraction("grad", "macs") < 0.5
    assert "not quantized: window_attention [act,grad,weight]: opaque call 'window_attention'" in str(cov)
    assert "window_attention" in str(report)


def test_wrapped_function_is_quantized_when_captured_with_export(tmp_path):
    """The wrapped function's Python branches on shapes stop fx, not torch.export."""
    model, qmodel, make_input = transformed("fx_wrapped_attention", capture_method="export")
    kinds = [fracpass.meta.op_info(n).kind for n in qmodel.graph.nodes if fracpass.meta.op_info(n) is not None]
    assert kinds == ["conv2d", "linear", "matmul", "matmul", "linear", "linear", "linear", "linear"]
    cov = fracpass.coverage(qmodel)
    assert cov.minimum == 1.0 and cov.fraction("act", "macs") == 1.0
    forward, _ = reference_macs(model, make_input(2))
    assert fracpass.cost(qmodel).forward_macs.per_batch == pytest.approx(forward, rel=0.01)
    gated = fracpass.transform(model, PLAN.with_gates(fracpass.Gates()), example_inputs=(make_input(2),),
                               capture_method="export")
    assert [u.name for u in _units(gated)] == ["attn", "mlp"]
    loss, _ = train_steps(gated, make_input)
    assert torch.isfinite(loss)
    train_steps(qmodel, make_input)
    fracpass.export_onnx(qmodel, tmp_path / "swin.onnx")


def test_coverage_without_example_inputs_still_counts_the_opaque_call():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = patterns.WindowAttention(16, 2, 3)
            self.head = nn.Linear(16, 2)

        def forward(self, x):
            return self.head(self.attn(x))

    qmodel = fracpass.transform(Plain(), PLAN)  # fx needs no example inputs; MACs are then unknown
    cov = fracpass.coverage(qmodel)
    assert cov.macs == {}
    assert cov.ops["act"] == (1, 2)


class _AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)

    def forward(self, x):
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.mlp(x)


class _TinyAttention(nn.Module):
    """print(model) shows blocks.0.attn.out_proj; the in-projection is blocks.0.attn's in_proj_weight."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.Sequential(_AttentionBlock())
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.blocks(x).mean(1))


def _bits_by_module(qmodel):
    return {fracpass.meta.op_info(n).module_path: (fracpass.meta.qspec(n).w[0], fracpass.meta.qspec(n).a[0])
            for n in qmodel.graph.nodes if fracpass.meta.op_info(n) is not None and fracpass.meta.op_info(n).kind == "linear"}


@pytest.mark.parametrize("method", ["fx", "export"])
def test_rules_tell_multihead_attentions_in_and_out_projections_apart(method):
    plan = fracpass.Plan.static(8, 8, 8, rules=[fracpass.Rule(match="blocks.*.attn.out_proj", w=4, a=4, g=8),
                                                fracpass.Rule(match="blocks.*.attn.in_proj", w=6, a=6, g=8)])
    qmodel = fracpass.transform(_TinyAttention(), plan, example_inputs=(torch.randn(2, 5, 16),), capture_method=method)
    assert _bits_by_module(qmodel) == {"blocks.0.attn.in_proj": (6, 6), "blocks.0.attn.out_proj": (4, 4),
                                       "blocks.0.mlp": (8, 8), "head": (8, 8)}
    assert "blocks.0.attn.out_proj" in fracpass.summary(qmodel)
    # a rule on the attention module still covers everything inside it
    whole = fracpass.transform(_TinyAttention(), fracpass.Plan.static(8, 8, 8, exclude=("blocks.*.attn",)),
                               example_inputs=(torch.randn(2, 5, 16),), capture_method=method)
    inside = [fracpass.meta.qspec(n).excluded for n in whole.graph.nodes
              if fracpass.meta.op_info(n) is not None and "attn" in fracpass.meta.op_info(n).module_path]
    assert len(inside) == 3 and all(inside)


def test_separate_q_k_v_projections_are_named_by_their_weights():
    class Cross(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True)

        def forward(self, x, memory):
            return self.attn(x, memory, memory, need_weights=False)[0]

    qmodel = fracpass.transform(Cross(), fracpass.Plan.static(8, 8, 8),
                                example_inputs=(torch.randn(2, 5, 16), torch.randn(2, 3, 8)))
    assert sorted(_bits_by_module(qmodel)) == ["attn.k_proj", "attn.out_proj", "attn.q_proj", "attn.v_proj"]


def test_gates_say_which_attention_residuals_they_leave_ungated_and_why(caplog):
    plan = fracpass.Plan.static(8, 8, 8).with_gates(fracpass.Gates(a=(4, 8), g=(8, 8), w=8, target=50.0))
    with caplog.at_level("WARNING", logger="fracpass.passes.find_units"):
        qmodel = fracpass.transform(_TinyAttention(), plan, example_inputs=(torch.randn(2, 5, 16),))
        qmodel.eval()  # the eval-mode re-capture does not say it again
    said = [r.getMessage() for r in caplog.records if r.name == "fracpass.passes.find_units"]
    assert len(said) == 1, said
    assert said[0].startswith("find-gated-units: 1 residual block(s) left ungated: blocks_0_attn (blocks.0.attn, "
                              "blocks.0.attn.in_proj, blocks.0.attn.out_proj)")
    assert "inside nn.MultiheadAttention, which computes sequence-first" in said[0]
    assert qmodel.fracpass.stats[True]["find-gated-units"]["ungated_attention_units"] == ("blocks_0_attn",)
    assert [u for u, _ in fracpass.passes.insert_gates.unit_summary(qmodel)] == ["blocks_0_mlp"]
    text = fracpass.summary(qmodel)  # summary says it too, beside the units it lists
    assert "  unit blocks_0_mlp:" in text
    assert "  left ungated: blocks_0_attn (their ops run inside nn.MultiheadAttention, sequence-first" in text
