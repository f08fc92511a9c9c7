"""Where the encoder runs during inner loops: the layers no inner step changes (the bottom) once per batch,
the adapted top layers at every step with the fast tensors, on packed (padding-free) BERT layers when the
encoder allows, under gradient checkpointing when asked.

An `EncoderSplit` turns a token batch into a feature function of the fast tensors (`feature_fn`), which is
all the inner loop (`inner_loop`) and the meta-batch execution (`meta_batch`) need to know of the encoder.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from metanlp.config import GradientConfig
from metanlp.data.episodes import Episode
from metanlp.encoder import TextEncoder, TokenBatch, TokenizedTexts, autocast, pool
from metanlp.learners.packed import PackedTokens, TaskGrid, bert_layer, packable


def _bottom_layer_count(encoder: TextEncoder, config: GradientConfig) -> int | None:
    """How many layers stay fixed in the inner loop, when the encoder can be run in two parts (BERT family);
    None where it cannot, and the whole encoder runs at every inner step."""
    model = encoder.model
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if config.adapt == "all" or layers is None or not hasattr(model, "embeddings"):
        return None
    return len(layers) if config.adapt == "head" else max(0, len(layers) - config.top_layers)


def trim(shared, width: int):
    """Shared bottom activations were padded to the meta-batch's longest row; cut them to this batch's width."""
    hidden, mask = shared
    if mask is not None:
        mask = mask[..., :width, :width] if mask.dim() == 4 else mask[..., :width]
    return hidden[:, :width], mask


def unit(features: torch.Tensor) -> torch.Tensor:
    """Unit-norm features in at least fp32 (bf16 under autocast is raised; fp64 in gradient checks stays)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


class EncoderSplit:
    def __init__(self, encoder: TextEncoder, config: GradientConfig) -> None:
        self.encoder, self.config = encoder, config
        self.n_bottom = _bottom_layer_count(encoder, config)
        layers = [] if self.n_bottom is None else list(encoder.model.encoder.layer)
        self.packed = config.packed and len(layers) > self.n_bottom and packable(encoder.model, layers)
        if config.gradient_checkpointing and self.n_bottom is None:  # the whole encoder runs at every step
            encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def features(self, fast: dict[str, torch.Tensor], batch: TokenBatch) -> torch.Tensor:
        """The whole encoder with the fast tensors in place of its own."""
        params = {**dict(self.encoder.named_parameters()), **fast}
        with autocast(self.encoder.device):
            out = functional_call(self.encoder, params, (batch,))
        return unit(out)

    def bottom(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and the layers the inner loop never changes: run once per batch, not once per step."""
        from transformers.masking_utils import create_bidirectional_mask

        model, batch = self.encoder.model, batch.to(self.encoder.device)
        with autocast(self.encoder.device):
            hidden = model.embeddings(input_ids=batch.input_ids)
            if self.packed:  # [real tokens of all rows, hidden], row after row
                packed = self.packed_tokens(batch.attention_mask, hidden)
                hidden = packed.pack(hidden)
                for layer in model.encoder.layer[: self.n_bottom]:
                    hidden = self.checkpointed(bert_layer, dict(layer.named_parameters()), hidden, packed,
                                               model.config, layer.training)
                return hidden, None
            mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                             attention_mask=batch.attention_mask)
            for layer in model.encoder.layer[: self.n_bottom]:
                hidden = self.checkpointed(layer, hidden, mask)
        return hidden, mask

    def top(self, fast: dict[str, torch.Tensor], hidden: torch.Tensor, mask: torch.Tensor | None,
            attention_mask: torch.Tensor, packed: PackedTokens | None = None,
            grid: TaskGrid | None = None) -> torch.Tensor:
        """The adapted top layers with the fast tensors, then pooling: unit-norm features.

        packed: the batch's token positions when `hidden` is packed (`self.packed`): real tokens only.
        grid: `hidden` holds a stack of tasks in the grid's layout and every fast tensor has one entry per task;
        the features are then [tasks, texts of a task, dim]."""
        layers = self.encoder.model.encoder.layer
        with autocast(self.encoder.device):
            for i in range(self.n_bottom, len(layers)):
                prefix = f"model.encoder.layer.{i}."
                local = {n[len(prefix):]: t for n, t in fast.items() if n.startswith(prefix)}
                if packed is not None:
                    hidden = self.checkpointed(bert_layer, local, hidden, packed, self.encoder.model.config,
                                               layers[i].training, grid)
                else:
                    hidden = self.checkpointed(functional_call, layers[i], local, (hidden, mask))
        if grid is not None:
            return unit(packed.pool(grid.from_grid(hidden))).unflatten(0, (grid.tasks, -1))
        if packed is not None:
            return unit(packed.pool(hidden))
        return unit(pool(hidden, attention_mask.to(hidden.device), self.encoder.config.pooling))

    def checkpointed(self, function, *args):
        """`function(*args)`, its activations recomputed in the backward pass with gradient checkpointing."""
        if self.config.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(function, *args, use_reentrant=False)
        return function(*args)

    def feature_fn(self, batch: TokenBatch, shared=None, track_meta: bool = True):
        """Features of `batch` as a function of the fast tensors.

        With a bottom/top split the bottom runs here, once (or comes in `shared` for a meta-batch);
        otherwise every call runs the whole encoder with the fast tensors.
        """
        if self.n_bottom is None:
            return lambda fast: self.features(fast, batch)
        if shared is None:
            with torch.set_grad_enabled(track_meta and torch.is_grad_enabled()):  # at test time: no graph
                shared = self.bottom(batch)
        hidden, mask = shared
        if not track_meta:
            hidden = hidden.detach()
        # The token positions are found once per batch, not once per inner step.
        packed = self.packed_tokens(batch.attention_mask, hidden) if self.packed else None
        return lambda fast: self.top(fast, hidden, mask, batch.attention_mask, packed)

    def packed_tokens(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> PackedTokens:
        return PackedTokens(attention_mask.to(hidden.device), torch.promote_types(hidden.dtype, torch.float32),
                            self.encoder.config.pooling)

    def shared_bottom(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """The bottom's output for every row of every task (support then query, task after task), or None
        when the encoder runs whole."""
        if self.n_bottom is None:
            return None
        rows = np.concatenate([np.concatenate([e.support, e.query]) for e in episodes])
        return self.bottom(tokens.batch(rows))
