"""How a meta-batch of inner loops is executed, apart from what an inner loop is (`inner_loop`):

- `TaskLoop`: task after task; the un-adapted bottom layers run once for every row of every task, and the
  meta-gradient is taken task by task, so only one task's inner-loop graph is alive at a time (CPU default);
- `VmappedHeads`: head-only inner loops (ANIL) of same-shaped tasks as one `torch.func.vmap` over tasks;
- `StackedTasks`: top-layer inner loops of same-shaped tasks all at once on task-stacked fast weights
  (`packed.TaskGrid`, batched matrix products): fewer, larger kernels (CUDA default).

The execution is chosen once per learner (`choose_execution`); a meta-batch whose tasks differ in shape
falls back to the task loop. Every execution gives the same loss, logits and meta-gradient (tests).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from metanlp.config import GradientConfig
from metanlp.data.episodes import Episode
from metanlp.encoder import TokenBatch, TokenizedTexts
from metanlp.learners.encoder_split import trim
from metanlp.learners.inner_loop import HEAD
from metanlp.learners.packed import TaskGrid


def same_shaped(episodes: list[Episode]) -> bool:
    """Several episodes with equal ways, support and query sizes: their inner loops can run as one batch."""
    return len(episodes) > 1 and len({(len(e.classes), len(e.support), len(e.query)) for e in episodes}) == 1


def stacked_labels(episodes: list[Episode], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Support and query labels of same-shaped episodes as [tasks, rows] tensors."""
    support = torch.stack([torch.as_tensor(e.support_labels) for e in episodes])
    query = torch.stack([torch.as_tensor(e.query_labels) for e in episodes])
    return support.to(device), query.to(device)


class TaskLoop:
    """Each task's inner loop in turn, sharing one pass of the bottom layers."""

    def applies(self, learner, episodes: list[Episode]) -> bool:
        return True

    def loss(self, learner, tokens: TokenizedTexts, episodes: list[Episode]):
        """Mean query loss over the meta-batch, and each task's query logits."""
        shared = learner.split.shared_bottom(tokens, episodes)
        losses, logits = zip(*self.task_losses(learner, tokens, episodes, shared), strict=True)
        return torch.stack(losses).mean(), list(logits)

    def backward(self, learner, tokens: TokenizedTexts, episodes: list[Episode]):
        """Meta-gradient of a meta-batch into `.grad`, task by task.

        The bottom's output is cut from the graph, each task's backward leaves its share of gradient there, and
        one backward takes the sum through the bottom (a checkpoint at the split: the bottom's backward runs
        once, not once per task).
        """
        shared = learner.split.shared_bottom(tokens, episodes)
        if shared is None:
            loss, logits = self.loss(learner, tokens, episodes)
            loss.backward()
            return loss.detach(), [lg.detach() for lg in logits]
        hidden, mask = shared
        cut = hidden.detach().requires_grad_()
        losses, all_logits = [], []
        for loss, logits in self.task_losses(learner, tokens, episodes, (cut, mask)):
            (loss / len(episodes)).backward()
            losses.append(loss.detach())
            all_logits.append(logits.detach())
        if hidden.requires_grad:  # not with LoRA: peft freezes the base weights, only adapters are meta-learned
            hidden.backward(cut.grad)
        return torch.stack(losses).mean(), all_logits

    def task_losses(self, learner, tokens: TokenizedTexts, episodes: list[Episode], shared):
        """Each task's query loss and logits; `shared` holds the bottom activations of all tasks' rows, in order."""
        split = learner.split
        start = 0
        for episode in episodes:
            support, query = tokens.batch(episode.support), tokens.batch(episode.query)
            support_shared = query_shared = None
            if shared is not None:
                hidden, mask = shared
                if split.packed:  # packed rows: a task's support and query are consecutive runs of tokens
                    sizes = [tokens.real_tokens(episode.support), tokens.real_tokens(episode.query)]
                else:
                    sizes = [len(episode.support), len(episode.query)]
                ends = (start, start + sizes[0], start + sum(sizes))
                support_shared, query_shared = (
                    (hidden[a:b], None) if split.packed else
                    trim((hidden[a:b], None if mask is None else mask[a:b]), batch.input_ids.shape[1])
                    for a, b, batch in ((ends[0], ends[1], support), (ends[1], ends[2], query)))
                start = ends[2]
            fast = learner.inner_loop(support, torch.as_tensor(episode.support_labels), len(episode.classes),
                                      create_graph=learner.config.second_order, track_meta=True,
                                      features=split.feature_fn(support, support_shared))
            logits = learner.logits(fast, query, split.feature_fn(query, query_shared))
            yield F.cross_entropy(logits, torch.as_tensor(episode.query_labels, device=logits.device)), logits


