"""Episode evaluation: every method on exactly the same episodes, with 95% CIs (tables and plots of the
results are `reporting`'s).

Two protocols:
- episodic: N-way K-shot episodes with Q queries per class, drawn from one labelled set;
- full label space (`ways="all"`): every class at once, K shots each, either from a separate support set
  (every row of the evaluation set is then a query: the protocol of the few-shot intent literature)
  or from the evaluation set itself (the rest are queries), repeated over `repeats` support draws.

Accuracies are paired: the difference to the baseline is taken episode by episode, so its CI is much
narrower than the two methods' CIs would suggest.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metanlp.data.episodes import Episode, EpisodeSampler, full_label_space_episode
from metanlp.data.load import DataError, LabelledTexts
from metanlp.encoder import TokenizedTexts
from metanlp.learners import LEARNERS, Learner, build_learner, load_learner, read_spec
from metanlp.progress import progress_bar
from metanlp.runtime import seeded

BASELINE = "frozen"


@dataclass
class EpisodeOutcome:
    accuracy: float
    adapt_seconds: float
    predict_seconds: float


def run_episode(learner: Learner, episode: Episode, support: TokenizedTexts, query: TokenizedTexts,
                seed: int) -> EpisodeOutcome:
    """Adapt on the episode's support rows, predict its query rows. Query labels are only used to score.

    Learners that draw random numbers (a new head, minibatches) draw them from torch's generator seeded with
    `seed` for this episode alone: the caller's stream (e.g. meta-training's dropout) is left as it was."""
    labels = [episode.classes[i] for i in episode.support_labels]
    with seeded(seed):
        start = time.perf_counter()
        classifier = learner.adapt(support.subset(episode.support), labels)
        adapted = time.perf_counter()
        predicted = classifier.predict(query.subset(episode.query)).labels
        done = time.perf_counter()
    truth = [episode.classes[i] for i in episode.query_labels]
    accuracy = float(np.mean([p == t for p, t in zip(predicted, truth, strict=True)]))
    return EpisodeOutcome(accuracy, adapted - start, done - adapted)


def mean_ci(values: np.ndarray, student: bool = False) -> tuple[float, float]:
    """Mean and half-width of the 95% CI: 1.96 sd / sqrt(n), or with Student's t quantile for few values
    (`student`: 3 support draws give 4.30 sd / sqrt(3), not 1.96)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), float("nan")
    quantile = 1.96
    if student:
        from scipy.stats import t

        quantile = float(t.ppf(0.975, len(values) - 1))
    return float(values.mean()), float(quantile * values.std(ddof=1) / math.sqrt(len(values)))


@dataclass
class Setting:
    """One evaluation setting: a protocol, a number of ways and shots, on the test classes or on a named dataset."""

    ways: int | str  # an int, or "all" for the full label space
    shots: int
    episodes: list[Episode] = field(default_factory=list)
    dataset: str | None = None  # None: the test classes of the corpus

    @property
    def name(self) -> str:
        protocol = f"all-way {self.shots}-shot" if self.ways == "all" else f"{self.ways}-way {self.shots}-shot"
        return protocol if self.dataset is None else f"{self.dataset}: {protocol}"


def build_settings(data: LabelledTexts, ways: int | str, shots: list[int], queries: int, episodes: int,
                   repeats: int, support_data: LabelledTexts | None, seed: int,
                   spaces: dict[str, float] | None = None, dataset: str | None = None) -> list[Setting]:
    """`spaces`: the data's domains are label spaces with these weights; an episode's classes come from one
    (ways = min(N, its classes)). `dataset` names the settings of a dataset other than the test classes."""
    settings = []
    for k in shots:
        setting = Setting(ways, k, dataset=dataset)
        if ways == "all":
            setting.episodes = [full_label_space_episode(support_data or data, data if support_data else None,
                                                         k, seed + r) for r in range(repeats)]
        else:
            if support_data is not None:
                raise DataError("--support-data is for the full label space (--ways all)")
            setting.episodes = EpisodeSampler(data, int(ways), k, queries, seed=seed + 1000 * k,
                                              spaces=spaces).take(episodes)
        settings.append(setting)
    return settings


