"""Class sets -> episodes: N ways, K shots, Q queries, deterministic for a seed.

An episode holds row indices into one `LabelledTexts` (support and query may come from two different
sets in the full-label-space protocol), and labels as positions in `classes`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from metanlp.data.load import DataError, LabelledTexts


@dataclass(frozen=True)
class Episode:
    classes: list[str]
    support: np.ndarray  # row indices into the support set
    support_labels: np.ndarray  # positions in `classes`
    query: np.ndarray  # row indices into the query set
    query_labels: np.ndarray


class EpisodeSampler:
    """Draws N-way K-shot episodes with Q queries per class from the classes of one labelled set.

    The same seed gives the same episodes in the same order; `state` and `set_state` let training
    resume exactly where it stopped.
    """

    def __init__(self, data: LabelledTexts, ways: int, shots: int, queries: int, seed: int = 0,
                 mix: tuple[str, float] | None = None, spaces: dict[str, float] | None = None) -> None:
        """`mix=(prefix, p)`: classes named with `prefix` (e.g. SMLMT's "mask:") and the others form two
        pools; each episode comes from the prefixed pool with probability p, never from both (hybrid
        self-supervised + supervised meta-training).

        `spaces`: the data's domains are label spaces (a task pool, `pool.joined`) with these sampling weights;
        each episode draws a space by weight and all its classes from that space, with ways = min(N, the
        space's classes). Classes with fewer than K + Q examples are left out of such episodes (`short`
        counts them) instead of refusing the whole set."""
        self.data, self.ways, self.shots, self.queries = data, ways, shots, queries
        self.by_class = data.indices_by_class()
        self.classes = list(self.by_class)
        self.pools = self.spaces = None
        need = shots + queries
        short = {c: len(rows) for c, rows in self.by_class.items() if len(rows) < need}
        self.short = len(short)
        self.rng = np.random.default_rng(seed)
        if spaces is not None:
            self._set_spaces(spaces, short)
            return
        if mix is not None:
            prefix, self.mix_p = mix
            prefixed = [i for i, c in enumerate(self.classes) if c.startswith(prefix)]
            others = [i for i, c in enumerate(self.classes) if not c.startswith(prefix)]
            for name, pool in ((f"classes named {prefix}*", prefixed), ("other classes", others)):
                if len(pool) < ways:
                    raise DataError(f"{data.source}: hybrid {ways}-way episodes need {ways} {name}, found {len(pool)}")
            self.pools = (np.asarray(prefixed), np.asarray(others))
        if ways > len(self.classes):
            raise DataError(f"{data.source}: {ways}-way episodes need {ways} classes, the data has "
                            f"{len(self.classes)}")
        if short:
            listed = ", ".join(f"{c!r} has {n}" for c, n in sorted(short.items())[:10])
            raise DataError(f"{data.source}: {shots}-shot {queries}-query episodes need {need} examples per "
                            f"class; {len(short)} classes have fewer ({listed})")

    def _set_spaces(self, weights: dict[str, float], short: dict[str, int]) -> None:
        domain_of = self.data.domain_of_class()
        members: dict[str, list[int]] = {}
        for i, c in enumerate(self.classes):
            if c not in short:
                members.setdefault(domain_of[c], []).append(i)
        unknown = sorted(set(weights) - set(domain_of.values()))
        if unknown:
            raise DataError(f"{self.data.source}: label spaces {unknown[:5]} have no rows")
        usable = [s for s in sorted(weights) if len(members.get(s, [])) >= 2]
        if not usable:
            raise DataError(f"{self.data.source}: no label space has 2 classes with {self.shots + self.queries} "
                            "examples each")
        total = sum(weights[s] for s in usable)
        self.spaces = (usable, np.array([weights[s] / total for s in usable]),
                       [np.asarray(members[s]) for s in usable])

    def sample(self) -> Episode:
        if self.spaces is not None:
            names, probabilities, members = self.spaces
            pool = members[self.rng.choice(len(names), p=probabilities)]
            chosen = sorted(self.rng.choice(pool, size=min(self.ways, len(pool)), replace=False).tolist())
        elif self.pools is None:
            chosen = sorted(self.rng.choice(len(self.classes), size=self.ways, replace=False))
        else:
            pool = self.pools[0] if self.rng.random() < self.mix_p else self.pools[1]
            chosen = sorted(self.rng.choice(pool, size=self.ways, replace=False).tolist())
        classes = [self.classes[i] for i in chosen]
        support, query = [], []
        for c in classes:
            rows = self.rng.permutation(self.by_class[c])[: self.shots + self.queries]
            support.append(rows[: self.shots])
            query.append(rows[self.shots :])
        return Episode(
            classes=classes,
            support=np.concatenate(support),
            support_labels=np.repeat(np.arange(len(classes)), self.shots),
            query=np.concatenate(query),
            query_labels=np.repeat(np.arange(len(classes)), self.queries),
        )

    def take(self, n: int) -> list[Episode]:
        return [self.sample() for _ in range(n)]

    def __iter__(self) -> Iterator[Episode]:
        while True:
            yield self.sample()

    def state(self) -> dict:
        return self.rng.bit_generator.state

    def set_state(self, state: dict) -> None:
        self.rng.bit_generator.state = state


def full_label_space_episode(
    support_set: LabelledTexts, query_set: LabelledTexts | None, shots: int, seed: int
) -> Episode:
    """Every class, K shots each from `support_set`; every row of `query_set` is a query.

    With no separate query set, the rows of `support_set` not drawn as support are the queries.
    """
    rng = np.random.default_rng(seed)
    by_class = support_set.indices_by_class()
    classes = list(by_class)
    short = {c: len(rows) for c, rows in by_class.items() if len(rows) < shots + (query_set is None)}
    if short:
        listed = ", ".join(f"{c!r} has {n}" for c, n in sorted(short.items())[:10])
        raise DataError(f"{support_set.source}: {shots}-shot support needs {shots} examples per class"
                        f"{' plus one query' if query_set is None else ''}; {listed}")
    support = [rng.permutation(by_class[c])[:shots] for c in classes]
    support_idx = np.concatenate(support)
    support_labels = np.repeat(np.arange(len(classes)), shots)
    position = {c: i for i, c in enumerate(classes)}
    if query_set is None:
        taken = set(support_idx.tolist())
        query_idx = np.array([i for i in range(len(support_set)) if i not in taken])
        query_labels = np.array([position[support_set.labels[i]] for i in query_idx])
    else:
        unknown = sorted(set(query_set.labels) - set(classes))
        if unknown:
            raise DataError(f"{query_set.source}: labels {unknown[:10]} have no examples in {support_set.source}")
        query_idx = np.arange(len(query_set))
        query_labels = np.array([position[label] for label in query_set.labels])
    return Episode(classes, support_idx, support_labels, query_idx, query_labels)
