"""The Q/DQ rewrite of an exported graph (fracpass.export_onnx's second half): each quantizer's marker op
(``fracpass::Quant``, ``fracpass::GatedQuant``) expanded, with onnx-graphsurgeon, into the form onnxruntime
computes exactly for its bit width (fracpass/export.py's docstring lists them), uint4 weights repacked, and a
Conv/Gemm bias moved into its own Add."""
from __future__ import annotations

from typing import Dict, Tuple

import numpy as np
import torch

from fracpass.errors import ExportError
from fracpass.gating import GatedActQuant
from fracpass.quant import FULL_PRECISION, ActQuant, Quantizer, WeightQuant, affine_params


def _integer_type(bits: int):
    import onnx

    if bits <= 4:
        return onnx.TensorProto.UINT4
    return onnx.TensorProto.UINT8 if bits <= 8 else onnx.TensorProto.UINT16


def _qparams(q: Quantizer, mn: torch.Tensor, mx: torch.Tensor) -> Tuple[np.ndarray, np.ndarray, float]:
    levels = float(2**q.bits - 1)
    scale, lo, _ = affine_params(mn.float(), mx.float(), levels)
    return scale.numpy().astype(np.float32), (-lo).numpy().astype(np.int64), levels


def expand_markers(model, quantizers: Dict[str, Quantizer]):
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    for node in [n for n in graph.nodes if n.op in ("Quant", "GatedQuant") and n.domain == "fracpass"]:
        name = node.attrs["name"]
        q = quantizers[name]
        src, out = node.inputs[0], node.outputs[0]
        onehot = node.inputs[1] if node.op == "GatedQuant" else None
        node.outputs.clear()
        node.inputs.clear()
        stem = name.replace(".", "_")
        if onehot is not None:
            _gated_act(graph, q, src, onehot, out, stem)
        elif isinstance(q, WeightQuant):
            _weight_qdq(graph, q, src, out, stem)
        else:
            _act_qdq(graph, q, src, out, stem)
    _bypass_identities(graph)
    _name_ops_like_fx(graph, quantizers)
    _split_bias(graph)
    graph.cleanup().toposort()
    uint4 = graph.__dict__.get("_fracpass_uint4", set())
    model = gs.export_onnx(graph)
    _repack_uint4(model, uint4)
    for op in [op for op in model.opset_import if op.domain == "fracpass"]:
        model.opset_import.remove(op)
    return model


def _act_qdq(graph, q: ActQuant, src, out, stem: str) -> None:
    import onnx_graphsurgeon as gs

    scale, zp, levels = _qparams(q, q.running_min, q.running_max)
    small = q.bits <= 8
    zp_dtype = np.uint8 if small else np.uint16
    s = gs.Constant(f"{stem}_scale", np.asarray(scale, dtype=np.float32).reshape(()))
    z = gs.Constant(f"{stem}_zero_point", np.asarray(zp, dtype=zp_dtype).reshape(()))
    quantized = gs.Variable(f"{stem}_q", dtype=zp_dtype)
    graph.nodes.append(gs.Node("QuantizeLinear", f"{stem}/QuantizeLinear", inputs=[src, s, z], outputs=[quantized]))
    clipped = quantized
    if q.bits not in (8, 16):
        if small:
            clipped = gs.Variable(f"{stem}_clipped", dtype=zp_dtype)
            graph.nodes.append(gs.Node("Clip", f"{stem}/Clip", inputs=[
                quantized, gs.Constant(f"{stem}_qmin", np.asarray(0, np.uint8)),
                gs.Constant(f"{stem}_qmax", np.asarray(int(levels), np.uint8))], outputs=[clipped]))
        else:  # Clip on 16-bit integers is not implemented in onnxruntime's CPU provider: clip in int32
            wide = gs.Variable(f"{stem}_q32", dtype=np.int32)
            wide_clip = gs.Variable(f"{stem}_clipped32", dtype=np.int32)
            clipped = gs.Variable(f"{stem}_clipped", dtype=zp_dtype)
            graph.nodes += [
                gs.Node("Cast", f"{stem}/CastUp", attrs={"to": 6}, inputs=[quantized], outputs=[wide]),
                gs.Node("Clip", f"{stem}/Clip", inputs=[wide, gs.Constant(f"{stem}_qmin", np.asarray(0, np.int32)),
                                                        gs.Constant(f"{stem}_qmax", np.asarray(int(levels), np.int32))],
                        outputs=[wide_clip]),
                gs.Node("Cast", f"{stem}/CastDown", attrs={"to": 4}, inputs=[wide_clip], outputs=[clipped]),
            ]
    graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}/DequantizeLinear", inputs=[clipped, s, z], outputs=[out]))


