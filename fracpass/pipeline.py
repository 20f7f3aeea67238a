"""The one ordered list of passes ``fracpass.transform`` runs."""
from __future__ import annotations

from fracpass.pass_base import PassManager
from fracpass.plan import Plan


def default_pipeline(plan: Plan) -> PassManager:
    from fracpass.passes import AnnotatePass, InsertActQuantPass, InsertGradQuantPass, InsertWeightQuantPass

    return PassManager([
        AnnotatePass(plan),  # every insert pass reads the OpInfo / QSpec it writes
        InsertWeightQuantPass(),  # lowers module calls, so it runs before anything holds the old node
        InsertActQuantPass(),  # before grad quant, so an op's input quantizer never reads a _gq node of its own
        InsertGradQuantPass(),  # last: it reroutes every user of each op's output
    ])
