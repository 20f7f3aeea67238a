"""Capture under threads, state updated in forward, re-transforming, and the errors a new user meets (issue 14)."""
import collections
import importlib.util
import sys
import textwrap
import threading
import time

import pytest
import torch
from torch import nn

import fracpass


# --- thread safety -------------------------------------------------------------------------------------------------

@pytest.fixture
def fast_switching():
    """Switch threads every 10 us (not 5 ms), so they interleave inside a capture that takes a millisecond."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    yield
    sys.setswitchinterval(before)


def _small_models():
    return [
        nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)),
        nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)),
        nn.Sequential(nn.Linear(4, 4), nn.GELU(), nn.LayerNorm(4), nn.Linear(4, 3)),
    ]


class _TensorUsers:
    """Threads doing ordinary tensor and module work (`if (t > 0).any():`, `t.item()`, a Linear's forward) until
    stopped; counts what raises or computes a wrong value."""

    def __init__(self, n: int = 2):
        self.stop = threading.Event()
        self.failures = []
        self.iterations = 0
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(n)]

    def _loop(self):
        t = torch.randn(8)
        layer = nn.Linear(8, 2)
        with torch.no_grad():
            expected = layer(t)
            while not self.stop.is_set():
                try:
                    if (t > 0).any():
                        t[0].item()
                    if not torch.equal(layer(t), expected):
                        self.failures.append("a Linear's forward gave a different value")
                    self.iterations += 1
                except Exception as e:  # noqa: BLE001 - every failure is what the test counts
                    self.failures.append(repr(e))

    def __enter__(self):
        for th in self.threads:
            th.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for th in self.threads:
            th.join()


def _run_threads(fns):
    errors = []

    def wrap(fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=wrap, args=(fn,)) for fn in fns]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return errors


def _original_bool_and_item():
    return {name: (torch.Tensor.__dict__.get(name), getattr(torch.Tensor, name)) for name in ("__bool__", "item")}


def test_concurrent_transforms_leave_other_threads_and_torch_alone(fast_switching):
    before = _original_bool_and_item()
    deadline = time.monotonic() + 1.0

    def transform_until_deadline(model):
        def run():
            while time.monotonic() < deadline:
                fracpass.transform(model, fracpass.Plan.static())
        return run

    with _TensorUsers() as users:
        errors = _run_threads([transform_until_deadline(m) for m in _small_models()])
    assert errors == []
    assert users.iterations > 0
    assert users.failures == [], f"{len(users.failures)} failures, first: {users.failures[0]}"
    assert bool(torch.tensor(True)) and torch.tensor(3.0).item() == 3.0
    assert _original_bool_and_item() == before  # restored exactly: no attribute left on torch.Tensor


def test_first_mode_switch_recapture_leaves_other_threads_alone(fast_switching):
    qmodels = [fracpass.transform(m, fracpass.Plan.static()) for m in _small_models() * 2]
    before = _original_bool_and_item()
    with _TensorUsers() as users:
        errors = _run_threads([q.eval for q in qmodels])
    assert errors == []
    assert users.failures == [], f"{len(users.failures)} failures, first: {users.failures[0]}"
    assert all(not q.training for q in qmodels)
    assert _original_bool_and_item() == before


class _ShapeBranch(nn.Module):
    """fx cannot trace a branch on a shape; torch.export can."""

    def __init__(self, width):
        super().__init__()
        self.fc = nn.Linear(4, width)

    def forward(self, x):
        if x.shape[-1] == 4:
            return self.fc(x)
        return x


def test_concurrent_transforms_on_the_export_path_all_succeed(fast_switching):
    results = []

    def run(width):
        def go():
            for _ in range(3):
                q = fracpass.transform(_ShapeBranch(width), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),))
                results.append((q.fracpass.method, q(torch.randn(3, 4)).shape))
        return go

    with _TensorUsers(1) as users:
        errors = _run_threads([run(3), run(5)])
    assert errors == [], [str(e).splitlines()[:3] for e in errors]
    assert users.failures == [], f"{len(users.failures)} failures, first: {users.failures[0]}"
    assert sorted(results) == sorted([("export", torch.Size([3, 3]))] * 3 + [("export", torch.Size([3, 5]))] * 3)
    assert bool(torch.tensor(True))


# --- state updated in forward --------------------------------------------------------------------------------------

class _Counts(nn.Module):
    """`self.count += 1`: fx runs it once on the real buffer and leaves it out of the graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("count", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.count += 1
        return self.fc(x)


class _Ema(nn.Module):
    """`self.ema.mul_(0.9)`: the decay runs once at trace time and is missing from an fx graph."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.register_buffer("ema", torch.ones(3))

    def forward(self, x):
        y = self.fc(x)
        if self.training:
            self.ema.mul_(0.9).add_(0.1 * y.detach().mean(0))
        return y


FULL = dict(w=32, a=32, g=32)  # quantizes nothing: the transformed model must compute what the plain one does


@pytest.mark.parametrize("factory, buffer", [(_Counts, "count"), (_Ema, "ema")])
def test_buffer_updated_in_forward_is_kept(factory, buffer):
    torch.manual_seed(0)
    model = factory()
    xs = [torch.randn(4, 4) for _ in range(5)]
    qmodel = fracpass.transform(model, fracpass.Plan.static(**FULL), example_inputs=(xs[0],))
    assert qmodel.fracpass.method == "export"
    assert any(f"forward updates buffer {buffer} in place" in note for note in qmodel.fracpass.notes)
    assert f"note: captured with torch.export: forward updates buffer {buffer} in place" in fracpass.summary(qmodel)
    assert torch.equal(qmodel.state_dict()[buffer], getattr(model, buffer))  # the trace did not update it
    for x in xs:  # 5 train steps
        model(x).sum().backward()
        qmodel(x).sum().backward()
    assert buffer in qmodel.state_dict()
    torch.testing.assert_close(qmodel.state_dict()[buffer], getattr(model, buffer), rtol=0, atol=1e-6)
    assert not torch.equal(getattr(model, buffer), getattr(factory(), buffer))  # really updated
    qmodel.eval()
    before = qmodel.state_dict()[buffer].clone()
    qmodel(xs[0])
    assert torch.equal(qmodel.state_dict()[buffer], before)  # eval mode does not update it, as in the model


def test_buffer_updated_in_forward_without_example_inputs_or_with_forced_fx_says_why():
    with pytest.raises(fracpass.TraceError, match=r"forward updates buffer ema in place, which fx runs once while "
                                                  r"tracing(.|\n)*torch\.export was not tried: it needs example inputs"):
        fracpass.transform(_Ema(), fracpass.Plan.static())
    with pytest.raises(fracpass.TraceError, match=r"forward updates buffer count in place(.|\n)*"
                                                  r"torch\.export was not tried because capture_method='fx'"):
        fracpass.transform(_Counts(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),),
                           capture_method="fx")


def test_plain_models_stay_on_the_fx_path_without_notes():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())  # BN's buffers update in its own call
    qmodel = fracpass.transform(model, fracpass.Plan.static(), example_inputs=(torch.randn(2, 3, 8, 8),))
    assert qmodel.fracpass.method == "fx" and qmodel.fracpass.notes == ()
    assert int(model[1].num_batches_tracked) == 0


# --- transforming a transformed model ------------------------------------------------------------------------------

def test_transforming_a_transformed_model_says_so():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    qmodel = fracpass.transform(model, fracpass.Plan.static())
    with pytest.raises(fracpass.PlanError, match=r"Sequential is already transformed by fracpass.*"
                                                 r"fracpass\.set_stage\(qmodel, stage\).*transform the original model"):
        fracpass.transform(qmodel, fracpass.Plan.static(w=4, a=4, g=8))
    with pytest.raises(fracpass.PlanError, match=r"Sequential contains a model already transformed by fracpass "
                                                 r"at 'body'"):
        fracpass.transform(nn.Sequential(collections.OrderedDict(body=qmodel, head=nn.Linear(2, 2))),
                           fracpass.Plan.static())


# --- errors a new user meets ---------------------------------------------------------------------------------------

USER_SCRIPT = '''
import torch
from torch import nn


class UserModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # the line the error must name
            return self.fc(x)
        return x
'''


def test_trace_error_names_user_line_in_a_folder_named_fracpass(tmp_path):
    path = tmp_path / "fracpass" / "user_model.py"  # a clone of the repository is a folder named fracpass
    path.parent.mkdir()
    path.write_text(textwrap.dedent(USER_SCRIPT))
    spec = importlib.util.spec_from_file_location("user_model_in_fracpass_folder", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    line = USER_SCRIPT.splitlines().index("        if x.sum() > 0:  # the line the error must name") + 1
    with pytest.raises(fracpass.TraceError) as info:
        fracpass.transform(module.UserModel(), fracpass.Plan.static(), capture_method="fx")
    assert f"torch.fx.symbolic_trace failed in module <root> at {path}:{line} (if x.sum() > 0:" in str(info.value)


class _Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, tokens, mask=None):
        return self.embed(tokens)


def test_example_inputs_are_checked_against_forward_at_once():
    tokens = torch.randint(0, 10, (2, 5))
    with pytest.raises(fracpass.TraceError, match=r"example_kwargs: _Tokens\.forward\(tokens, mask=None\) has no "
                                                  r"parameter 'input_ids'"):
        fracpass.transform(_Tokens(), fracpass.Plan.static(), example_kwargs=dict(input_ids=tokens))
    with pytest.raises(fracpass.TraceError, match=r"example_inputs: 3 given, but _Tokens\.forward\(tokens, mask=None\) "
                                                  r"takes at most 2 positional"):
        fracpass.transform(_Tokens(), fracpass.Plan.static(), example_inputs=(tokens, None, tokens))
    with pytest.raises(fracpass.TraceError, match=r"example inputs give no value for 'tokens' of "
                                                  r"_Tokens\.forward\(tokens, mask=None\)"):
        fracpass.transform(_Tokens(), fracpass.Plan.static(), example_kwargs=dict(mask=None))
    with pytest.raises(fracpass.TraceError, match=r"example inputs give 'tokens' twice"):
        fracpass.transform(_Tokens(), fracpass.Plan.static(), example_inputs=(tokens,), example_kwargs=dict(tokens=tokens))
    qmodel = fracpass.transform(_Tokens(), fracpass.Plan.static(), example_kwargs=dict(tokens=tokens))
    assert qmodel(tokens).shape == (2, 5, 4)


def test_trace_error_leaves_no_torch_graph_text_on_stderr(capfd):
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(fracpass.TraceError, match="torch.export \\(non-strict\\) failed"):
        fracpass.transform(DataDependent(), fracpass.Plan.static(), example_inputs=(torch.randn(2, 4),))
    err = capfd.readouterr().err
    assert "def forward" not in err and "torch.ops.aten" not in err and "Unable to find user code" not in err
    assert err == ""
