"""Metrics: mode coverage and ratio calibration for exact teachers, precision/recall, FID."""

from fdistill.metrics.knn import knn_precision_recall
from fdistill.metrics.toy import (
    log_kde,
    logr_calibration,
    mode_coverage,
    mode_histogram,
    toy_metrics,
    tv_distance,
)

__all__ = [
    "knn_precision_recall",
    "log_kde",
    "logr_calibration",
    "mode_coverage",
    "mode_histogram",
    "toy_metrics",
    "tv_distance",
]
