"""The f-distill method by its earlier module name (:mod:`fdistill.methods.fdistill`)."""

from fdistill.methods.fdistill import FAKE_WEIGHTINGS, FEATURE_SOURCES, FDistill, LossConfig, frozen

__all__ = ["FAKE_WEIGHTINGS", "FEATURE_SOURCES", "FDistill", "LossConfig", "frozen"]
