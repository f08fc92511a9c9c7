"""The inner-step rule of the gradient meta-learners: which tensors adapt, how far each step moves them
(fixed rates, Meta-SGD's learned ones, or a learned optimizer's updates), and whether the meta-gradient goes
through the steps (order).

`adapt_fast_weights` is the inner loop itself. It never copies modules: it keeps a dict of "fast" tensors
that the caller's feature function runs the encoder with. How a meta-batch of such loops is executed (task
by task, vmapped, task-stacked) is `meta_batch`'s business; which encoder layers run where is `encoder_split`'s.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from metanlp.config import GradientConfig
from metanlp.encoder import TextEncoder

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


def _key(name: str) -> str:
    return name.replace(".", "__")  # ParameterDict keys may not contain dots


def learned_rates(config: GradientConfig, adapted: list[str]) -> nn.ParameterDict:
    """Meta-SGD's log learning rates, one per adapted tensor and head tensor (empty without learned rates);
    the learner registers them, so they are meta-trained and saved with its weights."""
    rates = nn.ParameterDict()
    if config.learn_inner_lr:
        for name in adapted:
            rates[_key(name)] = nn.Parameter(torch.tensor(math.log(config.inner_lr)))
        for name in HEAD:
            rates[_key(name)] = nn.Parameter(torch.tensor(math.log(config.head_inner_lr)))
    return rates


class InnerRule:
    """Which encoder tensors adapt, the step size of each (head tensors included), and the step: SGD."""

    def __init__(self, config: GradientConfig, adapted: list[str], log_rates: nn.ParameterDict) -> None:
        self.config, self.adapted, self.log_rates = config, adapted, log_rates

    def rate(self, name: str) -> torch.Tensor | float:
        if self.config.learn_inner_lr:
            return self.log_rates[_key(name)].exp()
        return self.config.head_inner_lr if name in HEAD else self.config.inner_lr

    def step(self, name: str, value: torch.Tensor, grad: torch.Tensor, loss: torch.Tensor,
             memory: dict) -> torch.Tensor:
        """`value` after one inner step. `memory`: what a recurrent rule keeps between the steps of one loop."""
        return value - self.rate(name) * grad


def preprocess(x: torch.Tensor, p: float = 10.0) -> torch.Tensor:
    """The input scaling of learned optimizers (Andrychowicz et al., 2016; Ravi & Larochelle, 2017): each value
    becomes (log|x| / p, sign x) when |x| >= e^-p, else (-1, e^p x), so gradients of any magnitude reach the
    network on a similar scale. [..., 2]."""
    small = math.exp(-p)
    big = x.abs() >= small
    magnitude = torch.where(big, x.abs().clamp_min(small).log() / p, torch.full_like(x, -1.0))
    sign = torch.where(big, torch.sign(x), x / small)
    return torch.stack([magnitude, sign], dim=-1)


class CoordinateLSTM(nn.Module):
    """The learned optimizer's network (Ravi & Larochelle, 2017): one small LSTM shared by every coordinate of
    every adapted tensor. Per coordinate and step it reads the preprocessed gradient and loss and emits two
    numbers: how much to scale the step (a learned, per-coordinate learning rate) and how much to shrink the
    value (their forget gate). Its output layer starts at zero: the first meta-training step is plain SGD."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.cell = nn.LSTMCell(4, hidden_size)
        self.out = nn.Linear(hidden_size, 2)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, grad: torch.Tensor, loss: torch.Tensor, state):
        inputs = torch.cat([preprocess(grad), preprocess(loss).expand(*grad.shape, 2)], dim=-1)
        hidden, cell = self.cell(inputs.reshape(-1, 4).to(self.out.weight.dtype), state)
        gates = self.out(hidden).view(*grad.shape, 2)
        return gates[..., 0], gates[..., 1], (hidden, cell)


