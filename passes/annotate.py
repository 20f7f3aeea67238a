"""annotate: the plan's ordered rules become a typed QSpec on every compute node."""
from __future__ import annotations

from collections import Counter

import torch.fx

from fracpass import meta, registry
from fracpass.pass_base import PassBase, PassResult
from fracpass.plan import Plan


class AnnotatePass(PassBase):
    """Tag every compute op with what the registry knows (OpInfo) and what the plan says (QSpec).

    The graph is not changed::

        x -> conv -> y          stays   x -> conv -> y
                                        conv.meta: OpInfo(kind=conv2d, path=layer1.0.conv1, ...)
                                                   QSpec(w=(3,4,6,8), a=(3,4,6,8), g=(6,6,8,8))

    Raises PlanError for a rule that matches no compute op, listing the closest module paths.
    """

    name = "annotate"

    def __init__(self, plan: Plan):
        self.plan = plan

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        hits: Counter = Counter()
        kinds: Counter = Counter()
        paths, changed, excluded = [], 0, 0
        for node in list(gm.graph.nodes):
            if meta.inserted(node) is not None:
                continue
            info = registry.classify(gm, node)
            if info is None:
                continue
            spec = self.plan.resolve(info.module_path, info.matches_kind)
            hits.update(spec.rules)
            kinds[info.kind] += 1
            paths.append(info.module_path)
            excluded += bool(spec.excluded)
            if meta.op_info(node) != info or meta.qspec(node) != spec:
                meta.set_op_info(node, info)
                meta.set_qspec(node, spec)
                changed += 1
        self.plan.check_rules_matched(hits, paths, list(kinds))
        stats = {"compute_ops": sum(kinds.values()), "excluded": excluded, "annotated": changed, "by_kind": dict(kinds)}
        return PassResult(gm, modified=changed > 0, stats=stats)
