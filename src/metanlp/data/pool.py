"""A task pool: several labelled datasets, each with a role, whose label spaces are never mixed in an episode.

Each dataset of the pool (`config.PoolDataset`) is one label space, or one per value of its task column (ARSC:
`books.t2` is a task of its own). For meta-training, the label spaces of a role are joined into one
`LabelledTexts` whose classes are named `space::label` and whose domain is the space, so the episode sampler
(`episodes.EpisodeSampler` with `spaces`) draws a space by its dataset's weight, then every class of an
episode from that space, with ways = min(N, the space's classes).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from metanlp.config import PoolDataset, TaskPool
from metanlp.data.load import DataError, LabelledTexts, load_labelled

SEPARATOR = "::"  # between a label space's name and a label, in the joined set


@dataclass(frozen=True)
class LabelSpace:
    """One label space of a pool: a dataset, or one task of a dataset with a task column."""

    name: str
    dataset: str
    data: LabelledTexts


def dataset_path(entry: PoolDataset, root: Path, split: str) -> Path | str:
    """The file of a dataset entry for `split` ('train' or 'test'): `path` may hold '{split}'."""
    path = entry.path.format(split=split)
    return path if path == "default" else (Path(path) if Path(path).is_absolute() else root / path)


ROLE_SPLITS = {"meta_train": "train", "meta_val": "train", "eval": "test"}  # the split each role reads


def entry_path(entry: PoolDataset, root: Path) -> Path | str:
    """The file a pool entry's role reads (meta_train and meta_val: the train split; eval: the test split)."""
    return dataset_path(entry, root, ROLE_SPLITS[entry.role])


def pool_files(pool: TaskPool, root: Path) -> list[Path]:
    """The files a task pool reads ('default', the embedded corpus, is none), resolved."""
    files = {entry_path(entry, root) for entry in pool.tasks}
    return sorted(Path(f).resolve() for f in files if f != "default")


def load_spaces(entry: PoolDataset, root: Path, split: str = "train") -> list[LabelSpace]:
    """The label spaces of one pool entry, with its class filter and row filter applied."""
    data = load_labelled(dataset_path(entry, root, split), text_column=entry.text_column,
                         label_column=entry.label_column, domain_column=entry.task_column or "domain",
                         rows_where=entry.where, separate_tasks=bool(entry.task_column),
                         conflicting_labels=entry.conflicting_labels)
    if entry.classes:
        missing = sorted(set(entry.classes) - set(data.classes))
        if missing:
            raise DataError(f"pool dataset {entry.name!r}: classes {missing[:10]} are not in {data.source}")
        data = data.with_classes(entry.classes)
    if not entry.task_column:
        spaces = [LabelSpace(entry.name, entry.name, data)]
    else:
        if data.domains is None:
            raise DataError(f"pool dataset {entry.name!r}: {data.source} has no task column {entry.task_column!r}")
        spaces = [LabelSpace(f"{entry.name}/{task}", entry.name,
                             data.select([i for i, d in enumerate(data.domains) if d == task]))
                  for task in sorted(set(data.domains))]
    for space in spaces:
        if len(space.data.classes) < 2:
            raise DataError(f"pool dataset {entry.name!r}: label space {space.name!r} has "
                            f"{len(space.data.classes)} class; a classification task needs at least 2")
    return spaces


def joined(spaces: list[LabelSpace], source: str) -> LabelledTexts:
    """Every space's rows in one set: classes `space::label`, domain = the space."""
    texts, labels, domains = [], [], []
    for space in spaces:
        texts += space.data.texts
        labels += [f"{space.name}{SEPARATOR}{label}" for label in space.data.labels]
        domains += [space.name] * len(space.data)
    return LabelledTexts(texts, labels, domains, source=source)


def split_label(label: str) -> tuple[str, str]:
    """A joined set's class `space::label` as (space, label); ('', label) for a class of a plain set."""
    space, _, name = label.rpartition(SEPARATOR)
    return space, name