def _gated_act(graph, q: GatedActQuant, src, onehot, out, stem: str) -> None:
    """Per-sample fake quantization: the sample's option (ArgMax of the gate's one-hot) picks its scale and bounds."""
    import onnx_graphsurgeon as gs

    options = q.options.tolist()
    levels = [float(2**a - 1) if 0 < a < FULL_PRECISION else 0.0 for a in options]
    scales, lows, highs = [], [], []
    table_min, table_max = q.eval_ranges()
    for k, lv in enumerate(levels):
        if lv == 0:  # skip / not quantized: the row passes through (Where below); placeholders keep shapes
            scales.append(1.0), lows.append(0.0), highs.append(0.0)
            continue
        scale, lo, hi = affine_params(table_min[k].float(), table_max[k].float(), lv)
        scales.append(float(scale)), lows.append(float(lo)), highs.append(float(hi))
    v = lambda suffix, dtype=np.float32: gs.Variable(f"{stem}_{suffix}", dtype=dtype)
    choice = v("choice", np.int64)
    nodes = [gs.Node("ArgMax", f"{stem}/ArgMax", attrs={"axis": 1, "keepdims": 0}, inputs=[onehot], outputs=[choice])]
    if src.shape:  # rank known: (B,) -> (B, 1, ..., 1) by Unsqueeze
        axes = gs.Constant(f"{stem}_axes", np.arange(1, len(src.shape), dtype=np.int64))
        rank_nodes, per_sample = [], lambda key, flat, shaped: gs.Node(
            "Unsqueeze", f"{stem}/Unsqueeze_{key}", inputs=[flat, axes], outputs=[shaped])
    else:  # rank unknown (the exporter left no shape): reshape to [-1] + [1] * (rank - 1), read off Shape(src)
        rank_nodes, per_sample = _broadcast_shape(src, stem)
    nodes += rank_nodes
    picked = {}
    for key, values, dtype in (("scale", scales, np.float32), ("low", lows, np.float32), ("high", highs, np.float32),
                               ("active", [lv > 0 for lv in levels], np.bool_)):
        flat, shaped = v(f"{key}_row", dtype), v(f"{key}_b", dtype)
        nodes += [gs.Node("Gather", f"{stem}/Gather_{key}", attrs={"axis": 0},
                          inputs=[gs.Constant(f"{stem}_{key}s", np.asarray(values, dtype=dtype)), choice], outputs=[flat]),
                  per_sample(key, flat, shaped)]
        picked[key] = shaped
    div, rnd, lo, hi, deq = v("div"), v("round"), v("max"), v("min"), v("dq")
    nodes += [gs.Node("Div", f"{stem}/Div", inputs=[src, picked["scale"]], outputs=[div]),
              gs.Node("Round", f"{stem}/Round", inputs=[div], outputs=[rnd]),
              gs.Node("Max", f"{stem}/Max", inputs=[rnd, picked["low"]], outputs=[lo]),
              gs.Node("Min", f"{stem}/Min", inputs=[lo, picked["high"]], outputs=[hi]),
              gs.Node("Mul", f"{stem}/Mul", inputs=[hi, picked["scale"]], outputs=[deq]),
              gs.Node("Where", f"{stem}/GatedDequantize", inputs=[picked["active"], deq, src], outputs=[out])]
    graph.nodes += nodes


