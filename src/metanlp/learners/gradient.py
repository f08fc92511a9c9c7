"""Gradient-based meta-learners, written functionally with `torch.func.functional_call`.

- `maml`: second-order MAML (Finn et al., 2017): the query loss is differentiated through the inner steps.
- `fomaml`: first-order MAML: the inner gradients are treated as constants.
- `anil`: only the head adapts in the inner loop (Raghu et al., 2020); the encoder runs once per set.
- `metasgd`: a learned learning rate per adapted tensor (Li et al., 2017), meta-learned with the weights.
- `reptile`: the outer update moves the weights toward the adapted ones (Nichol et al., 2018).

The inner loop never copies modules: it keeps a dict of "fast" tensors and calls the encoder with them.
The head is a linear layer on unit-norm features, initialised from the support prototypes (Proto-MAML).
"""

from __future__ import annotations

import math
import re

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from metanlp.config import GradientConfig
from metanlp.data.episodes import Episode
from metanlp.encoder import TextEncoder, TokenBatch, TokenizedTexts, autocast, pool
from metanlp.learners.base import Classifier, Learner, logits_in_chunks, support_targets
from metanlp.learners.packed import PackedTokens, TaskGrid, bert_layer, packable
from metanlp.learners.protonet import prototypes

HEAD = ("head.weight", "head.bias")


def add_lora_adapters(encoder: TextEncoder, config: GradientConfig) -> None:
    """LoRA adapters (peft) in the top N layers; they start as a no-op (B = 0) and are meta-learned.

    peft freezes the base weights: the outer loop then learns the adapters' start, the head scale and
    (Meta-SGD) the inner learning rates, which keeps meta-training memory small on large encoders."""
    from peft import LoraConfig, inject_adapter_in_model

    layers = len(encoder.model.encoder.layer)
    lora = LoraConfig(r=config.lora_rank, lora_alpha=2 * config.lora_rank, lora_dropout=0.0,
                      target_modules=list(config.lora_targets),
                      layers_to_transform=list(range(max(0, layers - config.top_layers), layers)))
    inject_adapter_in_model(lora, encoder.model)


def adapted_parameter_names(encoder: TextEncoder, adapt: str, top_layers: int) -> list[str]:
    """Encoder tensors the inner loop changes: none (head only), those of the top N layers, LoRA adapters,
    or all."""
    names = [n for n, p in encoder.named_parameters() if p.requires_grad]
    if adapt == "head":
        return []
    if adapt == "lora":
        return [n for n in names if ".lora_" in n]
    if adapt == "all":
        return [n for n in names if ".pooler." not in n]  # the pooler is unused: we pool ourselves
    layer_of = {n: int(m.group(1)) for n in names if (m := re.search(r"\.layer\.(\d+)\.", n))}
    if not layer_of:
        raise ValueError("adapt='top' needs an encoder whose parameters are named '...layer.<i>...'")
    first = max(layer_of.values()) + 1 - top_layers
    return [n for n in names if layer_of.get(n, -1) >= first]


def _bottom_layer_count(encoder: TextEncoder, config: GradientConfig) -> int | None:
    """How many layers stay fixed in the inner loop, when the encoder can be run in two parts (BERT family);
    None where it cannot, and the whole encoder runs at every inner step."""
    model = encoder.model
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    if config.adapt == "all" or layers is None or not hasattr(model, "embeddings"):
        return None
    return len(layers) if config.adapt == "head" else max(0, len(layers) - config.top_layers)


def _trim(shared, width: int):
    """Shared bottom activations were padded to the meta-batch's longest row; cut them to this batch's width."""
    hidden, mask = shared
    if mask is not None:
        mask = mask[..., :width, :width] if mask.dim() == 4 else mask[..., :width]
    return hidden[:, :width], mask


def _unit(features: torch.Tensor) -> torch.Tensor:
    """Unit-norm features in at least fp32 (bf16 under autocast is raised; fp64 in gradient checks stays)."""
    return F.normalize(features.to(torch.promote_types(features.dtype, torch.float32)), dim=-1)


def _support_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head's cross-entropy; on a stack of tasks the sum of each task's mean, so that every task's fast
    tensors get the gradient they would get alone."""
    logits = h @ weight.mT + bias.unsqueeze(-2)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum") / targets.shape[-1]


def _same_shaped(episodes: list[Episode]) -> bool:
    """Several episodes with equal ways, support and query sizes: their inner loops can run as one batch."""
    return len(episodes) > 1 and len({(len(e.classes), len(e.support), len(e.query)) for e in episodes}) == 1


def _stacked_labels(episodes: list[Episode], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query labels of same-shaped episodes as [tasks, rows] tensors."""
    support = torch.stack([torch.as_tensor(e.support_labels) for e in episodes])
    query = torch.stack([torch.as_tensor(e.query_labels) for e in episodes])
    return support.to(device), query.to(device)


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