def space_weights(pool: TaskPool, spaces: list[LabelSpace]) -> dict[str, float]:
    """Each space's sampling weight: its dataset's weight (default: rows ** 0.5, so small sets are not drowned)
    shared equally among the dataset's spaces (ARSC's tasks)."""
    by_dataset: dict[str, list[LabelSpace]] = {}
    for space in spaces:
        by_dataset.setdefault(space.dataset, []).append(space)
    entries = {entry.name: entry for entry in pool.tasks}
    weights = {}
    for dataset, members in by_dataset.items():
        rows = sum(len(s.data) for s in members)
        weight = entries[dataset].weight if entries[dataset].weight is not None else rows ** pool.size_exponent
        weights.update({s.name: weight / len(members) for s in members})
    return weights


def domain_weights(data: LabelledTexts, exponent: float = 0.5) -> dict[str, float]:
    """Each domain of `data` as a label space with weight rows ** exponent (a corpus with
    `data.label_spaces: domain`, or a pool's joined set whose domains are its spaces)."""
    data.domain_of_class()  # names a set without domains
    return {domain: n ** exponent for domain, n in Counter(data.domains).items()}


def label_space_weights(data: LabelledTexts, label_spaces: str) -> dict[str, float] | None:
    """The episode sampler's `spaces` for `data.label_spaces`: each domain's weight under "domain", None (classes
    of the whole set mix) under "split"."""
    return domain_weights(data) if label_spaces == "domain" else None


def label_base_rates(data: LabelledTexts) -> dict[str, float]:
    """How common each label name is in the tasks of `data`, as the mean over the tasks that have it of its log
    row count less the mean log count of its task's classes (0 where classes are balanced; a 3:1 two-class task
    gives +-log(3)/2). A task is a label space of a pool's joined set (classes `space::label`), else the whole
    set; a new task's logits plus these are Bayes' rule with the training tasks' typical proportions."""
    by_task: dict[str, dict[str, int]] = {}
    for label, count in Counter(data.labels).items():
        task, name = split_label(label)
        by_task.setdefault(task, {})[name] = count
    rates: dict[str, list[float]] = {}
    for counts in by_task.values():
        logs = {name: math.log(n) for name, n in counts.items()}
        centre = sum(logs.values()) / len(logs)
        for name, value in logs.items():
            rates.setdefault(name, []).append(value - centre)
    return {name: sum(values) / len(values) for name, values in sorted(rates.items())}


def load_held_out(entry: PoolDataset, root: Path, trained_classes: set[str], corpus: Path | None = None
                  ) -> LabelledTexts:
    """An eval dataset (`evaluate.datasets`) read at its test split, its label spaces joined (domain = space).
    Read from the corpus file itself, it must not hold a class the model meta-trains or validates on: it
    would not be held out."""
    spaces = load_spaces(entry, root, "test")
    path = dataset_path(entry, root, "test")
    if corpus is not None and path != "default" and Path(path).resolve() == corpus.resolve():
        seen = sorted({label for space in spaces for label in space.data.classes} & trained_classes)
        if seen:
            raise DataError(f"evaluate.datasets {entry.name!r}: classes {seen[:5]} are in the corpus's training or "
                            "validation split, so the dataset is not held out; filter it with `where` or `classes`, "
                            "or change data.split")
    return joined(spaces, source=f"{entry.name} ({path})")


def read_pool(path: str | Path) -> tuple[TaskPool, Path]:
    """A pool file (YAML with a `tasks:` list) and the folder its relative paths start from."""
    import yaml
    from pydantic import ValidationError

    from metanlp.config import describe_validation_error

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such pool file")
    try:
        raw = yaml.safe_load(path.read_text())
        return TaskPool.model_validate(raw), path.resolve().parent
    except yaml.YAMLError as err:
        raise DataError(f"{path}: not valid YAML: {err}") from err
    except ValidationError as err:
        raise DataError(f"{path}: {describe_validation_error(err)}") from err


def role_set(pool: TaskPool, root: Path, role: str, split: str = "train") -> tuple[LabelledTexts, dict[str, float]]:
    """The joined set of a role's datasets and the weight of each of its label spaces."""
    spaces = [space for entry in pool.tasks if entry.role == role for space in load_spaces(entry, root, split)]
    if not spaces:
        raise DataError(f"the task pool has no dataset with role {role!r}")
    return joined(spaces, source=f"pool:{role}"), space_weights(pool, spaces)
