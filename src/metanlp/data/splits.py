"""Validated corpus -> class-disjoint meta-train / meta-val / meta-test class sets."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from metanlp.config import SplitConfig
from metanlp.data.load import DataError, LabelledTexts

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class ClassSplit:
    train: list[str]
    val: list[str]
    test: list[str]

    def classes(self, name: str) -> list[str]:
        if name not in SPLIT_NAMES:
            raise DataError(f"unknown split {name!r}; choose one of {list(SPLIT_NAMES)}")
        return getattr(self, name)

    def to_dict(self) -> dict[str, list[str]]:
        return {name: self.classes(name) for name in SPLIT_NAMES}


def split_classes(data: LabelledTexts, config: SplitConfig) -> ClassSplit:
    """Divide the classes of `data` so that no class is in two splits."""
    excluded = set(config.exclude_labels)
    classes = [c for c in data.classes if c not in excluded]
    if config.by == "domain":
        domain_of = data.domain_of_class()
        known = sorted({domain_of[c] for c in classes})
        parts = []
        for name, domains in zip(SPLIT_NAMES, (config.train_domains, config.val_domains, config.test_domains),
                                 strict=True):
            missing = sorted(set(domains) - set(known))
            if missing:
                raise DataError(f"{data.source}: {name} domains {missing} are not in the data; known: {known}")
            parts.append(sorted(c for c in classes if domain_of[c] in set(domains)))
        return ClassSplit(*parts)
    train_n, val_n, test_n = config.sizes  # validated present for by="random"
    if train_n + val_n + test_n > len(classes):
        raise DataError(
            f"{data.source}: split sizes {config.sizes} need {train_n + val_n + test_n} classes, "
            f"the data has {len(classes)}"
        )
    order = np.random.default_rng(config.seed).permutation(len(classes))
    shuffled = [classes[i] for i in order]
    return ClassSplit(
        train=sorted(shuffled[:train_n]),
        val=sorted(shuffled[train_n : train_n + val_n]),
        test=sorted(shuffled[train_n + val_n : train_n + val_n + test_n]),
    )
