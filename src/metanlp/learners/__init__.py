"""Learners: every learner maps a labelled support set to a classifier (`base`). Specs live in
`metanlp.config`, the kind -> class registry in `registry`, saving and loading in `persistence`."""

from __future__ import annotations

from metanlp.learners.base import Classifier, Learner, Predictions
from metanlp.learners.persistence import load_learner, read_spec, save_learner
from metanlp.learners.registry import LEARNERS, build_learner

__all__ = ["LEARNERS", "Classifier", "Learner", "Predictions", "build_learner", "load_learner", "read_spec",
           "save_learner"]
