"""Capture paths and the TraceError messages."""
import pytest
import torch
from torch import nn

import fracpass


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # a branch on a tensor value: neither fx nor export can capture it
            return self.fc(x)
        return -self.fc(x)


class LayerDrop(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    def forward(self, x):
        for layer in self.layers:
            if self.training and torch.rand(()) < 0.5:  # LayerDrop
                continue
            x = layer(x)
        return x


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[0] > 0 and x.max() > 0:
            return self.fc(x)
        return x


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Inner()
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.block(x))


def test_untraceable_model_names_module_line_and_fix():
    with pytest.raises(fracpass.TraceError) as info:
        fracpass.transform(DataDependent(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),))
    text = str(info.value)
    assert "fracpass could not capture DataDependent" in text
    assert "torch.fx.symbolic_trace failed in module <root> at" in text and "test_capture.py:15 (if x.sum() > 0:" in text
    assert "torch.export (non-strict) failed at" in text
    assert "control flow depends on tensor values" in text
    assert "How to fix: mark the module that fails as a leaf" in text and "concrete_args" in text
    assert "Traceback" not in text
    assert isinstance(info.value.__cause__, Exception)  # chained


def test_failing_submodule_is_named():
    with pytest.raises(fracpass.TraceError, match=r"failed in module block \(Inner\) at .*test_capture\.py:\d+ "
                                                  r"\(if x\.shape\[0\] > 0 and x\.max\(\) > 0:\)"):
        fracpass.transform(Outer(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),))


def test_leaf_module_makes_it_traceable_and_is_left_unquantized():
    q = fracpass.transform(Outer(), fracpass.Plan.static(), leaf_modules=["block"])
    assert q.fracpass.method == "fx"
    assert {n for n, _ in fracpass.quantizers(q)} == {"head_aq", "head_wq", "head_gq"}


def test_layerdrop_hint():
    with pytest.raises(fracpass.TraceError, match=r"(?s)LayerDrop.*remove random control flow"):
        fracpass.transform(LayerDrop().train(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),))


def test_without_examples_export_is_not_tried_and_says_so():
    with pytest.raises(fracpass.TraceError, match=r"torch\.export was not tried: it needs example inputs"):
        fracpass.transform(DataDependent(), fracpass.Plan.static())


def test_forced_fx_says_how_to_fall_back():
    with pytest.raises(fracpass.TraceError, match=r"capture_method='fx'; use capture_method='auto'"):
        fracpass.transform(DataDependent(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),),
                           capture_method="fx")


def test_auto_falls_back_to_export_and_keeps_modes():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.drop = nn.Dropout(0.5)

        def forward(self, x):
            n = int(x.shape[-1])  # fx cannot turn a Proxy into an int; export can
            return self.drop(self.fc(x[..., :n]))

    model = Branchy()
    q = fracpass.transform(model, fracpass.Plan.static(), example_inputs=(torch.randn(3, 4),))
    assert q.fracpass.method == "export"
    q.eval()
    x = torch.randn(5, 4)
    assert torch.equal(q(x), q(x))  # no dropout in eval
    q.train()
    assert not torch.equal(q(x), q(x))  # dropout back on
    assert set(q.fracpass.graphs) == {True, False}


def test_keyword_inputs_and_batch_of_one():
    class KW(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x, *, scale=None):
            y = self.fc(x)
            return y if scale is None else y * scale

    q = fracpass.transform(KW(), fracpass.Plan.static(), example_kwargs=dict(x=torch.randn(1, 4), scale=torch.ones(1, 4)),
                           capture_method="export")
    assert "widened to 2" in fracpass.summary(q)
    assert q(x=torch.randn(6, 4), scale=torch.ones(6, 4)).shape == (6, 4)
