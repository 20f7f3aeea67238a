"""cost-analysis: MACs, BitOPs, energy and latency of every compute op (an analysis pass)."""
from __future__ import annotations

from typing import Any, Dict, Sequence

import torch.fx

from fracpass import costing
from fracpass.pass_base import PassBase, PassResult


class CostAnalysisPass(PassBase):
    """Propagate the example inputs' shapes and cost each annotated compute op; changes nothing::

        x -> conv_aq -> conv(conv_wq(w)) -> conv_gq      stays as it is
        result: CostReport(ops=[OpCost(conv, fwd=N*Cout*H*W*Cin*k*k, bwd=(err, wgt), bits...)])

    Quantizers are bypassed and BatchNorm statistics and the RNG restored, so running it leaves
    the model as it was.
    """

    name = "cost-analysis"

    def __init__(self, args: Sequence[Any], kwargs: Dict[str, Any], num_stages: int, stage: int, target=None):
        self.args, self.kwargs = tuple(args), dict(kwargs)
        self.num_stages, self.stage, self.target = num_stages, stage, target

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        report = costing.analyze(gm, self.args, self.kwargs, self.num_stages, self.stage, self.target)
        stats = {"costed_ops": len(report.ops), "not_costed": len(report.not_costed)}
        return PassResult(gm, modified=False, stats=stats, result=report)
