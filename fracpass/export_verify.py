"""How fracpass.export_onnx checks what it wrote before writing it: the exported bytes run in onnxruntime
on the example inputs (and one more sample with a dynamic batch), compared with PyTorch end to end and,
layer by layer, each activation quantizer's codes (a code one step off next to a rounding boundary is a
tie, anything else a wrong scale, zero point or shape)."""
from __future__ import annotations

import logging
from typing import Any, Dict, Optional, Tuple

import numpy as np
import torch
from torch import nn

from fracpass.errors import ExportError
from fracpass.gating import GatedActQuant
from fracpass.quant import FULL_PRECISION, ActQuant

log = logging.getLogger("fracpass.export")


def _first_tensor(output: Any) -> torch.Tensor:
    from torch.utils import _pytree as pytree

    if hasattr(output, "to_tuple"):  # transformers' ModelOutput
        output = output.to_tuple()
    return next(x for x in pytree.tree_leaves(output) if isinstance(x, torch.Tensor))


def verification_inputs(args, kwargs, dynamic_batch: bool):
    """The example inputs, and with a dynamic batch the same plus one more sample."""
    from torch.utils import _pytree as pytree

    cases = [(tuple(args), dict(kwargs))]
    if dynamic_batch:
        grow = lambda x: torch.cat([x, x[:1]]) if isinstance(x, torch.Tensor) and x.dim() > 0 else x
        cases.append((pytree.tree_map(grow, tuple(args)), pytree.tree_map(grow, dict(kwargs))))
    return cases


def run_recording(qmodel: nn.Module, args, kwargs):
    """qmodel's first output tensor; per gated activation quantizer (by its ONNX stem) the option each
    sample's gate chose; and per plain activation quantizer, in the order they ran, its input and output
    (what the layer-by-layer judgement compares onnxruntime's Q/DQ with)."""
    choices, acts, hooks = {}, {}, []
    for name, q in qmodel.named_modules():
        stem = name.replace(".", "_")
        if isinstance(q, GatedActQuant):
            def record(module, inputs, output, stem=stem):
                choices[stem] = inputs[1].detach().argmax(1)
                acts.setdefault(stem, (inputs[0].detach(), output.detach(), choices[stem]))
            hooks.append(q.register_forward_hook(record))
        elif isinstance(q, ActQuant) and q.bits < FULL_PRECISION:
            def record_act(module, inputs, output, stem=stem):
                acts.setdefault(stem, (inputs[0].detach(), output.detach(), None))
            hooks.append(q.register_forward_hook(record_act))
    try:
        with torch.no_grad():
            return _first_tensor(qmodel(*args, **kwargs)), choices, acts
    finally:
        for h in hooks:
            h.remove()