def evaluate_methods(methods: dict[str, Learner], data: LabelledTexts, settings: list[Setting],
                     support_data: LabelledTexts | None = None, seed: int = 0, show_progress: bool = True,
                     episode_limits: dict[str, int] | None = None) -> dict:
    """Run every method on every setting's episodes; the result is JSON-ready.

    `episode_limits` caps slow methods (fine-tuning costs seconds an episode on a CPU) to the first N episodes
    of each setting: still the same episodes as the others, so the paired difference uses that common prefix.
    """
    episode_limits = episode_limits or {}
    tokens: dict[tuple, tuple[TokenizedTexts, TokenizedTexts]] = {}  # per tokenizer, shared by settings/methods
    results: dict = {"settings": []}
    for setting in settings:
        entry = {"setting": setting.name, "ways": setting.ways, "shots": setting.shots,
                 "episodes": len(setting.episodes), "methods": {}}
        if setting.dataset is not None:
            entry["dataset"] = setting.dataset
        for name, learner in methods.items():
            learner.eval()
            key = (id(learner.encoder.tokenizer), learner.encoder.config.max_length)
            if key not in tokens:
                query_tokens = learner.encoder.tokenize(data.texts)
                tokens[key] = (query_tokens,
                               learner.encoder.tokenize(support_data.texts) if support_data else query_tokens)
            query_tokens, support_tokens = tokens[key]
            outcomes = []
            episodes = setting.episodes[: episode_limits.get(name, len(setting.episodes))]
            with progress_bar(f"{setting.name} {name}", len(episodes), show_progress) as advance:
                for i, episode in enumerate(episodes):
                    outcomes.append(run_episode(learner, episode, support_tokens, query_tokens, seed * 100_003 + i))
                    advance()
            accuracies = np.array([o.accuracy for o in outcomes])
            mean, ci = mean_ci(accuracies)
            entry["methods"][name] = {
                "accuracy": mean, "ci95": ci, "episodes": len(outcomes), "per_episode": accuracies.round(6).tolist(),
                "adapt_ms": 1000 * float(np.mean([o.adapt_seconds for o in outcomes])),
                "predict_ms": 1000 * float(np.mean([o.predict_seconds for o in outcomes])),
            }
        if BASELINE in entry["methods"]:
            base = np.array(entry["methods"][BASELINE]["per_episode"])
            for method in entry["methods"].values():
                paired = np.array(method["per_episode"])
                diff, ci = mean_ci(paired - base[: len(paired)])
                method["diff_vs_frozen"], method["diff_ci95"] = diff, ci
        results["settings"].append(entry)
    return results


def build_methods(model: Path | None, encoder: str, names: list[str], device: str = "auto") -> dict[str, Learner]:
    """The methods to compare: the model's own learner (loaded), and baselines on the same base encoder."""
    from metanlp.config import EncoderConfig
    from metanlp.encoder import TextEncoder, resolve_device

    spec = read_spec(model) if model else None
    base = spec.encoder.model_copy(update={"attn_implementation": "sdpa"}) if spec else EncoderConfig(
        name_or_path=encoder)
    methods, base_encoder = {}, None
    for name in names:
        if spec is not None and name == spec.learner.kind:
            methods[name] = load_learner(model)
        elif name in LEARNERS and not LEARNERS[name].meta_trainable:
            if base_encoder is None:
                base_encoder = TextEncoder.from_config(base)
            # The baselines share the pretrained encoder: fine-tuning works on a copy of its weights.
            methods[name] = build_learner(name, base_encoder)
        elif name in LEARNERS:
            where = f"{model} holds a {spec.learner.kind!r} learner" if spec else "no --model was given"
            raise DataError(f"method {name!r} needs a model meta-trained with it; {where}")
        else:
            raise DataError(f"unknown method {name!r}; choose from {sorted(LEARNERS)}")
    target = resolve_device(device)
    return {name: learner.to(target) for name, learner in methods.items()}


def evaluate_model(model: Path | None, data: LabelledTexts, settings: list[Setting], methods: list[str],
                   support_data: LabelledTexts | None = None, encoder: str = "default", device: str = "auto",
                   extra: dict[str, Learner] | None = None, seed: int = 0, show_progress: bool = True,
                   episode_limits: dict[str, int] | None = None,
                   also: Sequence[tuple[LabelledTexts, list[Setting]]] = ()) -> dict:
    """The one evaluation path (`metanlp evaluate` and the pipeline's evaluate stage): the model's learner and
    the baselines in `methods` (plus `extra` learners, e.g. domain-adapted variants) on `settings`' episodes,
    then on the settings of each further dataset in `also` (their rows follow in the same result)."""
    learners = build_methods(model, encoder, methods, device)
    for name, learner in (extra or {}).items():
        learners[name] = learner.to(next(iter(learners.values())).encoder.device) if learners else learner
    results = evaluate_methods(learners, data, settings, support_data, seed, show_progress, episode_limits)
    for more_data, more_settings in also:
        results["settings"] += evaluate_methods(learners, more_data, more_settings, None, seed, show_progress,
                                                episode_limits)["settings"]
    if model is not None:
        results["learner"] = read_spec(model).learner.kind
    return results
