"""What runs where: op_paths and product_paths, read from each native call's site record."""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import nn

from fracpass import meta
from fracpass.gating import GatedGradQuant
from fracpass.native import calls, decide, int8_mm, options
from fracpass.native.site import NATIVE, LastCall
from fracpass.state import model_state

_NEVER = LastCall()  # a call without a site: nothing recorded


def product_paths(qmodel: nn.Module) -> Dict[str, Tuple[str, ...]]:
    """op name -> what each of its products runs on at the current stage, "int8", "fp8", "bf16" or "fp32":
    the forward, then the gradient of each operand (the cost report's ``OpCost.products`` order).
    Simulated ops run every product in float32 (on quantized values). A gated op's backward entries
    are those of its samples at <= 8 gradient bits (the others run in fp32)."""
    paths = op_paths(qmodel)
    out = {}
    for node in qmodel.graph.nodes:
        if node.name not in paths:
            continue
        path = paths[node.name][0]
        if path == "simulated":
            info = meta.op_info(node)
            # an unlowered module call (an excluded stem) has its weight as the module's parameter
            out[node.name] = ("fp32",) * (1 + len(info.act_args) + len(info.weight_args) + info.module_weight)
        elif node.target is calls.native_conv2d:  # oneDNN's int8 convolution: forward only
            out[node.name] = ("int8", "fp32", "fp32")
        else:
            rule, (qa, qb, gq) = calls.CALLS[node.target], calls.quantizer_modules(qmodel, node)
            site = calls.site_of(qmodel, node)
            last = site.last if site is not None else _NEVER
            gbits = decide.grad_bits(gq)
            if isinstance(gq, GatedGradQuant) and min(gq.options.tolist()) <= options.MAX_INT8_BITS:
                gbits = min(gbits, options.MAX_INT8_BITS)  # the products of the samples at <= 8 gradient bits
            runs = (path,) + decide.backward_products(qa, qb, gbits, path, _quantizer_device((qa, qb, gq)))
            if path == "bf16" and rule.kind.startswith("conv"):  # products on oneDNN's int8 convolution
                int8 = last.int8
                runs = tuple("int8" if f and how == "bf16" else how for how, f in zip(runs, int8)) + runs[3:]
            if path == "int8":  # int8 ops are never gated: gbits is decide.grad_bits(gq)
                runs = tuple("fp8" if how == "int8" and f else how for how, f in zip(runs, int8_mm.last_call_fp8(site, qa, qb, gq)))
            out[node.name] = runs
    return out


def _quantizer_device(mods) -> torch.device:
    """The device an op's quantizers (their buffers) live on: the model's."""
    for q in mods:
        for buf in (q.buffers() if q is not None else ()):
            return buf.device
    return torch.device("cpu")


def op_paths(qmodel: nn.Module) -> Dict[str, Tuple[str, str]]:
    """op name -> (path at the current stage: "int8", "bf16" or "simulated", why not native / what runs in fp32).

    Decided from the quantizers' current bits and their device's units (an int8 op whose products run on
    FP8 says so in the note); a reason that depends on the operands
    (a batched right operand, another dtype or device) is the one seen at the op's last call."""
    execution = model_state(qmodel).execution
    paths = {}
    for node in qmodel.graph.nodes:
        if meta.op_info(node) is None or meta.qspec(node) is None:
            continue
        if node.target in calls.CALLS:
            rule, mods = calls.CALLS[node.target], calls.quantizer_modules(qmodel, node)
            site = calls.site_of(qmodel, node)
            last = site.last if site is not None else _NEVER
            gated_call = len(node.args) > rule.first_q + 3  # its gate's one-hot choice follows the quantizers
            batched = last.path == "bf16" if last.path is not None else meta.op_info(node).kind == "bmm"
            bf16 = rule.path == "bf16" or (rule.path == "mm" and (gated_call or (
                node.target is calls.native_matmul and mods[0] is not None and batched)))
            path, note = decide.decide(*mods, path="bf16" if bf16 else "int8", device=_quantizer_device(mods))
            if path == "int8" and node.target is calls.native_conv2d:
                note = ("forward only: both backward products in fp32 (oneDNN has no int8 weight-gradient or "
                        "transposed convolution here)")
            if path == "int8" and node.target is not calls.native_conv2d:  # products on FP8 at the last call
                names = [what for what, f in zip(("the forward", "the first operand's gradient", "the second's"),
                                                 int8_mm.last_call_fp8(site, *mods)) if f]
                if names:
                    note = "; ".join(filter(None, [note, f"{', '.join(names)} on FP8 e4m3 (<= 4-bit codes: exact)"]))
            int8 = last.int8 if path == "bf16" else (False,) * 3
            if rule.kind.startswith("conv") and any(int8):
                which = ", ".join(w for w, f in zip(("the forward product", "the input gradient's",
                                                     "the weight gradient's"), int8) if f)
                note = "; ".join(filter(None, [note, f"{which} on int8 at the last call (exact integer sums)"]))
            if last.converted and path == "bf16":  # NativeOptions.channels_last
                note = "; ".join(filter(None, [note, f"its NCHW {' and '.join(last.converted)} converted to "
                                                     "channels_last at the last call"]))
            bn_note = last.bn if rule.is_fused and path == "bf16" else None
            if bn_note:  # how the last call ran the fused BatchNorm
                note = "; ".join(filter(None, [note, bn_note]))
            if path != "simulated" and last.fallback:  # the bits allow it, the operands of the last call did not
                path, note = "simulated", f"at the last call: {last.fallback}"
            paths[node.name] = (path, note)
        elif execution != "native":
            paths[node.name] = ("simulated", "execution='simulate'")
        else:
            info = node.meta.get(NATIVE)
            paths[node.name] = ("simulated", info.reason if info is not None else "not lowered")
    return paths
