"""Distillation into a smaller encoder: the student is the teacher's learner with only some of its encoder
layers (every other one by default, as DistilBERT starts), trained on unlabeled text to give the teacher's
sentence embeddings (relative squared error) and their pairwise cosine similarities within a batch (squared
error), the quantity prototypes and nearest neighbours depend on; optionally each kept layer's hidden states
are also pulled toward the teacher's at the layer it was copied from (`hidden_weight`), as Patient KD and
TinyBERT do. It is a normal metanlp model: same learner kind and spec, a shallower encoder; predict, evaluate
and serve take it as they take the teacher.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metanlp.config import DistilConfig
from metanlp.data.load import DataError
from metanlp.encoder import TextEncoder, autocast, resolve_device
from metanlp.learners.base import Learner
from metanlp.progress import progress_bar
from metanlp.runtime import seeded


def layer_stack(model: nn.Module) -> tuple[nn.Module, str]:
    """The module holding the Transformer blocks (BERT's `encoder.layer`, DistilBERT's `transformer.layer`)
    and that attribute's name: the first ModuleList as long as the configured number of layers."""
    layers = model.config.num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == layers and name:
            parent_name, _, attribute = name.rpartition(".")
            return model.get_submodule(parent_name) if parent_name else model, attribute
    raise DataError(f"encoder {type(model).__name__}: no list of {layers} Transformer layers to keep some of")


def default_layers(teacher_layers: int) -> list[int]:
    """Every other layer, ending with the top one: 6 -> [1, 3, 5]."""
    return list(range(teacher_layers - 1, -1, -2))[::-1]


def shrink(encoder: TextEncoder, layers: list[int]) -> None:
    """Keep only `layers` of the encoder's Transformer blocks, in place."""
    parent, attribute = layer_stack(encoder.model)
    blocks = getattr(parent, attribute)
    if layers[-1] >= len(blocks):
        raise DataError(f"layers {layers}: the teacher has {len(blocks)} layers (0 to {len(blocks) - 1})")
    setattr(parent, attribute, nn.ModuleList([blocks[i] for i in layers]))
    encoder.model.config.num_hidden_layers = len(layers)


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, similarity_weight: float) -> torch.Tensor:
    """Squared error of the embeddings relative to the teacher's mean square, plus `similarity_weight` times
    the squared error of the batch's pairwise cosine similarities."""
    embedding = (student - teacher).pow(2).mean() / teacher.pow(2).mean().clamp(min=1e-12)
    unit_s, unit_t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    similarity = (unit_s @ unit_s.T - unit_t @ unit_t.T).pow(2).mean()
    return embedding + similarity_weight * similarity


def hidden_state_loss(student: tuple[torch.Tensor, ...], teacher: tuple[torch.Tensor, ...], layers: list[int],
                      mask: torch.Tensor) -> torch.Tensor:
    """Mean over the student's layers of the squared error between its j-th layer's token states and the
    teacher's after layer `layers[j]`, over real tokens, relative to the teacher's mean square there.
    Both tuples are Hugging Face `hidden_states`: the embeddings first, then one entry per layer."""
    real = mask.unsqueeze(-1).to(student[0].dtype)
    terms = []
    for kept, source in enumerate(layers):
        given, wanted = student[kept + 1].float(), teacher[source + 1].float()
        error = ((given - wanted).pow(2) * real).sum() / (wanted.pow(2) * real).sum().clamp(min=1e-12)
        terms.append(error)
    return torch.stack(terms).mean()


def distil(teacher: Learner, texts: list[str], config: DistilConfig | None = None, device: str = "auto",
           show_progress: bool = True) -> tuple[Learner, dict]:
    """A student of `teacher` (which is left unchanged) and a summary of the run (losses, seconds, layers)."""
    config = config or DistilConfig()
    if getattr(teacher, "memory", None) is not None:
        raise DataError("distil the model without its memory, then give the student one (`metanlp memory`): "
                        "memory keys belong to the encoder that computed them")
    if len(texts) < config.batch_size:
        raise DataError(f"distillation needs at least {config.batch_size} texts (batch size); got {len(texts)}")
    teacher_layers = teacher.encoder.model.config.num_hidden_layers
    layers = config.layers or default_layers(teacher_layers)
    target = resolve_device(device)
    teacher = teacher.to(target).eval()
    student = copy.deepcopy(teacher)
    shrink(student.encoder, layers)
    student.encoder.train()
    tokens = teacher.encoder.tokenize(texts)
    rng = np.random.default_rng(config.seed)
    optimizer = torch.optim.AdamW(student.encoder.parameters(), lr=config.lr, weight_decay=0.01)
    hidden = config.hidden_weight > 0
    losses: list[float] = []
    started = time.perf_counter()
    with seeded(config.seed), progress_bar("distillation", config.steps, show_progress) as advance:
        for _ in range(config.steps):  # dropout draws from torch's generator, seeded above
            batch = tokens.batch(rng.choice(len(tokens), size=config.batch_size, replace=False))
            with torch.no_grad(), autocast(target):
                wanted, wanted_states = teacher.encoder.with_layer_states(batch, hidden)
            with autocast(target):
                given, given_states = student.encoder.with_layer_states(batch, hidden)
            loss = distillation_loss(given.float(), wanted.float(), config.similarity_weight)
            if hidden:
                mask = batch.attention_mask.to(target)
                loss = loss + config.hidden_weight * hidden_state_loss(given_states, wanted_states, layers, mask)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.encoder.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            advance(loss=float(np.mean(losses[-20:])))
    student.encoder.eval()
    summary = {"layers": layers, "teacher_layers": teacher_layers, "texts": len(texts), "steps": config.steps,
               "loss_first": losses[0], "loss_last20": float(np.mean(losses[-20:])),
               "seconds": time.perf_counter() - started, "config": config.model_dump()}
    return student.eval(), summary
