"""NativeOptions: kept in the model's state (re-capture, deepcopy, pickle), changed with configure, validated."""
import copy
import pickle

import pytest
import torch
from torch import nn

import fracpass
from fracpass import FracpassError, NativeOptions
from fracpass.native import NativeSite

CUSTOM = NativeOptions(min_intensity=7.0, min_conv_macs=123.0, min_bmm_intensity=3.0, kinds=("linear", "conv2d_int8"),
                       fuse_bn=False, fast_bn=False, hand_gradient=False, split_channels=0.5, int8_forward=False,
                       int8_input_grad=False, int8_weight_grad=False)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.1)  # train and eval capture different graphs
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(self.drop(torch.relu(self.bn(self.conv(x)))).mean((2, 3)))


def _sites(qmodel):
    return {name: m.options for name, m in qmodel.named_modules() if isinstance(m, NativeSite)}


def _native(options=CUSTOM):
    x = torch.randn(2, 3, 8, 8)
    return fracpass.transform(Net(), fracpass.Plan.static(8, 8, 8), example_inputs=(x,), execution="native",
                              native=options), x


def _lowered(qmodel):
    return sorted((n.name, n.target.__name__) for n in qmodel.graph.nodes
                  if n.op == "call_function" and n.kwargs.get("site") is not None)


def test_every_call_runs_with_the_models_options():
    q, _ = _native()
    assert q.fracpass.native == CUSTOM
    assert _sites(q) == {"conv_native": CUSTOM, "fc_native": CUSTOM}
    # conv2d_int8 lowers the convolution to oneDNN's int8 op, and fuse_bn=False leaves its BatchNorm alone
    assert _lowered(q) == [("conv", "native_conv2d"), ("fc", "native_linear")]
    assert "fuse-native-bn" not in q.fracpass.stats[True]


def test_recapture_train_eval_train_keeps_non_default_options():
    q, x = _native()
    train_graph = _lowered(q)
    q.eval()  # captures the eval graph and lowers it
    assert q.fracpass.native == CUSTOM and set(_sites(q).values()) == {CUSTOM}
    assert _lowered(q) == train_graph
    q(x)
    q.train()
    assert _lowered(q) == train_graph and set(_sites(q).values()) == {CUSTOM}


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_copies_keep_non_default_options(how):
    q, x = _native()
    q(x)
    clone = pickle.loads(pickle.dumps(q)) if how == "pickle" else copy.deepcopy(q)
    assert clone.fracpass.native == CUSTOM and set(_sites(clone).values()) == {CUSTOM}
    assert _lowered(clone) == _lowered(q)
    clone.eval()
    assert _lowered(clone) == _lowered(q) and set(_sites(clone).values()) == {CUSTOM}


def test_state_dict_is_the_simulated_models():
    q, _ = _native()
    sim = fracpass.transform(Net(), fracpass.Plan.static(8, 8, 8), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert list(q.state_dict()) == list(sim.state_dict())  # sites hold no parameters or buffers


def test_configure_changes_thresholds_in_place_and_relowers_for_kinds():
    q, x = _native(NativeOptions())
    assert _lowered(q) == [("conv", "bf16_conv2d_bn"), ("fc", "native_linear")]
    graph = q.graph
    fracpass.native.configure(q, NativeOptions(min_conv_macs=0))  # a threshold: the same graph, new options
    assert q.graph is graph and set(_sites(q).values()) == {NativeOptions(min_conv_macs=0)}
    fracpass.native.configure(q, NativeOptions(kinds=("linear",)))  # another kind set: lowered again
    assert _lowered(q) == [("fc", "native_linear")]
    assert q.fracpass.native == NativeOptions(kinds=("linear",))
    q(x).sum().backward()
    q.eval()
    assert _lowered(q) == [("fc", "native_linear")]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kinds=("linear", "conv3d")), r"no native path for \['conv3d'\]"),
    (dict(min_conv_macs=-1), r"min_conv_macs=-1\): a number >= 0"),
    (dict(min_intensity="50"), r"min_intensity='50'\): a number >= 0"),
    (dict(fast_bn=1), r"fast_bn=1\): a bool"),
    (dict(split_channels=2.0), r"split_channels=2.0\): a fraction of the input channels"),
])
def test_bad_options_say_what_is_wrong(kwargs, match):
    with pytest.raises(FracpassError, match=match):
        NativeOptions(**kwargs)


def test_options_apply_to_native_execution_only():
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(FracpassError, match="given with execution='simulate'"):
        fracpass.transform(Net(), fracpass.Plan.static(), example_inputs=(x,), native=NativeOptions())
    with pytest.raises(FracpassError, match="is not a fracpass.NativeOptions"):
        fracpass.transform(Net(), fracpass.Plan.static(), example_inputs=(x,), execution="native",
                           native={"min_conv_macs": 0})
    sim = fracpass.transform(Net(), fracpass.Plan.static(), example_inputs=(x,))
    with pytest.raises(FracpassError, match="transformed with execution='simulate'"):
        fracpass.native.configure(sim, NativeOptions())
    with pytest.raises(FracpassError, match="is not a model returned by fracpass.transform"):
        fracpass.native.configure(Net(), NativeOptions())


def test_the_kind_list_takes_one_name_and_the_old_conv2d_name():
    assert NativeOptions(kinds="linear").kinds == ("linear",)
    assert NativeOptions(kinds=("linear", "conv2d")).kinds == ("linear", "conv2d_int8")
