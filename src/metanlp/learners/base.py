"""The one learner interface: a mapping from a labelled support set to a classifier.

    classifier = learner.adapt(support_texts, support_labels)
    predictions = classifier.predict(query_texts)

Meta-trainable learners also give `episode_loss` for the training loop. Every learner saves as
`learner.json` (what it is) + `model.safetensors` (its weights) + `encoder/` (architecture and
tokenizer, no weights): nothing is ever unpickled.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from metanlp.config import LearnerSpec
from metanlp.data.episodes import Episode
from metanlp.data.load import DataError
from metanlp.encoder import TextEncoder, TokenBatch, TokenizedTexts

SPEC_FILE, WEIGHTS_FILE, ENCODER_DIR = "learner.json", "model.safetensors", "encoder"


@dataclass(frozen=True)
class Predictions:
    labels: list[str]
    scores: np.ndarray  # [texts, classes] probabilities
    classes: list[str]

    def top(self, k: int) -> list[list[tuple[str, float]]]:
        """The k best (class, probability) pairs of each text, best first."""
        order = np.argsort(-self.scores, axis=1, kind="stable")[:, :k]
        return [[(self.classes[j], float(row[j])) for j in best] for row, best in zip(self.scores, order, strict=True)]


class Classifier:
    """What `adapt` returns: scores texts over the support set's classes."""

    def __init__(self, classes: list[str], encoder: TextEncoder,
                 logits_fn: Callable[[TokenizedTexts], torch.Tensor]) -> None:
        self.classes = classes
        self.encoder = encoder
        self._logits = logits_fn

    def predict(self, texts: list[str] | TokenizedTexts) -> Predictions:
        tokens = texts if isinstance(texts, TokenizedTexts) else self.encoder.tokenize(list(texts))
        with torch.no_grad():
            scores = torch.softmax(self._logits(tokens).float(), dim=-1).cpu().numpy()
        return Predictions([self.classes[i] for i in scores.argmax(axis=1)], scores, self.classes)


def logits_in_chunks(encoder: TextEncoder, queries: TokenizedTexts,
                     logits_of: Callable[[TokenBatch], torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    """Query logits batch by batch, without gradients or dropout (the encoder's mode is restored after)."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            chunks = [logits_of(queries.batch(np.arange(start, min(start + batch_size, len(queries)))))
                      for start in range(0, len(queries), batch_size)]
    finally:
        encoder.train(was_training)
    return torch.cat(chunks).cpu()


def support_targets(labels: list[str]) -> tuple[list[str], torch.Tensor]:
    """Class names in first-seen-sorted order and each support row's position among them."""
    if not labels:
        raise DataError("the support set is empty")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise DataError(f"the support set has one class ({classes[0]!r}); a classifier needs at least two")
    position = {c: i for i, c in enumerate(classes)}
    return classes, torch.tensor([position[label] for label in labels])


class Learner(nn.Module):
    """Base class. Subclasses set `name`, implement `adapt`, and if meta-trainable, `episode_loss`."""

    name: str = ""
    meta_trainable: bool = False

    def __init__(self, encoder: TextEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.provenance: dict = {}  # split, classes, train data: written beside the weights

    def tokens(self, texts: list[str] | TokenizedTexts) -> TokenizedTexts:
        return texts if isinstance(texts, TokenizedTexts) else self.encoder.tokenize(list(texts))

    def adapt(self, support: list[str] | TokenizedTexts, labels: list[str]) -> Classifier:
        raise NotImplementedError

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Loss and query logits of one training episode (support and query rows of `tokens`)."""
        raise NotImplementedError(f"learner {self.name!r} is not meta-trainable")

    def batch_loss(self, tokens: TokenizedTexts, episodes: list[Episode]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Mean loss over a meta-batch of episodes, and each episode's query logits."""
        losses, logits = zip(*(self.episode_loss(tokens, e) for e in episodes), strict=True)
        return torch.stack(losses).mean(), list(logits)

    def backward_batch(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """Accumulate the meta-gradient of a meta-batch into `.grad`; returns the loss (detached) and logits."""
        loss, logits = self.batch_loss(tokens, episodes)
        loss.backward()
        return loss.detach(), [lg.detach() for lg in logits]

    def options(self) -> dict:
        """Learner-specific config sections of the spec (e.g. {"protonet": ProtoNetConfig})."""
        return {}

    def meta_train(self, train_data, val_data, config, out_dir=None, **options):
        """Meta-train on episodes of `train_data`'s classes, early-stopping on `val_data`'s; `options` as in
        `metanlp.train.meta_train` (show_progress, checkpoint_dir, stop_after)."""
        from metanlp.train import meta_train

        return meta_train(self, train_data, val_data, config, out_dir, **options)

    def save(self, directory: str | Path) -> Path:
        return save_learner(self, directory)

    def spec(self) -> LearnerSpec:
        return LearnerSpec(learner=self.name, encoder=self.encoder.config, **self.options(), **self.provenance)


def replace_directory(directory: str | Path, write: Callable[[Path], None]) -> Path:
    """Fill a staging folder with `write`, then swap it in for `directory`: a crash leaves the old
    contents, never half of the new ones."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        write(staging)
        if directory.exists():
            retired = directory.with_name(f".{directory.name}.old")
            shutil.rmtree(retired, ignore_errors=True)
            directory.rename(retired)
            staging.rename(directory)
            shutil.rmtree(retired)
        else:
            staging.rename(directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


def save_learner(learner: Learner, directory: str | Path) -> Path:
    """Write the learner to `directory` atomically: a crash leaves the old contents, never half a model."""

    def write(staging: Path) -> None:
        (staging / SPEC_FILE).write_text(learner.spec().model_dump_json(indent=2))
        save_model(learner, str(staging / WEIGHTS_FILE))
        learner.encoder.save_architecture(staging / ENCODER_DIR)

    return replace_directory(directory, write)


def read_spec(directory: str | Path) -> LearnerSpec:
    directory = Path(directory)
    path = directory / SPEC_FILE
    if not path.is_file():
        raise DataError(f"{directory}: not a metanlp model (no {SPEC_FILE})")
    try:
        return LearnerSpec.model_validate(json.loads(path.read_text()))
    except (json.JSONDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a valid learner spec: {err}") from err


def load_learner(directory: str | Path, attn_implementation: str | None = None) -> Learner:
    from metanlp.learners import build_learner

    directory = Path(directory)
    spec = read_spec(directory)
    encoder_config = spec.encoder
    if attn_implementation:
        encoder_config = encoder_config.model_copy(update={"attn_implementation": attn_implementation})
    encoder = TextEncoder.from_architecture(directory / ENCODER_DIR, encoder_config)
    learner = build_learner(spec.learner, encoder, spec)
    missing, unexpected = load_model(learner, str(directory / WEIGHTS_FILE), strict=False)
    if missing or unexpected:
        raise DataError(f"{directory / WEIGHTS_FILE}: weights do not match the {spec.learner!r} learner "
                        f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})")
    learner.provenance = {k: getattr(spec, k) for k in ("split", "classes", "train_data", "adapted")}
    return learner.eval()

