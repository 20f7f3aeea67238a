"""original_state_dict / to_original: a transformed, trained model's weights back in the user's own class."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fracpass
from fracpass.errors import FracpassError


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.scale = nn.Parameter(torch.ones(8))  # read directly (get_attr), not through a module
        self.unused = nn.Linear(2, 2)  # forward never calls it: fx leaves it out of the graph
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x))) * self.scale.view(1, -1, 1, 1)
        return self.fc(x.mean((2, 3)))


def _plan():
    """Stage 0 trains at 4 bits; stage 1 is full precision, where the transformed model is the FP32 model."""
    return fracpass.Plan.progressive(fw=(4, 32), bw=(8, 32), switch=fracpass.AtSteps((1000,)))


def _train(qmodel, inputs, steps=3):
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    qmodel.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = qmodel(inputs).float().pow(2).mean()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("method", ["fx", "export"])
def test_to_original_loads_strictly_and_matches_the_transformed_model_at_32_bits(method):
    torch.manual_seed(0)
    model, x = SmallCNN(), torch.randn(4, 3, 8, 8)
    qmodel = fracpass.transform(model, _plan(), example_inputs=(x,), capture_method=method)
    with pytest.raises(RuntimeError, match="Unexpected key"):  # the trap this module exists for
        SmallCNN().load_state_dict(qmodel.state_dict())
    _train(qmodel, x)
    state = fracpass.original_state_dict(qmodel)
    assert sorted(state) == sorted(SmallCNN().state_dict())
    assert not torch.equal(state["stem.weight"], model.stem.weight)  # trained, not the user's initial weights
    assert state["bn.num_batches_tracked"].item() == 3
    fresh = fracpass.to_original(qmodel, SmallCNN())
    assert type(fresh) is SmallCNN
    fracpass.set_stage(qmodel, 1)
    qmodel.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), qmodel(x), rtol=1e-5, atol=1e-6)
    # a copy, not an alias of the transformed model's tensors' graph: detached
    assert all(not t.requires_grad for t in state.values())


def test_to_original_refuses_another_class_and_untransformed_models():
    qmodel = fracpass.transform(SmallCNN(), _plan(), example_inputs=(torch.randn(2, 3, 8, 8),))
    with pytest.raises(FracpassError, match=r"to_original: Linear does not take .*same class and configuration"):
        fracpass.to_original(qmodel, nn.Linear(3, 3))
    with pytest.raises(FracpassError, match="holds no model returned by fracpass.transform"):
        fracpass.original_state_dict(SmallCNN())
    with pytest.raises(FracpassError, match="give a fresh instance of your own class"):
        fracpass.to_original(qmodel, qmodel)


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = SmallCNN()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.backbone(x))


def test_models_made_of_transformed_parts_come_back_under_the_whole_models_keys():
    from fracpass.parts import transform_parts

    torch.manual_seed(0)
    x = torch.randn(4, 3, 8, 8)
    qmodel = transform_parts(Detector(), _plan(), example_inputs=(x,), parts=["backbone"])
    _train(qmodel, x)
    state = fracpass.original_state_dict(qmodel)
    assert sorted(state) == sorted(Detector().state_dict())
    fresh = fracpass.to_original(qmodel, Detector())
    fracpass.set_stage(qmodel, 1)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(x), qmodel.eval()(x), rtol=1e-5, atol=1e-6)


def test_huggingface_model_round_trips_through_save_pretrained(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, num_labels=3)
    ids = torch.randint(0, 100, (4, 8))
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    qmodel = fracpass.transform(transformers.BertForSequenceClassification(cfg), _plan(), example_kwargs=kwargs,
                                capture_method="export")
    opt = torch.optim.SGD(qmodel.parameters(), lr=0.1)
    labels = torch.randint(0, 3, (4,))
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(qmodel(**kwargs)["logits"], labels).backward()
        opt.step()
    fresh = fracpass.to_original(qmodel, transformers.BertForSequenceClassification(cfg))
    fresh.save_pretrained(tmp_path / "trained")
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "trained").eval()
    fracpass.set_stage(qmodel, 1)
    qmodel.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**kwargs).logits, qmodel(**kwargs)["logits"], rtol=1e-5, atol=1e-5)
