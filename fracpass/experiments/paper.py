"""FracTrain's published CIFAR-10 results, marked beside this project's runs for reference.

Source: the paper's results table (Fu et al., "FracTrain: Fractionally Squeezing Bit Savings Both Temporally
and Spatially for Efficient DNN Training", NeurIPS 2020) as the authors' repository shows it
(github.com/GATECH-EIC/FracTrain, ``img/fractrain_result_cifar.png``): test accuracy and training cost
("MACs", the paper's bit-weighted count, the ``paper`` accounting here) of static 8-bit training (SBM), DFQ
(cp = 3) and FracTrain (cp 1.5/2/2.5/3). PFQ's CIFAR results are shown only in a figure there, so no PFQ
point is given. The savings below are computed from the table's rounded costs: ResNet-74's FracTrain saves
77.7 % of SBM's by them, where the paper's text says 77.6 %.
"""
from __future__ import annotations

from typing import List, NamedTuple

__all__ = ["PaperResult", "CIFAR10", "SOURCE", "versus_sbm"]

SOURCE = "FracTrain (NeurIPS 2020), CIFAR-10 table (github.com/GATECH-EIC/FracTrain, img/fractrain_result_cifar.png)"


class PaperResult(NamedTuple):
    model: str
    method: str
    accuracy: float  # test accuracy, %
    macs: float  # training cost, the paper's count


CIFAR10 = (
    PaperResult("ResNet-38", "SBM", 92.66, 1.18e14),
    PaperResult("ResNet-38", "DFQ", 92.49, 4.96e13),
    PaperResult("ResNet-38", "FracTrain", 92.54, 3.97e13),
    PaperResult("ResNet-74", "SBM", 93.04, 2.62e14),
    PaperResult("ResNet-74", "DFQ", 93.09, 7.33e13),
    PaperResult("ResNet-74", "FracTrain", 92.97, 5.85e13),
)


class Point(NamedTuple):
    model: str
    method: str
    saving: float  # fraction of SBM's training cost saved
    accuracy_pp: float  # accuracy minus SBM's, percentage points


def versus_sbm(results=CIFAR10) -> List[Point]:
    """Each non-SBM result as (saving vs its model's SBM, accuracy difference to it): the paper's points on
    the trade-off plot, where static 8/8/8 plays SBM's part."""
    sbm = {r.model: r for r in results if r.method == "SBM"}
    return [Point(r.model, r.method, 1 - r.macs / sbm[r.model].macs, round(r.accuracy - sbm[r.model].accuracy, 2))
            for r in results if r.method != "SBM"]