def verify_onnx(data: bytes, references, dynamic_batch: bool) -> None:
    """Run the exported bytes in onnxruntime and compare with PyTorch. A coarse check, mean |diff|
    <= 1e-2 of the output range: on a few example samples one value on a rounding boundary can
    land a step apart and propagate, while a wrong scale, zero point or baked shape is far off.

    With gates, a sample whose gate logits nearly tie can pick another option in onnxruntime (its
    float sums differ by an ulp), and at 3-4 bits that moves its output far. So the gates' choices
    are read from the exported graph too: samples where any gate chose differently are left out of
    the comparison (logged), and at least half the samples must agree on every choice.

    Every plain activation quantizer is also compared, layer by layer (``_judge_layers``): onnxruntime
    and PyTorch sum convolutions in other orders, so a code whose unrounded value sat on a rounding
    boundary can land one step apart and move a small output range by more than 1e-2. Such an export
    is correct and is written; one whose first differing layer differs otherwise (a wrong scale, which
    at 8 bits can leave the output within 1e-2 of its range) is refused, naming that layer."""
    try:
        import onnx
        import onnxruntime as ort
    except ImportError:
        log.info("onnxruntime is not installed: the exported model was not verified")
        return
    stems = sorted({stem for _, _, _, choices, _ in references for stem in choices})
    if stems:  # expose each gated quantizer's ArgMax as an extra output of a verification copy
        model = onnx.load_from_string(data)
        model.graph.output.extend(onnx.helper.make_tensor_value_info(f"{stem}_choice", onnx.TensorProto.INT64, None)
                                  for stem in stems)
        data = model.SerializeToString()
    session = ort.InferenceSession(data)
    names = [i.name for i in session.get_inputs()]
    for i, (args, kwargs, expected, choices, acts) in enumerate(references):
        values = list(args) + list(kwargs.values())
        feeds = {n: v.numpy() for n, v in zip(names, [v for v in values if isinstance(v, torch.Tensor)])}
        try:
            got, *onnx_choices = session.run([session.get_outputs()[0].name] + [f"{s}_choice" for s in stems], feeds)
        except Exception as e:
            what = "at a batch size other than the example's" if i else "on the example inputs"
            hint = (": the traced graph fixed the batch size somewhere; export with dynamic_batch=False"
                    if i else "")
            raise ExportError(f"export_onnx: the exported model fails in onnxruntime {what}{hint} "
                              f"({str(e).splitlines()[0][:300]})") from e
        expected = expected.numpy()
        same = np.ones(expected.shape[0] if expected.ndim else 1, dtype=bool)
        if stems and got.shape == expected.shape:
            for stem, theirs in zip(stems, onnx_choices):
                ours = choices[stem].numpy()
                if theirs.shape == ours.shape == same.shape:
                    same &= theirs == ours
            if same.sum() * 2 < same.size:
                raise ExportError(f"export_onnx: the exported gates choose differently from PyTorch's on {(~same).sum()} "
                                  f"of {same.size} samples; nothing was written. {_ANYWAY}")
            if not same.all():
                log.info("export_onnx: verification leaves out %d of %d samples whose gate logits nearly tie "
                         "(onnxruntime picked another option)", (~same).sum(), same.size)
            got, expected = got[same], expected[same]
        scale = float(expected.max() - expected.min()) or 1.0
        mean_diff = float(np.abs(got - expected).mean()) if got.shape == expected.shape else float("nan")
        differs = (f"onnxruntime's output differs from PyTorch's (shape {got.shape} vs {expected.shape}, "
                   f"mean |diff| {mean_diff:.3g} vs range {scale:.3g})")
        if got.shape != expected.shape:
            raise ExportError(f"export_onnx: {differs}; nothing was written. {_ANYWAY}")
        verdict, layer = _judge_layers(data, feeds, acts, same)
        if layer == "differs":  # a wrong scale, zero point or op shows here even where the output stays close
            raise ExportError(f"export_onnx: onnxruntime's output differs from PyTorch's in its quantized activations: {verdict} "
                              f"(end to end: mean |diff| {mean_diff:.3g} vs range {scale:.3g}); nothing was written. "
                              f"{_ANYWAY}")
        if mean_diff <= 1e-2 * scale:
            continue
        if layer == "ties":
            log.info("export_onnx: %s, from rounding ties: %s; written", differs, verdict)
            continue
        raise ExportError(f"export_onnx: {differs}; {verdict}; nothing was written. {_ANYWAY}")


_TIE_BAND = 0.05  # of a step: how near a rounding boundary a flipped code may have sat to count as a tie
# a share of a layer's codes one step apart beyond which the export is wrong whatever its output; below it, one-step
# flips away from a boundary (seen at a model input's 4-bit codes while the output matched to 4e-9 of its range in
# the fuzz tests) are judged by the output
_FLIPS_LIMIT = 0.05
_ANYWAY = "If you have checked the model otherwise, write it anyway with export_onnx(..., verify=False)"