class _Batched(TaskLoop):
    """An execution that runs same-shaped meta-batches whole, and the task loop otherwise."""

    def loss(self, learner, tokens, episodes):
        if not self.applies(learner, episodes):
            return super().loss(learner, tokens, episodes)
        return self.batched_loss(learner, tokens, episodes)

    def backward(self, learner, tokens, episodes):
        if not self.applies(learner, episodes):
            return super().backward(learner, tokens, episodes)
        loss, logits = self.batched_loss(learner, tokens, episodes)
        loss.backward()
        return loss.detach(), [lg.detach() for lg in logits]

    def batched_loss(self, learner, tokens, episodes):
        raise NotImplementedError


class VmappedHeads(_Batched):
    """ANIL on a meta-batch: one encoder pass over every task's rows, then each task's inner loop on its head,
    vmapped over tasks with torch.func (second order unless first_order)."""

    def applies(self, learner, episodes):
        return not learner.rule.adapted and same_shaped(episodes)

    def batched_loss(self, learner, tokens, episodes):
        from torch.func import grad, vmap

        n_classes, n_support = len(episodes[0].classes), len(episodes[0].support)
        rows = np.concatenate([np.concatenate([e.support, e.query]) for e in episodes])
        h = learner.split.features({}, tokens.batch(rows)).reshape(len(episodes), -1, learner.encoder.dim)
        support_y, query_y = stacked_labels(episodes, h.device)
        lr_w, lr_b = learner.rule.rate(HEAD[0]), learner.rule.rate(HEAD[1])
        first_order, steps = learner.config.first_order, learner.config.inner_steps

        def task(h_task, y_support, y_query):
            h_support, h_query = h_task[:n_support], h_task[n_support:]
            weight, bias = learner.initial_head(h_support, y_support, n_classes)

            def support_loss(w, b):
                return F.cross_entropy(h_support @ w.T + b, y_support)

            for _ in range(steps):
                g_w, g_b = grad(support_loss, argnums=(0, 1))(weight, bias)
                if first_order:
                    g_w, g_b = g_w.detach(), g_b.detach()
                weight, bias = weight - lr_w * g_w, bias - lr_b * g_b
            logits = h_query @ weight.T + bias
            return F.cross_entropy(logits, y_query), logits

        losses, logits = vmap(task)(h, support_y, query_y)
        return losses.mean(), list(logits.unbind(0))


class StackedTasks(_Batched):
    """A meta-batch's inner loops all at once: the bottom runs once on every row, then each inner step runs the
    top layers once for the whole stack of tasks, every task with its own fast weights (TaskGrid).

    mode "always", or "auto": only on CUDA, where kernel launches rather than arithmetic bound the time."""

    def __init__(self, mode: str = "auto") -> None:
        self.mode = mode

    def applies(self, learner, episodes):
        if not (learner.split.packed and learner.rule.adapted) or not same_shaped(episodes):
            return False
        return self.mode == "always" or learner.encoder.device.type == "cuda"

    def batched_loss(self, learner, tokens, episodes):
        split = learner.split
        n_tasks, n_classes = len(episodes), len(episodes[0].classes)
        support_rows = np.concatenate([e.support for e in episodes])
        query_rows = np.concatenate([e.query for e in episodes])
        hidden, _ = split.bottom(tokens.batch(np.concatenate([support_rows, query_rows])))
        support_tokens = tokens.real_tokens(support_rows)

        def stacked_features(rows: np.ndarray, batch: TokenBatch, packed_hidden: torch.Tensor):
            packed = split.packed_tokens(batch.attention_mask, packed_hidden)
            grid = TaskGrid([tokens.real_tokens(task_rows) for task_rows in np.split(rows, n_tasks)],
                            packed_hidden.device)
            on_grid = grid.to_grid(packed_hidden)
            return lambda fast: split.top(fast, on_grid, None, batch.attention_mask, packed, grid)

        support, query = tokens.batch(support_rows), tokens.batch(query_rows)
        support_targets, query_targets = stacked_labels(episodes, hidden.device)
        fast = learner.inner_loop(support, support_targets, n_classes, create_graph=learner.config.second_order,
                                  track_meta=True, tasks=n_tasks,
                                  features=stacked_features(support_rows, support, hidden[:support_tokens]))
        logits = learner.logits(fast, query, stacked_features(query_rows, query, hidden[support_tokens:]))
        losses = F.cross_entropy(logits.flatten(0, 1), query_targets.flatten(), reduction="none").view(n_tasks, -1)
        return losses.mean(dim=1).mean(), list(logits.unbind(0))


def choose_execution(config: GradientConfig, adapted: list[str], packed: bool) -> TaskLoop:
    """The execution a learner keeps: vmapped heads for head-only loops, task-stacked top layers on packed
    layers unless `batch_tasks` is "never", else the task loop."""
    if not adapted:
        return VmappedHeads() if config.vmap_tasks else TaskLoop()
    if packed and config.batch_tasks != "never":
        return StackedTasks(config.batch_tasks)
    return TaskLoop()