def _broadcast_shape(src, stem: str):
    """Nodes computing [-1, 1, ..., 1] of src's rank, and a maker of the Reshape that gives a per-sample
    vector that shape. A gated activation of any rank ((B, C), (B, T, C), (B, C, H, W)) takes this form when
    the exporter recorded no static shape for it."""
    import onnx_graphsurgeon as gs

    shape, tail, zeros, ones, target = (gs.Variable(f"{stem}_{n}", dtype=np.int64)
                                        for n in ("shape", "tail", "tail0", "ones", "bshape"))
    nodes = [gs.Node("Shape", f"{stem}/Shape", inputs=[src], outputs=[shape]),
             gs.Node("Slice", f"{stem}/SliceTail", inputs=[shape, gs.Constant(f"{stem}_one", np.asarray([1], np.int64)),
                                                          gs.Constant(f"{stem}_end", np.asarray([2**62], np.int64))],
                     outputs=[tail]),
             gs.Node("Mul", f"{stem}/Zeros", inputs=[tail, gs.Constant(f"{stem}_zero", np.asarray(0, np.int64))],
                     outputs=[zeros]),
             gs.Node("Add", f"{stem}/Ones", inputs=[zeros, gs.Constant(f"{stem}_unit", np.asarray(1, np.int64))],
                     outputs=[ones]),
             gs.Node("Concat", f"{stem}/BroadcastShape", attrs={"axis": 0},
                     inputs=[gs.Constant(f"{stem}_batch", np.asarray([-1], np.int64)), ones], outputs=[target])]
    reshape = lambda key, flat, shaped: gs.Node("Reshape", f"{stem}/Reshape_{key}", inputs=[flat, target],
                                                outputs=[shaped])
    return nodes, reshape


def _weight_qdq(graph, q: WeightQuant, src, out, stem: str) -> None:
    import onnx
    import onnx_graphsurgeon as gs

    if not isinstance(src, gs.Constant):
        raise ExportError(f"export_onnx: weight quantizer {stem!r} does not read a parameter in the exported graph "
                          f"(its input is computed: {src.name!r}); exclude the op or keep its weights at 32 bits")
    w = torch.from_numpy(np.array(src.values)).float()
    axis = None if q.axis is None else q.axis % w.dim()
    if axis is None:
        mn, mx = torch.aminmax(w)
    else:
        mn, mx = torch.aminmax(w.movedim(axis, 0).reshape(w.shape[axis], -1), dim=1)
    scale, zp, levels = _qparams(q, mn, mx)
    shape = [1] * w.dim()
    if axis is not None:
        shape[axis] = -1
    s_b, z_b = torch.from_numpy(scale).view(shape), torch.from_numpy(zp).view(shape).float()
    ints = (torch.round(w / s_b) + z_b).clamp_(0, levels).to(torch.int64).numpy()
    dtype = _integer_type(q.bits)
    holder = np.uint16 if q.bits > 8 else np.uint8  # uint4 is repacked after export (_repack_uint4)
    per_channel = axis is not None and scale.size > 1
    attrs = {"axis": axis} if per_channel else {}
    zp_values = zp.astype(holder).reshape(-1) if per_channel else zp.astype(holder).reshape(())
    weight = gs.Constant(f"{stem}_int", ints.astype(holder))
    z = gs.Constant(f"{stem}_zero_point", zp_values)
    if dtype == onnx.TensorProto.UINT4:
        graph.__dict__.setdefault("_fracpass_uint4", set()).update({weight.name, z.name})
    s = gs.Constant(f"{stem}_scale", scale.astype(np.float32).reshape(-1) if per_channel else
                    scale.astype(np.float32).reshape(()))
    graph.nodes.append(gs.Node("DequantizeLinear", f"{stem}/DequantizeLinear", attrs=attrs, inputs=[weight, s, z],
                               outputs=[out]))
    if w.dim() == 2:
        _matmul_as_einsum(out)