def _judge_layers(data: bytes, feeds, acts: Dict[str, Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]],
                  samples: np.ndarray) -> Tuple[str, str]:
    """Compare every activation quantizer's output in onnxruntime with PyTorch's, in execution order,
    up to the first that differs, on ``samples`` (those whose gates chose alike). ``acts`` holds per
    quantizer its input, its output and, for a gated one, each sample's option. Returns what was found
    and a verdict: "equal", "ties", "flips" (one-step flips that are not clearly ties: the output
    decides) or "differs" (codes several steps apart, or more than ``_FLIPS_LIMIT`` of a layer).

    Ties: each differing code is one step apart and its unrounded PyTorch value sat within float
    noise (or ``_TIE_BAND`` of a step) of a rounding boundary, in at most 1 % of the layer's elements or 4 of them (onnxruntime and PyTorch sum
    convolutions in other orders). A gated quantizer is judged per sample on its option's grid (a
    sample at a skip or full-precision option passes its input through and is not judged): a tie there
    grows through the low-precision layers after it, so judging only the plain quantizers would meet it
    downstream as codes several steps apart. A wrong scale, zero point, rounding mode or op shows at
    its first layer otherwise. Later layers are not judged: their inputs already differ."""
    import onnx
    import onnxruntime as ort

    model = onnx.load_from_string(data)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    dequant = {}  # stem -> the tensor its (gated) dequantize writes
    for node in model.graph.node:
        for suffix in ("/DequantizeLinear", "/GatedDequantize"):
            if node.name.endswith(suffix):
                dequant[node.name[:-len(suffix)]] = node.output[0]

    def grid(stem: str, choice: Optional[torch.Tensor]):
        """Per sample (or for the tensor) the scale and zero point of the codes; None if not comparable."""
        if choice is None:
            scale = inits.get(f"{stem}_scale")
            return None if scale is None or scale.size != 1 else (float(scale), float(inits[f"{stem}_zero_point"]))
        scales, active = inits.get(f"{stem}_scales"), inits.get(f"{stem}_actives")
        if scales is None or active is None:
            return None
        return scales[choice.numpy()].astype(np.float64), active[choice.numpy()]

    stems = [stem for stem in acts if stem in dequant and grid(stem, acts[stem][2]) is not None]
    if not stems:
        return "no activation quantizer to compare", "equal"
    known = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_value_info(dequant[stem], onnx.TypeProto())
                              for stem in stems if dequant[stem] not in known)
    session = ort.InferenceSession(model.SerializeToString())
    outputs = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))
    for stem in stems:
        inp, ours, choice = acts[stem]
        inp, ours, theirs = inp.numpy(), ours.numpy(), outputs[dequant[stem]]
        if theirs.shape != ours.shape:
            return f"the first layer that differs is {stem} (shape {theirs.shape} vs {ours.shape})", "differs"
        keep = samples if ours.ndim and ours.shape[0] == samples.size else None
        if choice is None:
            scale, zero = grid(stem, None)
        else:  # per sample, broadcast over the rest; samples at a pass-through option are not judged
            scales, active = grid(stem, choice)
            keep = active.astype(bool) if keep is None else keep & active.astype(bool)
            scale, zero = scales.reshape((-1,) + (1,) * (ours.ndim - 1)), 0.0
        if keep is not None and not keep.all():
            inp, ours, theirs = inp[keep], ours[keep], theirs[keep]
            scale = scale[keep] if isinstance(scale, np.ndarray) else scale
        if ours.size == 0:
            continue
        steps = np.abs(theirs - ours) / scale
        off = steps > 1e-3
        if not off.any():
            continue
        code = (inp / scale + zero)[off]
        from_boundary = np.abs(np.abs(code - np.floor(code)) - 0.5)
        # float32 sums in another order differ by ~1e-6 of their inputs' magnitude
        noise = 1e-3 + 1e-6 * float(np.abs(inp).max() / np.min(scale))
        found = (f"the first layer that differs is {stem}: {off.mean():.2g} of its codes, by up to "
                 f"{steps.max():.3g} steps, up to {from_boundary.max():.2g} of a step from a rounding boundary")
        few = off.mean() <= 1e-2 or off.sum() <= 4  # a small layer (a classifier's input) may hold one tie in 20
        # near a boundary: within float noise for a layer after a convolution; a model input's codes at 2-3 bits
        # flipped 2e-3 of a step from one in the fuzz tests (a wrong scale, zero point or rounding mode flips far
        # more than 1 % of a layer, and by several steps)
        near = max(noise, _TIE_BAND)
        one_step = np.all(np.abs(steps[off] - 1) <= noise)
        if few and one_step and np.all(from_boundary <= near):
            return found, "ties"
        # a wrong scale, zero point or rounding mode moves codes by several steps, or a large share of a layer
        gross = not one_step or off.mean() > _FLIPS_LIMIT
        return found, "differs" if gross else "flips"
    return "every quantized activation agrees; the difference lies after the last quantizer", "equal"

