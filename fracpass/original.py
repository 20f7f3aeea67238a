"""Back to the user's own model: the trained weights of a transformed model under the original keys.

A transformed model's ``state_dict`` holds the quantizers' and gates' state beside the user's parameters
(``stem_wq.stage_bits``, ``fracpass_gates.…``), so a fresh instance of the user's class refuses it with
``strict=True``. Both capture paths keep the user's parameters and buffers under their original names
(fx copies the user's submodules; torch.export registers every parameter under its qualified name), so
the original keys are read from fracpass's private copy of the user's model (``ModelState.root``) and
their values from the transformed model::

    qmodel = fracpass.transform(model, plan, example_inputs=(x,))
    ...  # train qmodel
    fresh = fracpass.to_original(qmodel, SmallCNN())  # an ordinary SmallCNN with the trained weights
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict

import torch
from torch import nn

from fracpass.errors import FracpassError

__all__ = ["original_state_dict", "to_original"]


def original_state_dict(qmodel: nn.Module) -> Dict[str, torch.Tensor]:
    """The trained parameters and buffers of ``qmodel`` under the keys of the model it was transformed from.

    Loadable with ``strict=True`` into a fresh instance of the user's class; the quantizers' and gates'
    state is left out. ``qmodel`` is a model returned by ``fracpass.transform`` or a model holding such
    parts (``fracpass.parts.transform_parts``, or submodules replaced by hand): the parts' entries come
    back under their paths in the whole model, the rest of the model's own entries as they are.
    Parameters the captured graph never used (a module forward does not call) keep the values they had
    at transform time.
    """
    from fracpass.parts import transformed_parts

    parts = transformed_parts(qmodel)
    if not parts:
        raise FracpassError(f"original_state_dict: {type(qmodel).__name__} holds no model returned by "
                            "fracpass.transform; its own state_dict() already has the original keys")
    if parts[0][0] == "":
        return _part_state_dict(qmodel)
    inside = tuple(path + "." for path, _ in parts)
    merged: Dict[str, torch.Tensor] = OrderedDict(
        (key, value) for key, value in qmodel.state_dict().items() if not key.startswith(inside))
    for path, part in parts:
        merged.update((f"{path}.{key}", value) for key, value in _part_state_dict(part).items())
    return merged


def to_original(qmodel: nn.Module, model: nn.Module) -> nn.Module:
    """Load ``original_state_dict(qmodel)`` into ``model`` (a fresh instance of the user's class, with
    ``strict=True``) and return ``model``: an ordinary FP32 model with the trained weights, ready for
    ``torch.save(model.state_dict())`` or HuggingFace's ``model.save_pretrained(folder)``."""
    if not isinstance(model, nn.Module):
        raise FracpassError(f"to_original: model must be a torch.nn.Module (a fresh instance of the class you "
                            f"transformed), got {type(model).__name__}")
    from fracpass.parts import transformed_parts

    if transformed_parts(model):
        raise FracpassError(f"to_original: the target {type(model).__name__} is (or holds) a transformed model; "
                            "give a fresh instance of your own class, e.g. to_original(qmodel, SmallCNN())")
    state = original_state_dict(qmodel)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise FracpassError(f"to_original: {type(model).__name__} does not take the transformed model's weights "
                            f"({str(e).splitlines()[0]} …); give an instance built like the model you transformed "
                            "(same class and configuration)") from e
    return model


def _part_state_dict(qmodel: nn.Module) -> Dict[str, torch.Tensor]:
    """One transformed model: the keys of its original model, each value read from ``qmodel`` by name,
    else from a tensor the original shares it with (tied weights), else from the original itself."""
    root = qmodel.fracpass.root
    trained = qmodel.state_dict(keep_vars=True)
    template = root.state_dict(keep_vars=True)
    names_of: Dict[int, list] = {}
    for key, value in template.items():
        names_of.setdefault(id(value), []).append(key)
    result: Dict[str, torch.Tensor] = OrderedDict()
    for key, value in template.items():
        source = next((trained[name] for name in [key, *names_of[id(value)]] if name in trained), value)
        if source.shape != value.shape:
            raise FracpassError(f"original_state_dict: {key!r} has shape {tuple(source.shape)} in the transformed "
                                f"model but {tuple(value.shape)} in the original; was the model changed after "
                                "fracpass.transform?")
        result[key] = source.detach()
    return result
