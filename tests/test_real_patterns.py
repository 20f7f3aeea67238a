"""Patterns of real torchvision / timm models (tests/patterns.py): train, gates, export (issue 13)."""
import copy

import pytest
import torch
from torch import nn

import fracpass
import patterns
from patterns import INPLACE_OPS, PATTERNS

PLAN = fracpass.Plan.static(w=4, a=4, g=8)


def train_steps(qmodel, make_input, steps=2, seed=0):
    """A few SGD steps on a synthetic loss (plus the gate loss); returns the last step's gradients."""
    torch.manual_seed(seed)
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.01)
    for i in range(steps):
        out = qmodel(make_input(4 + i))
        loss = out.float().pow(2).mean() + fracpass.gate_loss(qmodel)
        opt.zero_grad()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in qmodel.named_parameters() if p.grad is not None}
        opt.step()
    return loss, grads


def _pair(op, plan):
    """The in-place model and its out-of-place twin, transformed alike (same weights, same seed)."""
    x = torch.randn(2, 4, 6, 6)
    made = []
    for inplace in (True, False):
        torch.manual_seed(0)
        model = patterns.InplaceAfter(op, inplace=inplace)
        # leaves: the ops run eagerly, as written (fx would trace `x += 1` as an out-of-place add)
        made.append(fracpass.transform(model, plan, example_inputs=(x,), leaf_modules=[patterns._Call]))
    return made


def _image(b):
    return torch.randn(b, 4, 6, 6, generator=torch.Generator().manual_seed(b))


# -- item 1: in-place ops on a quantized op's output -------------------------------------------------
@pytest.mark.parametrize("op", INPLACE_OPS)
@pytest.mark.parametrize("gated", [False, True], ids=["static", "gated"])
def test_inplace_op_on_a_quantized_output_trains_with_the_out_of_place_gradients(op, gated):
    plan = PLAN.with_gates(fracpass.Gates()) if gated else PLAN
    inplace, reference = _pair(op, plan)
    loss, grads = train_steps(inplace, _image)
    ref_loss, ref_grads = train_steps(reference, _image)
    assert torch.equal(loss, ref_loss)
    assert grads.keys() == ref_grads.keys() and "conv1.weight" in grads
    for name in grads:
        # the same stochastically rounded gradients (bit for bit but for SELU, whose in-place backward
        # works from its result: 4e-7 apart, far below one quantization step, 1/255 of the range)
        diff, scale = (grads[name] - ref_grads[name]).abs().max(), ref_grads[name].abs().max()
        assert diff <= 1e-5 * scale, (name, diff, scale)


def test_the_gradient_quantizer_still_quantizes_under_an_inplace_op():
    """conv1's output gradient, seen just before the in-place ReLU, reaches conv1 on a 2^g-level grid."""
    inplace, _ = _pair("ReLU", fracpass.Plan.static(w=32, a=32, g=2))
    seen = []
    # a hook registered after the quantizer's, on the same tensor, receives what the quantizer returned
    inplace.act1.register_forward_pre_hook(lambda m, args: args[0].register_hook(seen.append) and None)
    inplace(_image(4)).pow(2).mean().backward()
    assert len(seen) == 1 and 1 < seen[0].unique().numel() <= 4  # at most 2^2 levels, not the raw gradient


@pytest.mark.parametrize("op", INPLACE_OPS)
def test_inplace_op_model_exports_after_training(op, tmp_path):
    inplace, _ = _pair(op, PLAN)
    train_steps(inplace, _image)
    if op == "Threshold":  # torch.onnx's own limit, whatever fracpass does
        with pytest.raises(fracpass.ExportError, match="ONNX export of operator threshold, non-zero threshold"):
            fracpass.export_onnx(inplace, tmp_path / "m.onnx")
        return
    fracpass.export_onnx(inplace, tmp_path / "m.onnx")  # verified against PyTorch at two batch sizes


# -- item 2: gated units on real graphs ----------------------------------------------------------------
def gated_model(name, granularity="block"):
    factory, make_input = PATTERNS[name]
    torch.manual_seed(0)
    plan = PLAN.with_gates(fracpass.Gates(granularity=granularity))
    return fracpass.transform(factory(), plan, example_inputs=(make_input(2),)), make_input


