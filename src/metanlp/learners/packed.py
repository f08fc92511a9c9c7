"""Padding-free BERT layers for the gradient learners: token-wise work runs on the real tokens only.

A meta-learner re-runs its adapted layers at every inner step. In a padded batch of short texts a quarter to
two fifths of the positions are padding (CLINC150 5-shot support sets: 40%), and the projections and the
feed-forward block, most of a layer's arithmetic, would compute them for nothing. Here the hidden states
stay packed as [real tokens, hidden]; only attention, which needs each text's positions side by side, is
scattered back to [texts, heads, length, head dim] for its two matrix products. The result is the function
`transformers`' eager BertLayer computes (a test compares them, values and gradients), written with plain
tensor ops, so second-order gradients and `torch.func` transforms go through it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

LAYER_MODULES = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
                 "attention.output.LayerNorm", "intermediate.dense", "output.dense", "output.LayerNorm")
LAYER_PARAMETERS = frozenset(f"{module}.{kind}" for module in LAYER_MODULES for kind in ("weight", "bias"))
PACKABLE_TYPES = ("bert", "roberta", "xlm-roberta")  # post-LayerNorm encoders with BertLayer's parameter names


def packable(model: nn.Module, layers: list[nn.Module]) -> bool:
    """True when every layer is a plain BERT-style encoder layer (no LoRA wrappers, no cross-attention)."""
    config = model.config
    return (config.model_type in PACKABLE_TYPES and not config.is_decoder and not config.add_cross_attention
            and getattr(config, "position_embedding_type", "absolute") == "absolute"
            and all({n for n, _ in layer.named_parameters()} == LAYER_PARAMETERS for layer in layers))


class PackedTokens:
    """Where the real tokens of a padded [texts, length] batch are, to move hidden states in and out of the
    packed [real tokens, hidden] form, and to pool them per text."""

    def __init__(self, attention_mask: torch.Tensor, dtype: torch.dtype, pooling: str) -> None:
        real = attention_mask.bool()
        self.texts, self.length = real.shape
        self.index = real.reshape(-1).nonzero().squeeze(1)
        self.attention_bias = (~real)[:, None, None, :].to(dtype) * torch.finfo(dtype).min
        if pooling == "cls":  # every text's first position is real, so its packed row is the count before it
            lengths = real.sum(dim=1)
            self.first_token = lengths.cumsum(0) - lengths
            self.mean_weights = None
        else:  # a [texts, tokens] matrix: mean pooling is one matrix product, fine under vmap and autograd
            member = F.one_hot(self.index // self.length, self.texts).T.to(dtype)
            self.mean_weights = member / member.sum(dim=1, keepdim=True).clamp(min=1.0)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(-1, padded.shape[-1]).index_select(0, self.index)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        flat = packed.new_zeros(self.texts * self.length, packed.shape[-1])
        return flat.index_copy(0, self.index, packed).view(self.texts, self.length, -1)

    def pool(self, packed: torch.Tensor) -> torch.Tensor:
        if self.mean_weights is None:
            return packed.index_select(0, self.first_token)
        return self.mean_weights.to(packed.dtype) @ packed


class TaskGrid:
    """The packed tokens of a stack of tasks (task after task, as `PackedTokens` packs their rows) laid out as
    [tasks, most tokens of a task, hidden], zeros after a task's last token.

    When every task has its own weights (inner loops adapt per task), a layer then applies all tasks'
    weights with one batched matrix product instead of one product per task: far fewer, larger kernels.
    """

    def __init__(self, tokens_per_task: list[int], device: torch.device) -> None:
        self.tasks, self.width = len(tokens_per_task), max(tokens_per_task)
        self.index = torch.cat([torch.arange(n, device=device) + task * self.width
                                for task, n in enumerate(tokens_per_task)])

    def to_grid(self, packed: torch.Tensor) -> torch.Tensor:
        grid = packed.new_zeros(self.tasks * self.width, packed.shape[-1])
        return grid.index_copy(0, self.index, packed).view(self.tasks, self.width, -1)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        return grid.reshape(-1, grid.shape[-1]).index_select(0, self.index)


def bert_layer(params: dict[str, torch.Tensor], hidden: torch.Tensor, tokens: PackedTokens, config,
               training: bool, grid: TaskGrid | None = None) -> torch.Tensor:
    """One post-LayerNorm BERT encoder layer on packed hidden states [real tokens, hidden].

    grid: the tensors in `params` are stacks with one entry per task ([tasks, out, in] weights), and `hidden`
    is in the grid's [tasks, tokens, hidden] layout; `tokens` then describes the texts of all tasks together.
    """
    width, heads = hidden.shape[-1], config.num_attention_heads
    head_dim = width // heads

    def dropout(x, p):
        return F.dropout(x, p, training=training)

    def affine(x, weight, bias):
        if grid is None:
            return F.linear(x, weight, bias)
        return torch.baddbmm(bias.unsqueeze(1), x, weight.transpose(1, 2))

    def linear(name, x):
        return affine(x, params[f"{name}.weight"], params[f"{name}.bias"])

    def norm(name, x):
        weight, bias = params[f"{name}.weight"], params[f"{name}.bias"]
        if grid is None:
            return F.layer_norm(x, (width,), weight, bias, config.layer_norm_eps)
        return F.layer_norm(x, (width,), eps=config.layer_norm_eps) * weight.unsqueeze(1) + bias.unsqueeze(1)

    def to_texts(x):  # token rows (packed or grid) -> [texts, length, channels]
        return tokens.unpack(x if grid is None else grid.from_grid(x))

    def from_texts(x):
        packed = tokens.pack(x)
        return packed if grid is None else grid.to_grid(packed)

    # One projection for query, key and value: a single larger matrix product, then one scatter to texts.
    qkv_weight = torch.cat([params[f"attention.self.{n}.weight"] for n in ("query", "key", "value")], dim=-2)
    qkv_bias = torch.cat([params[f"attention.self.{n}.bias"] for n in ("query", "key", "value")], dim=-1)
    qkv = to_texts(affine(hidden, qkv_weight, qkv_bias))
    query, key, value = (t.reshape(tokens.texts, tokens.length, heads, head_dim).transpose(1, 2)
                         for t in qkv.split(width, dim=-1))
    scores = query @ key.transpose(-1, -2) * head_dim**-0.5 + tokens.attention_bias
    probs = dropout(F.softmax(scores, dim=-1), config.attention_probs_dropout_prob)
    context = from_texts((probs @ value).transpose(1, 2).reshape(tokens.texts, tokens.length, width))
    attended = norm("attention.output.LayerNorm",
                    dropout(linear("attention.output.dense", context), config.hidden_dropout_prob) + hidden)
    inner = ACT2FN[config.hidden_act](linear("intermediate.dense", attended))
    return norm("output.LayerNorm", dropout(linear("output.dense", inner), config.hidden_dropout_prob) + attended)
