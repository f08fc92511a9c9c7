"""CUDA behaviour (bf16 autocast): skipped where torch sees no GPU, as in CI; run on a GPU machine with
`pytest tests/model/test_cuda.py`."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metanlp.config import EpisodeConfig, SplitConfig, TrainConfig, learner_config
from metanlp.data.episodes import EpisodeSampler
from metanlp.data.splits import split_classes
from metanlp.learners import LEARNERS, build_learner, load_learner, save_learner
from metanlp.train import meta_train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

META_TRAINABLE = sorted(name for name, cls in LEARNERS.items() if cls.meta_trainable)


@pytest.fixture(scope="module")
def split(corpus):
    return split_classes(corpus, SplitConfig(by="random", sizes=(30, 6, 6), seed=0))


@pytest.mark.parametrize("name", META_TRAINABLE)
def test_every_learner_meta_trains_and_adapts_on_cuda(name, corpus, split, tiny_encoder_config, tmp_path):
    torch.manual_seed(0)
    learner = build_learner(name, tiny_encoder_config)
    config = TrainConfig(device="cuda", episodes=4, tasks_per_step=2, val_every=2, val_episodes=3, warmup_episodes=0,
                         lr=1e-3, episode=EpisodeConfig(ways=3, shots=2, queries=2))
    result = meta_train(learner, corpus.with_classes(split.train), corpus.with_classes(split.val), config,
                        out_dir=tmp_path / "model", show_progress=False)
    assert all(p.device.type == "cuda" for p in learner.parameters())
    assert np.isfinite([h["train_loss"] for h in result.history[1:]]).all()
    # A saved CUDA model loads on the CPU and predicts the same labels as on the GPU (bf16 there, fp32 here).
    test = corpus.with_classes(split.test[:3])
    support = {int(i) for rows in test.indices_by_class().values() for i in rows[:3]}
    texts, labels = [test.texts[i] for i in sorted(support)], [test.labels[i] for i in sorted(support)]
    queries = [t for i, t in enumerate(test.texts) if i not in support][:12]
    on_gpu = learner.adapt(texts, labels).predict(queries)
    on_cpu = load_learner(tmp_path / "model").adapt(texts, labels).predict(queries)
    assert np.mean(np.array(on_gpu.labels) == np.array(on_cpu.labels)) >= 0.75


@pytest.mark.parametrize("algorithm", ["maml", "fomaml", "metasgd"])
def test_cuda_meta_gradient_matches_cpu_within_bf16(algorithm, corpus, tiny_encoder_config, tmp_path):
    """Same weights, same episodes: the CUDA (bf16 autocast) meta-gradient points where the fp32 CPU one does."""
    torch.manual_seed(0)
    learner = build_learner(learner_config(algorithm, top_layers=1), tiny_encoder_config)
    save_learner(learner, tmp_path / "start")
    episodes = EpisodeSampler(corpus, 5, 3, 3, seed=0).take(2)

    def meta_gradient(device: str) -> torch.Tensor:
        model = load_learner(tmp_path / "start").to(device).eval()
        tokens = model.encoder.tokenize(corpus.texts)
        model.zero_grad(set_to_none=True)
        model.backward_batch(tokens, episodes)
        return torch.cat([p.grad.flatten().float().cpu() for p in model.parameters() if p.grad is not None])

    cpu, cuda = meta_gradient("cpu"), meta_gradient("cuda")
    assert cpu.shape == cuda.shape
    assert torch.nn.functional.cosine_similarity(cpu, cuda, dim=0) > 0.98
    assert ((cuda - cpu).norm() / cpu.norm()) < 0.2