def _units(qmodel):
    return sorted((fracpass.meta.unit(n) for n in qmodel.graph.nodes if fracpass.meta.unit(n) is not None),
                  key=lambda u: u.index)


def test_a_unit_whose_ops_start_before_earlier_units_gets_its_gate_in_time():
    """LR-ASPP: the head's add is reached from the low branch on both sides, so its unit holds the
    high stage's downsampling conv, which runs before the high stage's residual blocks."""
    qmodel, make_input = gated_model("lraspp_head")
    order = {n.name: i for i, n in enumerate(qmodel.graph.nodes)}
    units = _units(qmodel)
    head = next(u for u in units if "down_0" in u.ops)
    low = next(n for n in qmodel.graph.nodes if n.name == "low_classifier").args[0]
    assert head.input == low.name  # the low branch: what both sides of the head's add are reached from
    assert head.ops == ("down_0", "cbr_0", "scale_1", "high_classifier")
    # the shared LSTM visits the units in the order their first ops run, and every gate comes before its ops
    firsts = [min(order[o] for o in u.ops) for u in units]
    assert firsts == sorted(firsts)
    for u in units:
        assert order[f"gate_{u.name}_choice"] < min(order[o] for o in u.ops)
    loss, _ = train_steps(qmodel, make_input)
    assert torch.isfinite(loss) and fracpass.gate_stats(qmodel).units.keys() == {u.name for u in units}


@pytest.mark.parametrize("name", ["chunk_block", "unbind_block"])
def test_a_unit_fed_by_a_multi_output_op_reads_the_output_its_branch_uses(name):
    qmodel, make_input = gated_model(name)
    (unit,) = _units(qmodel)
    source = next(n for n in qmodel.graph.nodes if n.name == unit.input)
    assert source.target is __import__("operator").getitem and source.args[1] == 0  # `a`, which conv1 reads
    assert unit.ops == ("conv1", "conv2")
    assert qmodel.gates.get_submodule(unit.name).fc1.in_features == 4  # a's 4 channels, not the tuple
    loss, _ = train_steps(qmodel, make_input)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("granularity, what", [
    ("block", r"found no residual block \(an add of a branch"),
    ("op", r"found no quantized compute op on the model's data path in .*; check the plan's exclude rules")])
def test_no_unit_message_reads_as_a_sentence(granularity, what):
    plan = fracpass.Plan.static(w=4, a=4, g=8, rules=(fracpass.Rule(match="*", exclude=True, reason="kept"),)) \
        if granularity == "op" else PLAN
    factory, make_input = PATTERNS["fire"]
    with pytest.raises(fracpass.PlanError, match=what):
        fracpass.transform(factory(), plan.with_gates(fracpass.Gates(granularity=granularity)),
                           example_inputs=(make_input(2),))


# -- item 4: export -------------------------------------------------------------------------------------
def trained_model(name, plan=PLAN, **transform_kwargs):
    factory, make_input = PATTERNS[name]
    torch.manual_seed(0)
    qmodel = fracpass.transform(factory(), plan, example_inputs=(make_input(2),), **transform_kwargs)
    train_steps(qmodel, make_input)
    return qmodel, make_input


def _ort_run(path, x):
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path))
    assert [i.name for i in session.get_inputs()] == ["input_0"]  # the defaults are baked, not inputs
    return session.run(None, {"input_0": x.numpy()})[0]


@pytest.mark.parametrize("how", [{}, {"concrete_args": {"attn_mask": None, "is_causal": False}},
                                 {"capture_method": "export"}], ids=["fx", "fx-concrete-args", "export-path"])
def test_forward_with_non_tensor_defaults_exports_with_a_dynamic_batch(how, tmp_path):
    """timm's VisionTransformer.forward(x, attn_mask=None, is_causal=False)."""
    qmodel, make_input = trained_model("sdpa_is_causal_arg", **how)
    fracpass.export_onnx(qmodel, tmp_path / "m.onnx")  # verified at the example batch and one more
    qmodel.eval()
    x = make_input(5)
    with torch.no_grad():
        ref = qmodel(x).numpy()
    assert abs(_ort_run(tmp_path / "m.onnx", x) - ref).max() <= 1e-2 * (ref.max() - ref.min())


