"""fracpass.transform end to end on the example models, on both capture paths."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from conftest import EXAMPLE_MODELS
from fracpass import meta
from fracpass.pipeline import default_pipeline
from fracpass.quant import ActQuant, GradQuant, WeightQuant

# Stage 0 quantizes nothing; stage 1 quantizes everything. At stage 0 every quantizer is present
# and must be an exact identity.
IDENTITY_THEN_8 = fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(8, 8, 8)))


def run_step(model, x, seed=0):
    """Output, input gradient and parameter gradients of one forward/backward."""
    model.zero_grad(set_to_none=True)
    if x.is_floating_point():
        x = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    out = model(x)
    out.float().pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.detach(), (x.grad.clone() if x.is_floating_point() else None), grads


@pytest.mark.parametrize("method", ["fx", "export"])
@pytest.mark.parametrize("name", sorted(EXAMPLE_MODELS))
def test_32_bits_is_bit_identical_in_train_and_eval(name, method):
    factory, make_input = EXAMPLE_MODELS[name]
    model = factory().train()
    x = make_input(4)
    qmodel = fracpass.transform(model, IDENTITY_THEN_8, example_inputs=(x,), capture_method=method)
    assert qmodel.fracpass.method == method
    assert isinstance(qmodel, fracpass.QuantizedGraphModule) and isinstance(qmodel, torch.fx.GraphModule)
    assert sum(1 for _ in fracpass.quantizers(qmodel)) > 0
    reference = copy.deepcopy(model)
    for mode in (True, False, True):
        reference.train(mode)
        qmodel.train(mode)
        ref_out, ref_dx, ref_grads = run_step(reference, x)
        out, dx, grads = run_step(qmodel, x)
        assert torch.equal(out, ref_out), f"{name}/{method} train={mode}: outputs differ"
        if ref_dx is not None:
            assert torch.equal(dx, ref_dx)
        assert grads.keys() == ref_grads.keys()
        for key in grads:
            assert torch.equal(grads[key], ref_grads[key]), f"{name}/{method} train={mode}: grad of {key} differs"


@pytest.mark.parametrize("method", ["fx", "export"])
def test_parameter_names_kept_model_untouched_other_batch_sizes(method):
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    model = factory()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules_before = [n for n, _ in model.named_modules()]
    qmodel = fracpass.transform(model, fracpass.Plan.static(4, 4, 8), example_inputs=(make_input(1),),
                                capture_method=method)
    assert [n for n, _ in qmodel.named_parameters()] == [n for n, _ in model.named_parameters()]
    for batch in (3, 5):
        out = qmodel(make_input(batch))
        assert out.shape == (batch, 10)
        out.sum().backward()
    qmodel.eval()
    assert qmodel(make_input(2)).shape == (2, 10)
    assert [n for n, _ in model.named_modules()] == modules_before
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.training


def test_structure_resnet20():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    model = factory()
    traced = torch.fx.symbolic_trace(model)
    untouched_before = [(n.op, str(n.target)) for n in traced.graph.nodes
                        if n.op == "call_module" and not isinstance(traced.get_submodule(n.target), (nn.Conv2d, nn.Linear))]
    plan = fracpass.Plan.static(4, 4, 8, exclude=("conv1",))
    qmodel = fracpass.transform(model, plan, example_inputs=(make_input(2),))
    stats = qmodel.fracpass.stats[True]
    assert stats["annotate"] == {"compute_ops": 22, "excluded": 1, "annotated": 22, "by_kind": {"conv2d": 21, "linear": 1}}
    assert stats["insert-act-quant"] == {"act_quant_inserted": 21, "gated": 0}
    assert stats["insert-weight-quant"] == {"weight_quant_inserted": 21, "modules_lowered": 21}
    assert stats["insert-grad-quant"] == {"grad_quant_inserted": 21, "gated": 0}
    nodes = {n.name: n for n in qmodel.graph.nodes}
    conv = nodes["layer1_0_conv1"]
    assert conv.op == "call_function" and conv.target is F.conv2d
    assert conv.args[0].name == "layer1_0_conv1_aq" and conv.args[1].name == "layer1_0_conv1_wq"
    assert conv.args[1].args[0].op == "get_attr" and conv.args[1].args[0].target == "layer1.0.conv1.weight"
    assert [u.name for u in conv.users] == ["layer1_0_conv1_gq"]
    assert isinstance(qmodel.get_submodule("layer1_0_conv1_aq"), ActQuant)
    assert isinstance(qmodel.get_submodule("layer1_0_conv1_wq"), WeightQuant)
    assert isinstance(qmodel.get_submodule("layer1_0_conv1_gq"), GradQuant)
    for role, suffix in (("act", "aq"), ("weight", "wq"), ("grad", "gq")):
        tagged = [n for n in qmodel.graph.nodes if meta.inserted(n) and meta.inserted(n).role == role]
        assert len(tagged) == 21 and all(n.name.endswith("_" + suffix) for n in tagged)
        assert all(meta.inserted(n).created_by == f"insert-{role}-quant" for n in tagged)
    # the excluded stem is untouched: still a module call, no quantizer around it
    assert nodes["conv1"].op == "call_module" and meta.qspec(nodes["conv1"]).excluded
    assert not any(meta.inserted(u) for u in nodes["conv1"].users)
    # BatchNorm, ReLU, add, pooling: same nodes as a plain trace
    untouched_after = [(n.op, str(n.target)) for n in qmodel.graph.nodes
                       if n.op == "call_module" and not meta.inserted(n) and not meta.op_info(n)]
    assert untouched_after == untouched_before
    adds = [n for n in qmodel.graph.nodes if n.op == "call_function" and n.target.__name__ == "add"]
    assert len(adds) == 9 and not any(meta.inserted(a) for a in adds)
    qmodel.graph.lint()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_pipeline_is_idempotent(method):
    factory, make_input = EXAMPLE_MODELS["transformer_matmul"]
    plan = fracpass.Plan.progressive()
    qmodel = fracpass.transform(factory(), plan, example_inputs=(make_input(2),), capture_method=method)
    code, n_modules = qmodel.code, len(list(qmodel.modules()))
    result = default_pipeline(plan)(qmodel)
    assert not result.modified
    assert result.stats["insert-act-quant"]["act_quant_inserted"] == 0
    assert result.stats["insert-weight-quant"] == {"weight_quant_inserted": 0, "modules_lowered": 0}
    assert result.stats["insert-grad-quant"]["grad_quant_inserted"] == 0
    assert result.stats["annotate"]["annotated"] == 0
    assert qmodel.code == code and len(list(qmodel.modules())) == n_modules


def test_every_annotated_node_has_metadata():
    factory, make_input = EXAMPLE_MODELS["mobilenet_v2"]
    qmodel = fracpass.transform(factory(), fracpass.Plan.static(), example_inputs=(make_input(2),))
    ops = [n for n in qmodel.graph.nodes if meta.op_info(n)]
    assert ops and all(meta.qspec(n) is not None for n in ops)
    depthwise = [n for n in ops if "depthwise" in meta.op_info(n).traits]
    assert len(depthwise) == 17  # one per inverted residual block
    for n in qmodel.graph.nodes:
        if n.op == "call_module" and n.target.endswith(("_aq", "_wq", "_gq")):
            assert meta.inserted(n) is not None


def test_set_stage_and_state_dict_round_trip():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    model = factory()
    plan = fracpass.Plan.progressive(fw=(3, 4, 6, 8), bw=(6, 6, 8, 8), exclude=("fc",),
                                     rules=[fracpass.Rule(match="layer3", g=16)])
    qmodel = fracpass.transform(model, plan, example_inputs=(make_input(2),))
    fracpass.set_stage(qmodel, 2)
    assert fracpass.current_stage(qmodel) == 2
    quantizers = dict(fracpass.quantizers(qmodel))
    assert quantizers["layer1_0_conv1_aq"].bits == 6 and quantizers["layer1_0_conv1_wq"].bits == 6
    assert quantizers["layer1_0_conv1_gq"].bits == 8 and quantizers["layer3_0_conv1_gq"].bits == 16
    assert "fc_aq" not in quantizers
    fracpass.set_stage(qmodel, -1)
    assert all(q.bits == (16 if n.startswith("layer3") and n.endswith("gq") else 8) for n, q in quantizers.items())
    fracpass.set_stage(qmodel, 1)
    qmodel(make_input(4))  # records activation ranges
    fresh = fracpass.transform(model, plan, example_inputs=(make_input(2),))
    assert fracpass.current_stage(fresh) == 0
    fresh.load_state_dict(qmodel.state_dict())
    assert fracpass.current_stage(fresh) == 1
    for name, q in fracpass.quantizers(fresh):
        assert q.bits == quantizers[name].bits
    qmodel.eval(), fresh.eval()
    x = make_input(3)
    assert torch.equal(qmodel(x), fresh(x))
    with pytest.raises(fracpass.PlanError, match=r"stage 4 is out of range; the plan has 4 stage\(s\): 0\.\.3"):
        fracpass.set_stage(qmodel, 4)


def test_low_bit_matches_hand_written_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    x = torch.randn(4, 3, 6, 6)
    qmodel = fracpass.transform(model, fracpass.Plan.static(w=3, a=4, g=8), example_inputs=(x,))
    out = qmodel(x)

    def fq(t, bits, dims=None):
        mn = (t.amin(dims, keepdim=True) if dims else t.min()).clamp(max=0)
        mx = (t.amax(dims, keepdim=True) if dims else t.max()).clamp(min=0)
        s = (mx - mn) / (2**bits - 1)
        zp = torch.round(-mn / s)
        return (torch.clamp(torch.round(t / s) + zp, 0, 2**bits - 1) - zp) * s

    conv, lin = model[0], model[3]
    h = F.relu(F.conv2d(fq(x, 4), fq(conv.weight, 3, (1, 2, 3)), conv.bias, padding=1)).flatten(1)
    ref = F.linear(fq(h, 4), fq(lin.weight, 3, (1,)), lin.bias)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_quantized_values_in_a_model():
    """At b bits: conv inputs take <= 2^a values, weights <= 2^w per channel, output gradients <= 2^g."""
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    qmodel = fracpass.transform(factory(), fracpass.Plan.static(w=3, a=4, g=5), example_inputs=(make_input(2),))
    seen = {"act": [], "weight": [], "grad": []}
    for name, q in fracpass.quantizers(qmodel):
        if isinstance(q, GradQuant):
            # a hook registered on the quantizer's output after its own quantizing hook: tensor hooks run in
            # registration order, each on the previous one's result, so this one sees what the op receives
            q.register_forward_hook(lambda m, inp, out: [out.register_hook(lambda g: seen["grad"].append(g))] and None)
        else:
            q.register_forward_hook(lambda m, inp, out, _r=q.role: seen[_r].append(out.detach()))
    qmodel(make_input(8)).pow(2).sum().backward()
    assert len(seen["act"]) == len(seen["weight"]) == len(seen["grad"]) == 22
    assert all(a.unique().numel() <= 16 for a in seen["act"])
    assert all(row.unique().numel() <= 8 for w in seen["weight"] for row in w.flatten(1))
    assert all(g.unique().numel() <= 32 for g in seen["grad"])
    assert max(g.unique().numel() for g in seen["grad"]) > 8  # really at 5 bits, not fewer


def test_unmatched_rule_lists_closest_module_paths():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    with pytest.raises(fracpass.PlanError, match=r"plan rule 0 \(match='conv9'\) matches no compute op in the model; "
                                                 r"closest module paths: conv1"):
        fracpass.transform(factory(), fracpass.Plan.static(exclude=("conv9",)), example_inputs=(make_input(2),))
    with pytest.raises(fracpass.PlanError, match=r"plan rule 0 \(kind='conv3d'\) matches no compute op"):
        fracpass.transform(factory(), fracpass.Plan.static(rules=[fracpass.Rule(kind="conv3d", w=4)]))
    # a kind that fits no op: the hint lists the model's op kinds, not module paths
    with pytest.raises(fracpass.PlanError, match=r"\(kind='conv'\) matches no compute op in the model; no op of kind "
                                                 r"'conv'; the model's op kinds are conv2d, linear \(kind takes a glob"):
        fracpass.transform(factory(), fracpass.Plan.static(rules=[fracpass.Rule(kind="conv", w=4)]),
                           example_inputs=(make_input(2),))


def test_bad_arguments():
    with pytest.raises(fracpass.PlanError, match=r"plan must be a fracpass\.Plan, got dict"):
        fracpass.transform(nn.Linear(2, 2), {"w": 8})
    with pytest.raises(fracpass.FracpassError, match=r"model must be a torch\.nn\.Module, got function"):
        fracpass.transform(lambda x: x, fracpass.Plan.static())
    with pytest.raises(fracpass.FracpassError, match=r"Linear is not a model returned by fracpass\.transform"):
        fracpass.set_stage(nn.Linear(2, 2), 0)
    with pytest.raises(fracpass.TraceError, match=r"capture='jit' is not one of"):
        fracpass.transform(nn.Linear(2, 2), fracpass.Plan.static(), capture_method="jit")


def test_submodule_name_clash_is_reported():
    class Clash(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.fc_aq = nn.Identity()

        def forward(self, x):
            return self.fc_aq(self.fc(x))

    with pytest.raises(fracpass.PassError, match=r"already has a submodule 'fc_aq' \(Identity\)"):
        fracpass.transform(Clash(), fracpass.Plan.static())


def test_summary_table():
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    qmodel = fracpass.transform(factory(), fracpass.Plan.progressive(exclude=("conv1",)), example_inputs=(make_input(2),))
    fracpass.set_stage(qmodel, 1)
    text = fracpass.summary(qmodel)
    assert "captured with fx; stage 1 of 4 (w/a/g = 4/4/6)" in text
    header = text.splitlines()[1].split()
    assert header == ["op", "kind", "module", "w", "a", "g", "gated", "status"]
    row = next(line for line in text.splitlines() if line.startswith("layer2_0_conv1 "))
    assert row.split()[:8] == ["layer2_0_conv1", "conv2d", "layer2.0.conv1", "4", "4", "6", "no", "quantized"]
    stem = next(line for line in text.splitlines() if line.startswith("conv1 "))
    assert "excluded: excluded by plan (exclude 'conv1')" in stem
    assert text.splitlines()[-1] == "22 compute ops: 21 quantized, 1 excluded; 63 quantizer modules"


def test_tied_weights_stay_tied_and_copies_are_independent():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, ids):
            return self.head(self.embed(ids))

    model = Tied()
    qmodel = fracpass.transform(model, fracpass.Plan.static())
    assert qmodel.get_parameter("embed.weight") is qmodel.get_parameter("head.weight")
    assert qmodel.get_parameter("embed.weight") is not model.embed.weight
    with torch.no_grad():
        qmodel.get_parameter("embed.weight").add_(1.0)
    assert not torch.equal(model.embed.weight, qmodel.get_parameter("embed.weight"))


def test_transform_restores_the_garbage_collector():
    import gc

    assert gc.isenabled()
    fracpass.transform(nn.Sequential(nn.Linear(2, 2)), fracpass.Plan.static())
    assert gc.isenabled()
    gc.disable()
    try:
        fracpass.transform(nn.Sequential(nn.Linear(2, 2)), fracpass.Plan.static())
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
    with pytest.raises(fracpass.PlanError):
        fracpass.transform(nn.Sequential(nn.Linear(2, 2)), fracpass.Plan.static(exclude=("nope",)))
    assert gc.isenabled()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_deepcopy_and_pickle_keep_a_working_transformed_model(method, tmp_path):
    factory, make_input = EXAMPLE_MODELS["transformer_sdpa"]
    x = make_input(3)
    qmodel = fracpass.transform(factory(), fracpass.Plan.progressive(), example_inputs=(x,), capture_method=method)
    fracpass.set_stage(qmodel, 2)
    qmodel(x).sum().backward()  # records activation ranges
    qmodel.eval()
    with torch.no_grad():
        expected = qmodel(x)
    for clone in (copy.deepcopy(qmodel), _save_load(qmodel, tmp_path / "q.pt")):
        assert isinstance(clone, fracpass.QuantizedGraphModule) and not clone.training
        assert fracpass.current_stage(clone) == 2
        with torch.no_grad():
            assert torch.equal(clone(x), expected)
        first = next(iter(dict(clone.named_parameters())))
        assert clone.get_parameter(first) is not qmodel.get_parameter(first)
        clone.train()
        clone(x).sum().backward()  # and it still trains, in its own mode graph
        assert clone.training and not qmodel.training


def _save_load(module, path):
    torch.save(module, path)
    return torch.load(path, weights_only=False)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_eval_mode_model_gives_eval_mode_quantizers(method):
    factory, make_input = EXAMPLE_MODELS["resnet20"]
    qmodel = fracpass.transform(factory().eval(), fracpass.Plan.static(), example_inputs=(make_input(2),),
                                capture_method=method)
    assert not qmodel.training and qmodel.fracpass.graph_mode is False
    assert [n for n, m in qmodel.named_modules() if m.training] == []
    qmodel(make_input(2))
    assert not any(q._range_ready for _, q in fracpass.quantizers(qmodel) if q.role == "act")  # eval records nothing


@pytest.mark.parametrize("depth", [20, 38, 74, 110, pytest.param(1202, marks=pytest.mark.slow)])
def test_cifar_resnet_family_structure(depth):
    from examples.models import CifarResNet

    qmodel = fracpass.transform(CifarResNet(depth), fracpass.Plan.static(), example_inputs=(torch.randn(2, 3, 32, 32),))
    n = (depth - 2) // 6
    convs = 1 + 6 * n + 2  # stem, two per block, two downsample convs
    assert qmodel.fracpass.stats[True]["annotate"]["by_kind"] == {"conv2d": convs, "linear": 1}
    assert sum(1 for _ in fracpass.quantizers(qmodel)) == 3 * (convs + 1)
    assert qmodel(torch.randn(3, 3, 32, 32)).shape == (3, 10)


def test_a_nan_batch_is_reported_in_one_warning_naming_the_quantizers(caplog):
    from fracpass.models import resnet20

    qmodel = fracpass.transform(resnet20(), fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(2, 3, 32, 32),))
    acts = [name for name, q in fracpass.quantizers(qmodel) if q.role == "act"]
    with torch.no_grad():
        qmodel(torch.full((4, 3, 32, 32), float("nan")))
    with caplog.at_level("WARNING", logger="fracpass"):
        qmodel.eval()
        qmodel.train(), qmodel.eval()  # said once, not at every switch
    said = [r.getMessage() for r in caplog.records if "non-finite" in r.getMessage()]
    assert len(said) == 1, said
    assert said[0].startswith(f"{len(acts)} activation quantizer(s) skipped range updates for up to 1 non-finite")
    assert f"({', '.join(acts[:4])} and {len(acts) - 4} more)" in said[0] and len(said[0]) < 500
