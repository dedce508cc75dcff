"""The trained modules of the prompt-space methods, each giving one row's virtual tokens (``table``).

Parameter names follow peft's (``embedding``, ``mlp_head``, ``lstm_head``, ``transform``) and so do
construction order and initialisation, so a seed gives the same numbers. A frozen adapter (loaded,
or ``inference_mode``) keeps only the table a file holds: the encoder's output, as peft saves it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..errors import ConfigError
from ..hf import from_pretrained
from .prefix_init import text_prefix
from .prompt_config import PrefixTuningConfig, PromptEncoderConfig, PromptLearningConfig, PromptTuningConfig


class PromptTable(nn.Module):
    """Virtual tokens as a trained table (prompt tuning; any frozen prompt adapter)."""

    def __init__(self, rows: int, width: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(rows, width)

    def table(self) -> Tensor:
        return self.embedding.weight


class PromptEncoder(nn.Module):
    """P-tuning's encoder: the table through an MLP, or a bidirectional LSTM and an MLP."""

    def __init__(self, config: PromptEncoderConfig, rows: int) -> None:
        super().__init__()
        width = config.token_dim
        hidden = config.encoder_hidden_size
        assert width is not None and hidden is not None
        self.embedding = nn.Embedding(rows, width)
        self.lstm_head: nn.LSTM | None = None
        if config.encoder_reparameterization_type == "LSTM":
            self.lstm_head = nn.LSTM(width, hidden, num_layers=config.encoder_num_layers,
                                     dropout=config.encoder_dropout, bidirectional=True, batch_first=True)
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, width))
        else:
            self.mlp_head = nn.Sequential(nn.Linear(width, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                          nn.Linear(hidden, width))

    def table(self) -> Tensor:
        rows = self.embedding.weight[None]
        if self.lstm_head is not None:
            rows = self.lstm_head(rows)[0]
        return self.mlp_head(rows)[0]


class PrefixEncoder(nn.Module):
    """Prefix tuning's table of key/value prefixes, ``num_layers * 2 * token_dim`` wide per virtual
    token, computed by an MLP from a narrower table with ``prefix_projection``."""

    def __init__(self, config: PrefixTuningConfig) -> None:
        super().__init__()
        width, hidden, layers = config.token_dim, config.encoder_hidden_size, config.num_layers
        assert width is not None and hidden is not None and layers is not None and config.num_virtual_tokens
        out = layers * 2 * width
        self.transform: nn.Sequential | None = None
        if config.prefix_projection:
            self.embedding = nn.Embedding(config.num_virtual_tokens, width)
            self.transform = nn.Sequential(nn.Linear(width, hidden), nn.Tanh(), nn.Linear(hidden, out))
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out)
        if config.init_weights == "zero":
            last = self.transform[-1] if self.transform is not None else self.embedding
            with torch.no_grad():
                for param in last.parameters():
                    param.zero_()

    def table(self) -> Tensor:
        rows = self.embedding.weight
        return self.transform(rows) if self.transform is not None else rows


def table_shape(config: PromptLearningConfig) -> tuple[int, int]:
    """(rows, width) of the table a file holds for ``config``."""
    assert config.token_dim is not None and config.num_virtual_tokens is not None
    if isinstance(config, PrefixTuningConfig):
        assert config.num_layers is not None
        return config.num_virtual_tokens, config.num_layers * 2 * config.token_dim
    return config.total_virtual_tokens, config.token_dim


def build_encoder(config: PromptLearningConfig, word_embeddings: Tensor, model: nn.Module | None = None) -> nn.Module:
    """The module a new adapter trains, or for a frozen one the table its file fills (``word_embeddings``:
    the model's token embedding table, for initialisation from the vocabulary; ``model``: the base, run on
    ``prefix_init_text``)."""
    rows, width = table_shape(config)
    if isinstance(config, PrefixTuningConfig) and config.prefix_init_text is not None:
        assert model is not None
        table = PromptTable(rows, width) if config.inference_mode else PrefixEncoder(config)
        words = text_ids(config, config.prefix_init_text, "prefix_init_text", config.num_virtual_tokens or 0)
        with torch.no_grad():
            table.embedding.weight.copy_(text_prefix(model, config, _known(config, words, word_embeddings)))
        return table
    if config.inference_mode:
        return PromptTable(rows, width)
    if isinstance(config, PromptEncoderConfig):
        return PromptEncoder(config, rows)
    if isinstance(config, PrefixTuningConfig):
        return PrefixEncoder(config)
    assert isinstance(config, PromptTuningConfig)
    table = PromptTable(rows, width)
    if config.prompt_tuning_init == "SAMPLE_VOCAB":
        ids = torch.randint(0, int(word_embeddings.shape[0]), (rows,), dtype=torch.long)
        _copy_rows(table, word_embeddings, ids)
    elif config.prompt_tuning_init == "TEXT":
        text = str(config.prompt_tuning_init_text)
        _copy_rows(table, word_embeddings, torch.tensor(text_ids(config, text, "prompt_tuning_init_text", rows)))
    return table


def _copy_rows(table: PromptTable, weight: Tensor, ids: Tensor) -> None:
    with torch.no_grad():
        table.embedding.weight.copy_(weight[ids.to(weight.device)].detach().float())


def text_ids(config: PromptTuningConfig | PrefixTuningConfig, text: str, field: str, rows: int) -> list[int]:
    """``text``'s token ids (special tokens included) with the config's tokenizer, repeated or cut to ``rows``,
    as peft does for prompt tuning's TEXT (``field``: the config field that holds the text, for errors)."""
    kwargs = {k: v for k, v in (config.tokenizer_kwargs or {}).items() if k != "trust_remote_code"}
    try:
        tokenizer = from_pretrained("AutoTokenizer", str(config.tokenizer_name_or_path), **kwargs)
    except (OSError, ValueError) as error:
        raise ConfigError(type(config).__name__, "tokenizer_name_or_path", config.tokenizer_name_or_path,
                          f"the tokenizer could not be loaded ({error})", "pass a local tokenizer folder") from None
    ids = list(tokenizer(text)["input_ids"])
    if not ids:
        raise ConfigError(type(config).__name__, field, text, "it tokenizes to nothing", "pass a non-empty text")
    return (ids * math.ceil(rows / len(ids)))[:rows]


def _known(config: PrefixTuningConfig, ids: list[int], word_embeddings: Tensor) -> list[int]:
    """``ids``, refused when one is past the model's vocabulary (a tokenizer of another model)."""
    vocab = int(word_embeddings.shape[0])
    if max(ids) >= vocab:
        raise ConfigError(type(config).__name__, "tokenizer_name_or_path", config.tokenizer_name_or_path,
                          f"it gives token id {max(ids)}, past the model's {vocab} embeddings",
                          "pass the tokenizer of this model")
    return ids
