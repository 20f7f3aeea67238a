"""fracpass's rewrite and analysis passes, one per module (installed as ``fracpass.passes``).

See README.md beside this file for the invariants every pass keeps.
"""
from fracpass.passes.annotate import AnnotatePass
from fracpass.passes.fuse_native_bn import FuseNativeBNPass
from fracpass.passes.find_units import FindGatedUnitsPass
from fracpass.passes.insert_gates import InsertGatesPass
from fracpass.passes.insert_act_quant import InsertActQuantPass
from fracpass.passes.insert_grad_quant import InsertGradQuantPass
from fracpass.passes.insert_weight_quant import InsertWeightQuantPass
from fracpass.passes.lower_native import LowerNativePass

__all__ = ["AnnotatePass", "FindGatedUnitsPass", "InsertGatesPass", "InsertActQuantPass", "InsertWeightQuantPass", "InsertGradQuantPass",
           "LowerNativePass", "FuseNativeBNPass"]
