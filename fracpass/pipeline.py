"""The one ordered list of passes ``fracpass.transform`` runs."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from fracpass.native.options import NativeOptions
from fracpass.pass_base import PassManager
from fracpass.plan import Plan


def default_pipeline(plan: Plan, example_inputs: Sequence[Any] = (), example_kwargs: Optional[Dict[str, Any]] = None,
                     native: Optional[NativeOptions] = None) -> PassManager:
    """The passes ``transform`` runs, in order; with ``native`` (execution="native"), the lowering after them."""
    from fracpass.passes import (AnnotatePass, FindGatedUnitsPass, InsertActQuantPass, InsertGatesPass,
                                 InsertGradQuantPass, InsertWeightQuantPass)

    passes = [AnnotatePass(plan)]  # every later pass reads the OpInfo / QSpec it writes
    if plan.gates is not None:
        passes.append(FindGatedUnitsPass(plan))  # sets gated ops' weight bits: before weight quant
    passes.append(InsertWeightQuantPass())  # lowers module calls, so it runs before anything holds the old node
    if plan.gates is not None:
        passes.append(InsertGatesPass(plan, example_inputs, example_kwargs or {}))  # the choice nodes quantizers read
    passes += [
        InsertActQuantPass(plan),  # before grad quant, so an op's input quantizer never reads a _gq node of its own
        InsertGradQuantPass(plan),  # last of the rewrites: it reroutes every user of each op's output
    ]
    if native is not None:
        from fracpass.passes import FuseNativeBNPass, LowerNativePass

        passes.append(LowerNativePass(native))  # after every quantizer and gate: it lowers the groups they form
        if native.fuse_bn:
            passes.append(FuseNativeBNPass())  # reads the native calls lower-native made
    return PassManager(passes)