def _matmul_as_einsum(weight) -> None:
    """Turn ``MatMul(x, W)`` and ``MatMul(x, Transpose(W))`` (a linear on a 3-D input) on a
    dequantized weight into an Einsum of the same product.

    onnxruntime fuses DequantizeLinear -> MatMul(B) into MatMulNBits, seeing through a Transpose in
    between, and by default (accuracy_level 4) that kernel rounds the activations to int8 inside: up
    to 1e-2 of the output range off PyTorch. An Einsum keeps the Q/DQ form and is computed in float32.
    """
    for user in list(weight.outputs):
        if user.op == "MatMul" and len(user.inputs) > 1 and user.inputs[1] is weight:
            user.op, user.attrs = "Einsum", {"equation": "...k,kn->...n"}
        elif user.op == "Transpose" and list(user.attrs.get("perm", [1, 0])) == [1, 0]:
            for matmul in list(user.outputs[0].outputs):
                if matmul.op == "MatMul" and len(matmul.inputs) > 1 and matmul.inputs[1] is user.outputs[0]:
                    matmul.op, matmul.attrs = "Einsum", {"equation": "...k,nk->...n"}
                    matmul.inputs[1] = weight


def _bypass_identities(graph) -> None:
    """Drop the Identity nodes left where gradient quantizers (training-only) were."""
    outputs = set(id(t) for t in graph.outputs)
    for node in [n for n in graph.nodes if n.op == "Identity"]:
        src, dst = node.inputs[0], node.outputs[0]
        if id(dst) in outputs:
            continue
        for consumer in list(dst.outputs):
            for i, tensor in enumerate(list(consumer.inputs)):
                if tensor is dst:
                    consumer.inputs[i] = src
        node.outputs.clear()


def _name_ops_like_fx(graph, quantizers: Dict[str, Quantizer]) -> None:
    """Give each compute node the name of the fx node it came from (the one its quantizers serve)."""
    taken = {n.name for n in graph.nodes}
    for name, q in quantizers.items():
        stem = name.replace(".", "_")
        dq = next((n for n in graph.nodes if n.name in (f"{stem}/DequantizeLinear", f"{stem}/GatedDequantize")), None)
        source = name.rsplit("_wq" if isinstance(q, WeightQuant) else "_aq", 1)[0]
        if dq is None or source in taken:
            continue
        consumers = [c for c in dq.outputs[0].outputs if c.op in ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")]
        if not consumers:  # a weight may pass through a Transpose before its MatMul
            consumers = [c2 for c in dq.outputs[0].outputs if c.op == "Transpose" for c2 in c.outputs[0].outputs
                         if c2.op in ("MatMul", "Gemm")]
        if len(consumers) == 1:
            consumers[0].name = source
            taken.add(source)


def _repack_uint4(model, names) -> None:
    """graph-surgeon cannot write 4-bit tensors: store the ones held as uint8 as UINT4."""
    import onnx
    from onnx import numpy_helper

    for i, init in enumerate(model.graph.initializer):
        if init.name in names:
            values = numpy_helper.to_array(init)
            model.graph.initializer[i].CopyFrom(onnx.helper.make_tensor(
                init.name, onnx.TensorProto.UINT4, list(values.shape), values.flatten().tolist()))


def _split_bias(graph) -> None:
    """Conv/ConvTranspose/Gemm(x, DQ(w), b) -> Add(Conv/ConvTranspose/Gemm(x, DQ(w)), b): onnxruntime otherwise
    rounds b onto the int32 grid of s_x * s_w when the result feeds a QuantizeLinear (its
    WeightBiasQuantization; seen for a grouped ConvTranspose feeding a quantized conv)."""
    import onnx_graphsurgeon as gs

    for node in list(graph.nodes):
        if node.op not in ("Conv", "ConvTranspose", "Gemm") or len(node.inputs) < 3:
            continue
        weight_from = node.inputs[1].inputs[0].op if node.inputs[1].inputs else None
        if weight_from != "DequantizeLinear":
            continue
        if node.op == "Gemm" and (node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0
                                  or node.attrs.get("beta", 1.0) != 1.0):
            continue
        bias = node.inputs[2]
        node.inputs.pop()
        if node.op in ("Conv", "ConvTranspose") and isinstance(bias, gs.Constant):
            rank = len(node.inputs[1].shape) if node.inputs[1].shape else 4
            bias = gs.Constant(f"{bias.name}_b", np.asarray(bias.values).reshape([1, -1] + [1] * (rank - 2)))
        product = gs.Variable(f"{node.name}_nobias", dtype=np.float32)
        final = node.outputs[0]
        node.outputs = [product]
        graph.nodes.append(gs.Node("Add", f"{node.name}/BiasAdd", inputs=[product, bias], outputs=[final]))