class GradientMetaLearner(Learner):
    name = "maml"
    meta_trainable = True

    def __init__(self, encoder: TextEncoder, config: GradientConfig | None = None) -> None:
        super().__init__(encoder)
        self.config = config or GradientConfig.for_algorithm(self.name)
        self.log_scale = nn.Parameter(torch.tensor(math.log(self.config.init_scale)))
        if self.config.adapt == "lora":
            add_lora_adapters(encoder, self.config)
        self.adapted = adapted_parameter_names(encoder, self.config.adapt, self.config.top_layers)
        self.n_bottom = _bottom_layer_count(encoder, self.config)
        layers = [] if self.n_bottom is None else list(encoder.model.encoder.layer)
        self.packed = self.config.packed and len(layers) > self.n_bottom and packable(encoder.model, layers)
        if self.config.gradient_checkpointing and self.n_bottom is None:  # the whole encoder runs at every step
            encoder.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.log_inner_lrs = nn.ParameterDict()
        if self.config.learn_inner_lr:
            for name in self.adapted:
                self.log_inner_lrs[_key(name)] = nn.Parameter(torch.tensor(math.log(self.config.inner_lr)))
            for name in HEAD:
                self.log_inner_lrs[_key(name)] = nn.Parameter(torch.tensor(math.log(self.config.head_inner_lr)))

    def options(self) -> dict:
        return {"gradient": self.config}

    def inner_lr(self, name: str) -> torch.Tensor | float:
        if self.config.learn_inner_lr:
            return self.log_inner_lrs[_key(name)].exp()
        return self.config.head_inner_lr if name in HEAD else self.config.inner_lr

    def features(self, fast: dict[str, torch.Tensor], batch: TokenBatch) -> torch.Tensor:
        params = {**dict(self.encoder.named_parameters()), **fast}
        with autocast(self.encoder.device):
            out = functional_call(self.encoder, params, (batch,))
        return _unit(out)

    def bottom(self, batch: TokenBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Embeddings and the layers the inner loop never changes: run once per batch, not once per step."""
        from transformers.masking_utils import create_bidirectional_mask

        model, batch = self.encoder.model, batch.to(self.encoder.device)
        with autocast(self.encoder.device):
            hidden = model.embeddings(input_ids=batch.input_ids)
            if self.packed:  # [real tokens of all rows, hidden], row after row
                packed = self._packed_tokens(batch.attention_mask, hidden)
                hidden = packed.pack(hidden)
                for layer in model.encoder.layer[: self.n_bottom]:
                    hidden = self._checkpointed(bert_layer, dict(layer.named_parameters()), hidden, packed,
                                                model.config, layer.training)
                return hidden, None
            mask = create_bidirectional_mask(config=model.config, inputs_embeds=hidden,
                                             attention_mask=batch.attention_mask)
            for layer in model.encoder.layer[: self.n_bottom]:
                hidden = self._checkpointed(layer, hidden, mask)
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
                    hidden = self._checkpointed(bert_layer, local, hidden, packed, self.encoder.model.config,
                                                layers[i].training, grid)
                else:
                    hidden = self._checkpointed(functional_call, layers[i], local, (hidden, mask))
        if grid is not None:
            return _unit(packed.pool(grid.from_grid(hidden))).unflatten(0, (grid.tasks, -1))
        if packed is not None:
            return _unit(packed.pool(hidden))
        return _unit(pool(hidden, attention_mask.to(hidden.device), self.encoder.config.pooling))

    def _checkpointed(self, function, *args):
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
        packed = self._packed_tokens(batch.attention_mask, hidden) if self.packed else None
        return lambda fast: self.top(fast, hidden, mask, batch.attention_mask, packed)

    def _packed_tokens(self, attention_mask: torch.Tensor, hidden: torch.Tensor) -> PackedTokens:
        return PackedTokens(attention_mask.to(hidden.device), torch.promote_types(hidden.dtype, torch.float32),
                            self.encoder.config.pooling)

    def inner_loop(self, support: TokenBatch, targets: torch.Tensor, n_classes: int, *, create_graph: bool,
                   track_meta: bool, steps: int | None = None, features=None,
                   tasks: int | None = None) -> dict[str, torch.Tensor]:
        """Adapt on the support set; returns the fast tensors (adapted encoder tensors and the head).

        track_meta: keep the graph back to the meta-parameters (meta-training); otherwise the start is detached.
        create_graph: differentiate through the inner gradients (second order).
        features: a `feature_fn` of the support batch, when the caller already ran the bottom layers.
        tasks: a stack of that many tasks adapts at once ([tasks, support] targets, features on a TaskGrid);
        every fast tensor starts as the meta-parameter repeated per task, so each task gets its own gradient.
        """
        features = features or self.feature_fn(support, track_meta=track_meta)
        fast = {n: p if track_meta else p.detach().requires_grad_() for n, p in self.encoder.named_parameters()
                if n in set(self.adapted)}
        if tasks is not None:
            fast = {n: p.expand(tasks, *p.shape) for n, p in fast.items()}
        h = features(fast)
        targets = targets.to(h.device)
        weight, bias = self.initial_head(h, targets, n_classes)
        if not track_meta:
            weight, bias, h = weight.detach().requires_grad_(), bias.detach().requires_grad_(), h.detach()
        fast.update({HEAD[0]: weight, HEAD[1]: bias})
        first_order_meta = track_meta and not create_graph
        for step in range(self.config.inner_steps if steps is None else steps):
            probe = fast
            if first_order_meta and step > 0:
                # First order needs only the value of later inner gradients: take them on graph-free copies,
                # so no step after the first keeps its activations alive until the outer backward.
                probe = {n: t.detach().requires_grad_() for n, t in fast.items()}
                h = h.detach()
            if step > 0 and self.adapted:
                h = features({n: probe[n] for n in self.adapted})
            loss = _support_loss(h, probe[HEAD[0]], probe[HEAD[1]], targets)
            names = list(probe)
            # retain_graph: the outer loss still needs the graph from the meta-parameters to the start.
            grads = torch.autograd.grad(loss, [probe[n] for n in names], create_graph=create_graph,
                                        retain_graph=track_meta and probe is fast, allow_unused=True)
            fast = {n: fast[n] if g is None else fast[n] - self.inner_lr(n) * g for n, g in zip(names, grads,
                                                                                                strict=True)}
            if not track_meta:  # adaptation at test time: plain SGD on leaf tensors
                fast = {n: t.detach().requires_grad_() for n, t in fast.items()}
        return fast

    def initial_head(self, h: torch.Tensor, targets: torch.Tensor, n_classes: int):
        """Proto-MAML: class weights are the scaled prototypes, biases zero; step 0 is ProtoNet."""
        weight = self.log_scale.exp() * F.normalize(prototypes(h, targets, n_classes), dim=-1)
        return weight, torch.zeros(*h.shape[:-2], n_classes, device=h.device, dtype=h.dtype, requires_grad=True)

    def logits(self, fast: dict[str, torch.Tensor], batch: TokenBatch, features=None) -> torch.Tensor:
        features = features or self.feature_fn(batch, track_meta=False)
        h = features({n: fast[n] for n in self.adapted})
        return h @ fast[HEAD[0]].mT + fast[HEAD[1]].unsqueeze(-2)

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode):
        loss, logits = self.batch_loss(tokens, [episode])
        return loss, logits[0]

    def batch_loss(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """Mean query loss over a meta-batch, and each task's query logits."""
        if self._can_vmap(episodes):
            return self._vmapped_head_loss(tokens, episodes)
        if self._can_batch(episodes):
            return self._batched_tasks_loss(tokens, episodes)
        losses, logits = zip(*self._task_losses(tokens, episodes, self._shared_bottom(tokens, episodes)),
                             strict=True)
        return torch.stack(losses).mean(), list(logits)

    def backward_batch(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """Meta-gradient of a meta-batch, task by task, so only one task's inner-loop graph is alive at a time.

        The un-adapted bottom layers run once for every row of every task; their output is cut from the graph,
        each task's backward leaves its share of gradient there, and one backward takes the sum through the
        bottom (a checkpoint at the split: the bottom's backward runs once, not once per task).
        """
        batched = self._can_vmap(episodes) or self._can_batch(episodes)
        shared = None if batched else self._shared_bottom(tokens, episodes)
        if shared is None:
            return super().backward_batch(tokens, episodes)
        hidden, mask = shared
        cut = hidden.detach().requires_grad_()
        losses, all_logits = [], []
        for loss, logits in self._task_losses(tokens, episodes, (cut, mask)):
            (loss / len(episodes)).backward()
            losses.append(loss.detach())
            all_logits.append(logits.detach())
        if hidden.requires_grad:  # not with LoRA: peft freezes the base weights, only adapters are meta-learned
            hidden.backward(cut.grad)
        return torch.stack(losses).mean(), all_logits

    def _can_vmap(self, episodes: list[Episode]) -> bool:
        """Only the head adapts and every task has the same shape: the inner loops can run as one vmap."""
        return self.config.vmap_tasks and not self.adapted and _same_shaped(episodes)

    def _can_batch(self, episodes: list[Episode]) -> bool:
        """Top-layer inner loops of same-shaped episodes on packed BERT layers: all tasks can adapt at once."""
        mode = self.config.batch_tasks
        if mode == "never" or not (self.packed and self.adapted) or not _same_shaped(episodes):
            return False
        return mode == "always" or self.encoder.device.type == "cuda"

    def _batched_tasks_loss(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """A meta-batch's inner loops all at once: the bottom runs once on every row, then each inner step runs
        the top layers once for the whole stack of tasks, every task with its own fast weights (TaskGrid)."""
        n_tasks, n_classes = len(episodes), len(episodes[0].classes)
        support_rows = np.concatenate([e.support for e in episodes])
        query_rows = np.concatenate([e.query for e in episodes])
        hidden, _ = self.bottom(tokens.batch(np.concatenate([support_rows, query_rows])))
        support_tokens = tokens.real_tokens(support_rows)

        def stacked_features(rows: np.ndarray, batch: TokenBatch, packed_hidden: torch.Tensor):
            packed = self._packed_tokens(batch.attention_mask, packed_hidden)
            grid = TaskGrid([tokens.real_tokens(task_rows) for task_rows in np.split(rows, n_tasks)],
                            packed_hidden.device)
            on_grid = grid.to_grid(packed_hidden)
            return lambda fast: self.top(fast, on_grid, None, batch.attention_mask, packed, grid)

        support, query = tokens.batch(support_rows), tokens.batch(query_rows)
        support_targets, query_targets = _stacked_labels(episodes, hidden.device)
        fast = self.inner_loop(support, support_targets, n_classes,
                               create_graph=not self.config.first_order, track_meta=True, tasks=n_tasks,
                               features=stacked_features(support_rows, support, hidden[:support_tokens]))
        logits = self.logits(fast, query, stacked_features(query_rows, query, hidden[support_tokens:]))
        losses = F.cross_entropy(logits.flatten(0, 1), query_targets.flatten(), reduction="none").view(n_tasks, -1)
        return losses.mean(dim=1).mean(), list(logits.unbind(0))

    def _vmapped_head_loss(self, tokens: TokenizedTexts, episodes: list[Episode]):
        """ANIL on a meta-batch: one encoder pass over every task's rows, then each task's inner loop on its
        head, vmapped over tasks with torch.func (second order unless first_order)."""
        from torch.func import grad, vmap

        n_classes, n_support = len(episodes[0].classes), len(episodes[0].support)
        rows = np.concatenate([np.concatenate([e.support, e.query]) for e in episodes])
        h = self.features({}, tokens.batch(rows)).reshape(len(episodes), -1, self.encoder.dim)
        device = h.device
        support_y, query_y = _stacked_labels(episodes, device)
        lr_w, lr_b = self.inner_lr(HEAD[0]), self.inner_lr(HEAD[1])

        def task(h_task, y_support, y_query):
            h_support, h_query = h_task[:n_support], h_task[n_support:]
            weight, bias = self.initial_head(h_support, y_support, n_classes)

            def support_loss(w, b):
                return F.cross_entropy(h_support @ w.T + b, y_support)

            for _ in range(self.config.inner_steps):
                g_w, g_b = grad(support_loss, argnums=(0, 1))(weight, bias)
                if self.config.first_order:
                    g_w, g_b = g_w.detach(), g_b.detach()
                weight, bias = weight - lr_w * g_w, bias - lr_b * g_b
            logits = h_query @ weight.T + bias
            return F.cross_entropy(logits, y_query), logits

        losses, logits = vmap(task)(h, support_y, query_y)
        return losses.mean(), list(logits.unbind(0))

    def _shared_bottom(self, tokens: TokenizedTexts, episodes: list[Episode]):
        if self.n_bottom is None:
            return None
        rows = np.concatenate([np.concatenate([e.support, e.query]) for e in episodes])
        return self.bottom(tokens.batch(rows))

    def _task_losses(self, tokens: TokenizedTexts, episodes: list[Episode], shared):
        """Each task's query loss and logits; `shared` holds the bottom activations of all tasks' rows, in order."""
        start = 0
        for episode in episodes:
            support, query = tokens.batch(episode.support), tokens.batch(episode.query)
            support_shared = query_shared = None
            if shared is not None:
                hidden, mask = shared
                if self.packed:  # packed rows: a task's support and query are consecutive runs of tokens
                    sizes = [tokens.real_tokens(episode.support), tokens.real_tokens(episode.query)]
                else:
                    sizes = [len(episode.support), len(episode.query)]
                ends = (start, start + sizes[0], start + sum(sizes))
                support_shared, query_shared = (
                    (hidden[a:b], None) if self.packed else
                    _trim((hidden[a:b], None if mask is None else mask[a:b]), batch.input_ids.shape[1])
                    for a, b, batch in ((ends[0], ends[1], support), (ends[1], ends[2], query)))
                start = ends[2]
            fast = self.inner_loop(support, torch.as_tensor(episode.support_labels), len(episode.classes),
                                   create_graph=not self.config.first_order, track_meta=True,
                                   features=self.feature_fn(support, support_shared))
            logits = self.logits(fast, query, self.feature_fn(query, query_shared))
            yield F.cross_entropy(logits, torch.as_tensor(episode.query_labels, device=logits.device)), logits

    def adapt(self, support, labels) -> Classifier:
        classes, targets = support_targets(list(labels))
        tokens = self.tokens(support)
        was_training = self.training
        self.eval()
        with torch.enable_grad():
            fast = self.inner_loop(tokens.batch(), targets, len(classes), create_graph=False, track_meta=False)
        self.train(was_training)
        fast = {n: t.detach() for n, t in fast.items()}

        def logits(queries: TokenizedTexts) -> torch.Tensor:
            return logits_in_chunks(self.encoder, queries, lambda batch: self.logits(fast, batch))

        return Classifier(classes, self.encoder, logits)


class FOMAML(GradientMetaLearner):
    name = "fomaml"


class ANIL(GradientMetaLearner):
    name = "anil"


class MetaSGD(GradientMetaLearner):
    name = "metasgd"


class Leopard(GradientMetaLearner):
    """LEOPARD-style (Bansal et al., 2020): each task's head is generated from its support set, then refined
    by inner steps with learned learning rates.

    A small network maps every support feature to a (weight, bias) pair; a class's head row is the mean over
    its examples. It is residual with a zero-initialised last layer, so training starts from Proto-MAML.
    """

    name = "leopard"

    def __init__(self, encoder: TextEncoder, config: GradientConfig | None = None) -> None:
        super().__init__(encoder, config)
        dim = encoder.dim
        self.generator = nn.Sequential(nn.Linear(dim, dim), nn.Tanh(), nn.Linear(dim, dim + 1))
        nn.init.zeros_(self.generator[2].weight)
        nn.init.zeros_(self.generator[2].bias)

    def initial_head(self, h: torch.Tensor, targets: torch.Tensor, n_classes: int):
        weight, bias = super().initial_head(h, targets, n_classes)  # residual on the Proto-MAML head
        generated = prototypes(self.generator(h), targets, n_classes)
        return weight + generated[..., :-1], bias + generated[..., -1]


class Reptile(GradientMetaLearner):
    """Inner SGD on the whole episode; the meta-gradient is (start - adapted), applied by the outer optimizer."""

    name = "reptile"
    # Reptile's meta-gradient is per episode (see episode_loss): no shared bottom, no backward through steps.
    batch_loss = Learner.batch_loss
    backward_batch = Learner.backward_batch

    def episode_loss(self, tokens: TokenizedTexts, episode: Episode):
        rows = np.concatenate([episode.support, episode.query])
        labels = torch.as_tensor(np.concatenate([episode.support_labels, episode.query_labels]))
        fast = self.inner_loop(tokens.batch(rows), labels, len(episode.classes), create_graph=False,
                               track_meta=False)
        start = dict(self.encoder.named_parameters())
        # d/dp of sum(p * (p - adapted)) with the bracket held constant is (p - adapted): Reptile's direction.
        surrogate = sum((start[n] * (start[n] - fast[n]).detach()).sum() for n in self.adapted)
        with torch.no_grad():
            logits = self.logits(fast, tokens.batch(episode.query))
        return surrogate if torch.is_tensor(surrogate) else self.log_scale * 0.0, logits
