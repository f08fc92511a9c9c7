"""Unlabeled text -> a better starting encoder: continued masked-LM pretraining.

The encoder gets a masked-LM head of its architecture (tied to its embeddings; the packaged sentence
encoders ship none, so it starts fresh), trains on the text with the transformers data collator (15% of
tokens masked, 80/10/10), and the encoder weights are copied back into the `TextEncoder`.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from transformers import AutoModelForMaskedLM, DataCollatorForLanguageModeling

from metanlp.config import EncoderConfig, PretrainParams
from metanlp.encoder import TextEncoder, resolve_device
from metanlp.progress import progress_bar
from metanlp.runtime import seeded


def with_mlm_head(encoder: TextEncoder):
    """A masked-LM model whose base carries the encoder's current weights."""
    model = AutoModelForMaskedLM.from_config(encoder.model.config)
    model.base_model.load_state_dict(encoder.model.state_dict(), strict=False)  # no pooler in the MLM base
    return model


def mlm_batches(encoder: TextEncoder, texts: list[str], batch_size: int, mlm_probability: float, seed: int):
    """Endless shuffled batches of masked inputs, deterministic for a seed."""
    tokenizer = encoder.tokenizer
    encoded = tokenizer(texts, truncation=True, max_length=encoder.config.max_length)["input_ids"]
    collator = DataCollatorForLanguageModeling(tokenizer, mlm_probability=mlm_probability, return_tensors="pt")
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(encoded))
        for start in range(0, len(encoded) - batch_size + 1, batch_size):
            yield collator([{"input_ids": encoded[i]} for i in order[start:start + batch_size]])


def mlm_pretrain(encoder: TextEncoder, texts: list[str], steps: int, lr: float = 5e-5, batch_size: int = 32,
                 mlm_probability: float = 0.15, seed: int = 0, device: str = "auto",
                 show_progress: bool = True, model=None, anchor: float = 0.0,
                 deadline: float | None = None) -> list[float]:
    """Continue masked-LM pretraining of `encoder` in place on `texts`; returns the loss of every step.

    `deadline`: a `time.perf_counter()` value after which no further step starts.
    `model`: a masked-LM model from `with_mlm_head(encoder)` to train (and keep its head); a new one otherwise.
    `anchor`: weight of an L2 penalty toward the starting encoder weights (test-time self-supervision).
    """
    if len(texts) < batch_size:
        batch_size = max(1, len(texts))
    # The head's initialisation, the collator's masks and dropout draw from torch's generator: seeded here.
    with seeded(seed):
        target = resolve_device(device)
        model = (model or with_mlm_head(encoder)).to(target).train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
        batches = mlm_batches(encoder, texts, batch_size, mlm_probability, seed)
        base = dict(model.base_model.named_parameters())
        start = {k: v.detach().clone() for k, v in base.items()} if anchor else {}
        losses = []
        with progress_bar("masked-LM pretraining", steps, show_progress) as advance:
            for _ in range(steps):
                batch = {k: v.to(target) for k, v in next(batches).items()}
                loss = model(**batch).loss
                if anchor:
                    loss = loss + anchor * sum(((base[k] - v) ** 2).sum() for k, v in start.items())
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                losses.append(loss.item())
                advance(loss=float(np.mean(losses[-20:])))
                if deadline is not None and time.perf_counter() > deadline:
                    break
    encoder.model.load_state_dict(model.base_model.state_dict(), strict=False)
    encoder.to(target).eval()
    return losses


def unlabeled_sentences(sources: list[str], per_source: int | None = None, seed: int = 0) -> list[str]:
    """Text files (one text per line, or JSONL/CSV with a text column) or 'default' -> sentences. With
    `per_source`, a larger source gives a seeded sample of that many (in file order), so that one big file
    does not make up most of the text."""
    from metanlp.data.load import DEFAULT_CORPUS, load_labelled, read_texts
    from metanlp.data.smlmt import split_sentences

    rng = np.random.default_rng(seed)
    sentences: list[str] = []
    for source in sources:
        texts = load_labelled(DEFAULT_CORPUS).texts if source == DEFAULT_CORPUS else read_texts(source)
        found = split_sentences(texts, min_words=3)
        if per_source is not None and len(found) > per_source:
            found = [found[i] for i in np.sort(rng.choice(len(found), size=per_source, replace=False))]
        sentences += found
    return sentences


