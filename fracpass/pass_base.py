"""The pass contract: ``requires`` -> ``call`` -> lint + recompile -> ``ensures``.

A pass is a small class with one job, configured through ``__init__`` and holding no state between
calls. ``__call__`` wraps its failures so every error names the pass (and the node, where the pass
says which), and checks that ``call`` returned an honest ``PassResult``.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch.fx

from fracpass.errors import FracpassError, PassError, PostconditionError, PreconditionError

__all__ = ["PassResult", "PassBase", "PassManager", "node_context"]

log = logging.getLogger("fracpass.passes")


@dataclass
class PassResult:
    graph_module: torch.fx.GraphModule
    modified: bool
    stats: Dict[str, Any] = field(default_factory=dict)
    result: Any = None  # an analysis pass's typed result (CostReport, StagePlan)


def node_context(node: torch.fx.Node) -> str:
    """``While processing <node>`` plus the user's source line, for error messages."""
    where = f"While processing {node.format_node()}"
    trace = node.meta.get("stack_trace")
    if trace:
        last = [line.strip() for line in trace.strip().splitlines() if line.strip()][-2:]
        where += "\n  from: " + " | ".join(last)
    return where


class PassBase:
    """Base of every fracpass pass. Subclasses set ``name`` and implement ``call``."""

    name: str = ""

    def requires(self, gm: torch.fx.GraphModule) -> None:
        """Raise if ``gm`` is not fit for this pass."""

    def ensures(self, gm: torch.fx.GraphModule) -> None:
        """Raise if the pass left ``gm`` in a state it promised not to."""

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        raise NotImplementedError

    def __call__(self, gm: torch.fx.GraphModule, *, recompile: bool = True) -> PassResult:
        """Run the pass. ``recompile=False`` leaves regenerating ``gm.code`` to the caller
        (PassManager does it once after the last pass: passes never execute the module)."""
        try:
            self.requires(gm)
        except FracpassError:
            raise
        except Exception as e:
            raise PreconditionError(f"pass {self.name!r}: precondition failed: {e}") from e
        try:
            result = self.call(gm)
        except FracpassError:
            raise
        except Exception as e:
            raise PassError(f"pass {self.name!r} failed: {type(e).__name__}: {e}") from e
        if not isinstance(result, PassResult):
            raise PassError(f"pass {self.name!r} returned {type(result).__name__}, expected PassResult")
        if result.modified:
            try:
                result.graph_module.graph.lint()
            except Exception as e:
                raise PostconditionError(f"pass {self.name!r} left an invalid graph: {e}") from e
            if recompile:
                result.graph_module.recompile()
        try:
            self.ensures(result.graph_module)
        except FracpassError:
            raise
        except Exception as e:
            raise PostconditionError(f"pass {self.name!r}: postcondition failed: {e}") from e
        return result


class PassManager:
    """Runs passes in order; collects each pass's stats under its name."""

    def __init__(self, passes: Sequence[PassBase]):
        self.passes: List[PassBase] = list(passes)

    def __call__(self, gm: torch.fx.GraphModule) -> PassResult:
        stats: Dict[str, Any] = {}
        modified = False
        for p in self.passes:
            start = time.perf_counter()
            # one recompile at the end: regenerating code is the costliest step on large graphs
            result = p(gm, recompile=False)
            gm = result.graph_module
            modified |= result.modified
            stats[p.name] = dict(result.stats)
            log.debug("%s: modified=%s %s (%.1f ms)", p.name, result.modified, result.stats,
                      1e3 * (time.perf_counter() - start))
        if modified:
            gm.recompile()
        return PassResult(gm, modified, stats)
