"""Metrics: mode coverage and ratio calibration for exact teachers, precision/recall, FID."""

from fdistill.metrics.classifier import (
    DigitClassifier,
    class_coverage,
    class_histogram,
    classifier_fid,
    load_classifier,
    mean_confidence,
)
from fdistill.metrics.evaluate import evaluate_images
from fdistill.metrics.fid import (
    StatsAccumulator,
    feature_stats,
    fid_torchmetrics,
    frechet_distance,
    frechet_distance_from_stats,
    load_stats,
    mean_std,
    save_stats,
)
from fdistill.metrics.inception import InceptionFeatures, find_inception
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
    "DigitClassifier",
    "class_coverage",
    "class_histogram",
    "classifier_fid",
    "evaluate_images",
    "load_classifier",
    "mean_confidence",
    "InceptionFeatures",
    "StatsAccumulator",
    "feature_stats",
    "fid_torchmetrics",
    "find_inception",
    "frechet_distance",
    "frechet_distance_from_stats",
    "load_stats",
    "mean_std",
    "save_stats",
    "knn_precision_recall",
    "log_kde",
    "logr_calibration",
    "mode_coverage",
    "mode_histogram",
    "toy_metrics",
    "tv_distance",
]