ENCODER_MARKER = "config.json"  # what makes a folder an encoder this may replace


def save_encoder(encoder: TextEncoder, directory, force: bool = False) -> None:
    """A Hugging Face directory (safetensors + JSON config + tokenizer): any --encoder option takes it."""
    from metanlp.atomic import replace_directory

    def write(staging) -> None:
        encoder.model.save_pretrained(staging, safe_serialization=True)
        encoder.tokenizer.save_pretrained(staging)

    replace_directory(directory, write, marker=ENCODER_MARKER, force=force)


def pretrain_encoder(config: PretrainParams, encoder_config: EncoderConfig, labelled=None, device: str = "auto",
                     show_progress: bool = True) -> tuple[TextEncoder, dict]:
    """The text of `config.text` -> a pretrained encoder and a summary of what was done.

    Text files are validated first (GE); `labelled` (a LabelledTexts of training classes) is mixed into the
    cloze episodes when `config.hybrid`.
    """
    from pathlib import Path

    from metanlp.config import ProtoNetConfig, TrainConfig
    from metanlp.data.load import DataError, LabelledTexts
    from metanlp.data.smlmt import SMLMTConfig, build_smlmt
    from metanlp.data.validation import CorpusInvalid, validate_unlabeled

    for source in config.text:
        if Path(source).suffix.lower() == ".txt":  # labelled formats are checked by their strict reader
            report = validate_unlabeled(Path(source))
            if not report["success"]:
                raise CorpusInvalid(report)
    sentences = unlabeled_sentences(config.text)
    if len(sentences) < 32:
        raise DataError(f"{config.text}: only {len(sentences)} sentences of 3+ words; pretraining needs 32")
    if config.hybrid and labelled is None:
        raise DataError("hybrid pretraining needs the supervised training classes")
    encoder = TextEncoder.from_config(encoder_config)
    summary: dict = {"modes": list(config.modes), "sentences": len(sentences)}
    if "mlm" in config.modes:
        losses = mlm_pretrain(encoder, sentences, config.mlm_steps, config.mlm_lr, seed=config.seed, device=device,
                              show_progress=show_progress)
        summary["mlm_loss_first"], summary["mlm_loss_last20"] = losses[0], float(np.mean(losses[-20:]))
    if "smlmt" in config.modes:
        from metanlp.learners import build_learner
        from metanlp.train import meta_train

        tasks = build_smlmt(sentences, encoder.tokenizer.mask_token,
                            SMLMTConfig(max_words=config.smlmt_words, seed=config.seed), source=",".join(config.text))
        classes = tasks.classes
        cut = max(5, len(classes) // 10)  # held-out words for early stopping
        train_set, mix = tasks.with_classes(classes[cut:]), None
        if config.hybrid:  # supervised episodes beside the cloze tasks, never within one episode
            train_set = LabelledTexts(train_set.texts + labelled.texts, train_set.labels + labelled.labels,
                                      source=f"{train_set.source}+{labelled.source}")
            mix = config.smlmt_fraction
        learner = build_learner(ProtoNetConfig(), encoder)
        steps = config.smlmt_episodes
        result = meta_train(learner, train_set, tasks.with_classes(classes[:cut]),
                            TrainConfig(episodes=steps, val_every=max(1, steps // 5), val_episodes=50,
                                        seed=config.seed, device=device, smlmt_fraction=mix),
                            show_progress=show_progress)
        summary.update(smlmt_classes=len(classes), smlmt_val_accuracy=result.best_val_accuracy,
                       smlmt_best_step=result.best_episode)
    return encoder, summary