def test_export_path_fallback_is_noted_and_exports_with_a_dynamic_batch(tmp_path):
    """timm's MobileViTv2: fx cannot follow `if new_h != H or new_w != W`; torch.export can."""
    qmodel, make_input = trained_model("shape_branch_export_path")
    assert qmodel.fracpass.method == "export"
    text = fracpass.summary(qmodel)
    assert "note: torch.fx could not trace MobileViTLike" in text and "captured with torch.export" in text
    fracpass.export_onnx(qmodel, tmp_path / "m.onnx")
    qmodel.eval()
    for b in (1, 3, 6):
        x = make_input(b)
        with torch.no_grad():
            ref = qmodel(x).numpy()
        assert _ort_run(tmp_path / "m.onnx", x).shape == ref.shape


def test_a_batch_size_baked_into_the_model_is_caught_before_writing(tmp_path):
    class Baked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(16, 3)

        def forward(self, x):
            # an aten overload called directly takes x.size(0) as a constant when torch.onnx traces it
            return self.fc(torch.ops.aten.reshape.default(x, [x.size(0), -1]))

    qmodel = fracpass.transform(Baked(), PLAN, example_inputs=(torch.randn(2, 4, 4),))
    train_steps(qmodel, lambda b: torch.randn(b, 4, 4))
    with pytest.raises(fracpass.ExportError, match=r"at a batch size other than the example's: the traced graph fixed "
                                                   r"the batch size somewhere; export with dynamic_batch=False"):
        fracpass.export_onnx(qmodel, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()
    fracpass.export_onnx(qmodel, tmp_path / "m.onnx", dynamic_batch=False)


# -- the table of issue 13: every pattern trained, gated and exported ----------------------------------------


@pytest.mark.parametrize("granularity, units", [
    ("op", ["conv_proj", "layers_0_mlp_0", "layers_0_mlp_2", "layers_1_mlp_0", "layers_1_mlp_2", "head"]),
    ("block", ["layers_0_mlp", "layers_1_mlp"])])
def test_no_gate_covers_ops_inside_multihead_attention(granularity, units):
    """MultiheadAttention's internals run sequence-first ((L, B, E), (L*B, E)): a gate's per-sample rows
    would group them by position, silently when L*B is a multiple of B. They keep the stage's bits."""
    factory, make_input = PATTERNS["multihead_attention"]
    plan = PLAN.with_gates(fracpass.Gates(granularity=granularity))
    qmodel = fracpass.transform(factory(), plan, example_inputs=(make_input(2),))
    assert qmodel.gates.unit_names == units
    x = make_input(5)  # the example's sequence length is 5 too: batch == L
    loss = qmodel(x).pow(2).mean() + fracpass.gate_loss(qmodel)
    loss.backward()
    assert torch.isfinite(loss)
    gated = {name for name, q in fracpass.quantizers(qmodel) if type(q).__name__ == "GatedActQuant"}
    assert gated and not any("linear" in name or "scaled_dot" in name for name in gated)


@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_every_pattern_trains_gates_and_exports(name, tmp_path):
    factory, make_input = PATTERNS[name]
    torch.manual_seed(0)
    qmodel = fracpass.transform(factory(), PLAN, example_inputs=(make_input(2),))
    loss, grads = train_steps(qmodel, make_input)
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads.values())
    fracpass.export_onnx(qmodel, tmp_path / "m.onnx")  # verified in onnxruntime at two batch sizes
    gated_plan = PLAN.with_gates(fracpass.Gates(granularity="op"))
    torch.manual_seed(0)
    gated = fracpass.transform(factory(), gated_plan, example_inputs=(make_input(2),))
    loss, grads = train_steps(gated, make_input)
    assert torch.isfinite(loss) and fracpass.gate_stats(gated) is not None
    if name == "unbind_block":
        # known limit: the gate fed by unbind[k] bakes the example batch into the ONNX graph; export says
        # so before writing anything, and exports at a fixed batch
        with pytest.raises(fracpass.ExportError, match="at a batch size other than the example's"):
            fracpass.export_onnx(gated, tmp_path / "gated.onnx")
        fracpass.export_onnx(gated, tmp_path / "gated.onnx", dynamic_batch=False)
        return
    fracpass.export_onnx(gated, tmp_path / "gated.onnx")