class LearnedRule(InnerRule):
    """Inner steps taken by a `CoordinateLSTM`: value - rate * 2 sigmoid(a) * grad - decay * tanh(b) * value,
    where (a, b) is the network's output for that coordinate (0 at the start: SGD with the configured rates)."""

    DECAY = 0.1  # the most a step may shrink a value toward zero

    def __init__(self, config: GradientConfig, adapted: list[str], log_rates: nn.ParameterDict,
                 network: CoordinateLSTM) -> None:
        super().__init__(config, adapted, log_rates)
        self.network = network

    def step(self, name, value, grad, loss, memory):
        scale, shrink, memory[name] = self.network(grad, loss, memory.get(name))
        return value - self.rate(name) * 2 * torch.sigmoid(scale) * grad - self.DECAY * torch.tanh(shrink) * value


def support_loss(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The head's cross-entropy; on a stack of tasks the sum of each task's mean, so that every task's fast
    tensors get the gradient they would get alone."""
    logits = h @ weight.mT + bias.unsqueeze(-2)
    return F.cross_entropy(logits.flatten(0, -2), targets.flatten(), reduction="sum") / targets.shape[-1]


HeadInit = Callable[[torch.Tensor, torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]
Features = Callable[[dict[str, torch.Tensor]], torch.Tensor]


def adapt_fast_weights(rule: InnerRule, start: dict[str, torch.Tensor], features: Features, targets: torch.Tensor,
                       n_classes: int, head_init: HeadInit, *, steps: int, create_graph: bool, track_meta: bool,
                       tasks: int | None = None) -> dict[str, torch.Tensor]:
    """Adapt on the support set; returns the fast tensors (adapted encoder tensors and the head).

    start: the adapted encoder tensors' meta-parameters. features: fast tensors -> support features.
    track_meta: keep the graph back to the meta-parameters (meta-training); otherwise the start is detached.
    create_graph: differentiate through the inner gradients (second order).
    tasks: a stack of that many tasks adapts at once ([tasks, support] targets, features on a TaskGrid);
    every fast tensor starts as the meta-parameter repeated per task, so each task gets its own gradient.
    """
    fast = {n: p if track_meta else p.detach().requires_grad_() for n, p in start.items()}
    if tasks is not None:
        fast = {n: p.expand(tasks, *p.shape) for n, p in fast.items()}
    h = features(fast)
    targets = targets.to(h.device)
    weight, bias = head_init(h, targets, n_classes)
    if not track_meta:
        weight, bias, h = weight.detach().requires_grad_(), bias.detach().requires_grad_(), h.detach()
    fast.update({HEAD[0]: weight, HEAD[1]: bias})
    first_order_meta = track_meta and not create_graph
    memory: dict = {}  # a recurrent rule's state, per tensor, across the steps
    for step in range(steps):
        probe = fast
        if first_order_meta and step > 0:
            # First order needs only the value of later inner gradients: take them on graph-free copies,
            # so no step after the first keeps its activations alive until the outer backward.
            probe = {n: t.detach().requires_grad_() for n, t in fast.items()}
            h = h.detach()
        if step > 0 and rule.adapted:
            h = features({n: probe[n] for n in rule.adapted})
        loss = support_loss(h, probe[HEAD[0]], probe[HEAD[1]], targets)
        names = list(probe)
        # retain_graph: the outer loss still needs the graph from the meta-parameters to the start.
        grads = torch.autograd.grad(loss, [probe[n] for n in names], create_graph=create_graph,
                                    retain_graph=track_meta and probe is fast, allow_unused=True)
        seen = loss if create_graph else loss.detach()  # first order: the step's inputs are constants
        fast = {n: fast[n] if g is None else rule.step(n, fast[n], g, seen, memory)
                for n, g in zip(names, grads, strict=True)}
        if not track_meta:  # adaptation at test time: each step on leaf tensors, no graph kept
            fast = {n: t.detach().requires_grad_() for n, t in fast.items()}
            memory = {n: tuple(t.detach() for t in kept) for n, kept in memory.items()}
    return fast
