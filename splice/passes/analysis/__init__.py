"""Analyses passes request through ``PassContext.analysis``: cost model and calibration."""

from splice.passes.analysis.calibration import ActivationStats, CalibrationResult, calibrate
from splice.passes.analysis.cost import Cost, CostReport, cost_model, node_cost

__all__ = [
    "ActivationStats",
    "CalibrationResult",
    "Cost",
    "CostReport",
    "calibrate",
    "cost_model",
    "node_cost",
]
