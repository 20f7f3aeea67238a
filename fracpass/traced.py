"""Modules fx would keep as opaque leaves, traced into instead so their compute ops are quantized.

torch.fx treats every ``torch.nn`` module as a leaf. For most that is right (BatchNorm, ReLU), and
Conv/Linear are registry kinds that a pass lowers. ``nn.MultiheadAttention`` is neither: its
in-projection, its two attention products and its out-projection would stay one opaque call at full
precision. Its own ``forward`` cannot be traced (it branches on ``query.dim()``, on mask dtypes and
on ``torch.is_grad_enabled()``), so a rule here gives fx a traceable forward that runs the same ops,
in the same order and memory layout, as the slow path of ``F.multi_head_attention_forward``::

    y -> MultiheadAttention -> (out, w)     is captured as
    y -> linear(in_proj) -> view/transpose -> sdpa (need_weights=False)      -> linear(out_proj)
                                           -> bmm -> softmax -> dropout -> bmm (need_weights=True)

A rule returns None for a call it cannot trace (masks, ``bias_k``, ``add_zero_attn``); that call
stays a leaf, and ``coverage``/``cost`` count its MACs as unquantized.

Eval under ``torch.no_grad()`` is where the captured ops and the module part ways: there the module
takes its fused fast path (``torch._native_multi_head_attention``), which sums in another order, so
outputs agree to float rounding, not bit for bit. In training, and in eval with autograd on, they
are bit-identical.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["register_traced", "traced_forward"]

# module type -> (module, call args, call kwargs) -> a traceable forward, or None to keep the call a leaf
_RULES: Dict[type, Callable[[nn.Module, tuple, dict], Optional[Callable[..., Any]]]] = {}


def register_traced(module_type: type, rule: Callable[[nn.Module, tuple, dict], Optional[Callable[..., Any]]]) -> None:
    """Trace into ``module_type`` with the forward ``rule(module, args, kwargs)`` returns (exact type match)."""
    _RULES[module_type] = rule


def traced_forward(module: nn.Module, args: tuple, kwargs: dict) -> Optional[Callable[..., Any]]:
    """The traceable forward for this call of ``module``, or None when it stays a leaf."""
    rule = _RULES.get(type(module))
    return None if rule is None else rule(module, args, kwargs)


# -- nn.MultiheadAttention --------------------------------------------------------------------------
_MHA_PARAMS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights",
               "is_causal")
_MHA_DEFAULTS = dict(key_padding_mask=None, need_weights=True, attn_mask=None, average_attn_weights=True,
                     is_causal=False)


def _mha_rule(m: nn.MultiheadAttention, args: tuple, kwargs: dict) -> Optional[Callable[..., Any]]:
    if len(args) > len(_MHA_PARAMS) or any(k not in _MHA_PARAMS for k in kwargs):
        return None
    bound = dict(_MHA_DEFAULTS, **dict(zip(_MHA_PARAMS, args)), **kwargs)
    if bound["key_padding_mask"] is not None or bound["attn_mask"] is not None or bound["is_causal"] is not False:
        return None  # masks: the module's dtype checks and merges are not traceable on a Proxy
    if not isinstance(bound["need_weights"], bool) or not isinstance(bound["average_attn_weights"], bool):
        return None  # a flag that is a graph input steers Python control flow
    if m.bias_k is not None or m.bias_v is not None or m.add_zero_attn:
        return None
    return lambda *a, **k: _mha_forward(m, bound["query"], bound["key"], bound["value"], bound["need_weights"],
                                        bound["average_attn_weights"])


def _mha_forward(m: nn.MultiheadAttention, query, key, value, need_weights: bool, average_attn_weights: bool):
    """``nn.MultiheadAttention.forward``'s slow path, for batched (3-D) inputs without masks."""
    torch._assert(query.dim() == 3, "fracpass traced nn.MultiheadAttention for batched 3-D inputs; for unbatched "
                                    "2-D inputs pass leaf_modules=[nn.MultiheadAttention] to fracpass.transform")
    if m.batch_first:  # the transposes keep the module's `is` identities, which choose the in-projection
        if key is value:
            if query is key:
                query = key = value = query.transpose(1, 0)
            else:
                query, key = (x.transpose(1, 0) for x in (query, key))
                value = key
        else:
            query, key, value = (x.transpose(1, 0) for x in (query, key, value))
    tgt_len, bsz, embed_dim = query.size(0), query.size(1), m.embed_dim
    heads = m.num_heads
    head_dim = embed_dim // heads
    if m._qkv_same_embed_dim:
        q, k, v = F._in_projection_packed(query, key, value, m.in_proj_weight, m.in_proj_bias)
    else:
        b_q, b_k, b_v = (None, None, None) if m.in_proj_bias is None else m.in_proj_bias.chunk(3)
        q, k, v = (F.linear(query, m.q_proj_weight, b_q), F.linear(key, m.k_proj_weight, b_k),
                   F.linear(value, m.v_proj_weight, b_v))
    q = q.view(tgt_len, bsz * heads, head_dim).transpose(0, 1)
    k = k.view(k.size(0), bsz * heads, head_dim).transpose(0, 1)
    v = v.view(v.size(0), bsz * heads, head_dim).transpose(0, 1)
    src_len = k.size(1)
    dropout_p = m.dropout if m.training else 0.0
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        weights = torch.bmm(q_scaled, k.transpose(-2, -1))
        weights = F.softmax(weights, dim=-1)
        if dropout_p > 0.0:
            weights = F.dropout(weights, p=dropout_p)
        out = torch.bmm(weights, v)
        out = out.transpose(0, 1).reshape(tgt_len * bsz, embed_dim)
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = weights.view(bsz, heads, tgt_len, src_len)
        if average_attn_weights:
            weights = weights.mean(dim=1)
    else:
        q = q.view(bsz, heads, tgt_len, head_dim)
        k = k.view(bsz, heads, src_len, head_dim)
        v = v.view(bsz, heads, src_len, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, None, dropout_p, False)
        out = out.permute(2, 0, 1, 3).reshape(bsz * tgt_len, embed_dim)
        out = F.linear(out, m.out_proj.weight, m.out_proj.bias)
        out = out.view(tgt_len, bsz, out.size(1))
        weights = None
    if m.batch_first:
        out = out.transpose(1, 0)
    return out, weights


register_traced(nn.MultiheadAttention, _mha_rule)
