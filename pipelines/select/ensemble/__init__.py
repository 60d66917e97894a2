"""Ensemble stage: candidate scoring, greedy selection, CRF search and registration (see `stage`)."""

from pipelines.select.ensemble.stage import EnsembleConfig, build_ensemble

__all__ = ["EnsembleConfig", "build_ensemble"]
