"""fracpass: FracTrain-style efficient training as compiler passes over any PyTorch model."""
from fracpass.api import (QuantizedGraphModule, cost, current_stage, gate_loss, gate_stats, quantizers, set_stage, summary,
                          transform)
from fracpass.check import Coverage, coverage, graph_text
from fracpass.checkpoint import load_checkpoint, save_checkpoint
from fracpass.export import export_onnx
from fracpass.costreport import CostReport, relative_cost
from fracpass.errors import (
    ExportError,
    FracpassError,
    PassError,
    PlanError,
    PostconditionError,
    PreconditionError,
    RegistryError,
    TraceError,
)
from fracpass.gating import GateStats
from fracpass.native.options import NativeOptions
from fracpass.original import original_state_dict, to_original
from fracpass.plan import Gates, Plan, QSpec, Rule, Stage
from fracpass.scheduler import Scheduler, schedule
from fracpass.stageplan import StagePlan
from fracpass.switch import AtEpochs, AtSteps, Budget, LossPlateau

__version__ = "0.1.0"

__all__ = [
    "transform", "set_stage", "current_stage", "quantizers", "summary", "cost", "gate_loss", "gate_stats", "GateStats", "CostReport", "relative_cost",
    "QuantizedGraphModule", "NativeOptions", "graph_text", "coverage", "Coverage", "export_onnx",
    "original_state_dict", "to_original",
    "Plan", "Rule", "Stage", "Gates", "QSpec", "LossPlateau", "AtSteps", "AtEpochs", "Budget",
    "schedule", "Scheduler", "StagePlan", "save_checkpoint", "load_checkpoint",
    "FracpassError", "PlanError", "TraceError", "PassError", "PreconditionError", "PostconditionError",
    "RegistryError", "ExportError",
]
