"""Real third-party architectures (transformers, tiny random configs, no downloads)."""
import pytest
import torch

import fracpass
from fracpass import meta

transformers = pytest.importorskip("transformers")

COMPUTE_ATEN = ("aten.linear", "aten.addmm", "aten.conv2d", "aten.scaled_dot_product_attention", "aten.matmul",
                "aten.bmm", "aten.mm", "aten.baddbmm", "aten.einsum")


def bert():
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    ids = torch.randint(0, 100, (2, 8))
    return transformers.BertForSequenceClassification(cfg), dict(input_ids=ids, attention_mask=torch.ones_like(ids)), 3


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2, use_cache=False,
                                  bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg), dict(input_ids=torch.randint(0, 100, (2, 8))), 100


def vit():
    cfg = transformers.ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                                 image_size=16, patch_size=4, num_labels=5)
    return transformers.ViTForImageClassification(cfg), dict(pixel_values=torch.randn(2, 3, 16, 16)), 5


@pytest.mark.parametrize("build", [bert, gpt2, vit], ids=["bert-encoder", "gpt2-decoder", "vit-vision"])
def test_transformers_model_transforms_quantizes_everything_and_trains(build):
    torch.manual_seed(0)
    model, kwargs, n_out = build()
    model.train()
    qmodel = fracpass.transform(model, fracpass.Plan.static(4, 4, 8), example_kwargs=kwargs)
    assert qmodel.fracpass.method == "export"  # symbolic_trace cannot capture transformers 5.x models
    compute = [n for n in qmodel.graph.nodes if n.op == "call_function" and str(n.target).startswith(COMPUTE_ATEN)]
    assert compute and all(meta.op_info(n) and meta.qspec(n).quantizes("a") for n in compute)
    for n in compute:  # every activation input passes through this op's quantizer
        for slot in meta.op_info(n).act_args:
            assert meta.inserted(fracpass.registry.get_slot(n, slot)).role == "act"
        assert [meta.inserted(u).role for u in n.users] == ["grad"]
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    out = qmodel(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    assert logits.shape[-1] == n_out
    before = {k: v.clone() for k, v in qmodel.named_parameters()}
    logits.float().pow(2).mean().backward()
    opt.step()
    assert all(p.grad is not None for p in qmodel.parameters() if p.requires_grad)
    assert sum(not torch.equal(before[k], v) for k, v in qmodel.named_parameters()) > len(before) // 2
    qmodel.eval()
    with torch.no_grad():
        again = qmodel(**kwargs)
    assert torch.isfinite(again.logits if hasattr(again, "logits") else again[0]).all()


def test_bert_at_32_bits_equals_eager():
    model, kwargs, _ = bert()
    model.eval()
    plan = fracpass.Plan(stages=(fracpass.Stage(32, 32, 32), fracpass.Stage(8, 8, 8)))
    qmodel = fracpass.transform(model, plan, example_kwargs=kwargs)
    qmodel.eval()
    with torch.no_grad():
        assert torch.equal(qmodel(**kwargs).logits, model(**kwargs).logits)


def test_kv_cache_output_gets_a_hint():
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=1, n_head=2, use_cache=True,
                                  bos_token_id=0, eos_token_id=0)
    with pytest.raises(fracpass.TraceError, match=r"use_cache=False"):
        fracpass.transform(transformers.GPT2LMHeadModel(cfg), fracpass.Plan.static(),
                           example_kwargs=dict(input_ids=torch.randint(0, 100, (2, 8))))


@pytest.mark.parametrize("build", [bert, gpt2, vit], ids=["bert-encoder", "gpt2-decoder", "vit-vision"])
def test_transformers_blocks_are_found_and_gated_models_train(build):
    """Two layers: an attention residual and an MLP residual each, found on the aten graph even
    though an attention mask (a second model input) joins the attention branch."""
    torch.manual_seed(0)
    model, kwargs, _ = build()
    plan = fracpass.Plan.static(4, 8, 8).with_gates(fracpass.Gates(a=(4, 8), g=(8, 8), target=2.0))
    qmodel = fracpass.transform(model.train(), plan, example_kwargs=kwargs)
    units = fracpass.passes.insert_gates.unit_summary(qmodel)
    assert len(units) == 4
    kinds = [sorted({meta.op_info(n).kind for n in qmodel.graph.nodes if n.name in ops}) for _, ops in units]
    assert kinds[0] == ["linear", "sdpa"] or "matmul" in kinds[0] or "addmm" in kinds[0]  # attention first
    out = qmodel(**kwargs)
    logits = out.logits if hasattr(out, "logits") else out[0]
    (logits.float().pow(2).mean() + fracpass.gate_loss(qmodel)).backward()
    assert qmodel.gates.proj.weight.grad.abs().sum() > 0
    assert len(fracpass.gate_stats(qmodel).units) == 4
