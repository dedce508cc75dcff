"""Causal language modelling: learn to write the completion (or the assistant turns), nothing else.

A row is either ``prompt`` + ``completion`` or a chat ``messages`` list of ``{"role", "content"}``.
Only the completion / assistant tokens carry labels; the prompt, the other turns and padding
are -100, so the loss is the model's cross-entropy on what it should write. The completion is
followed by the end-of-sequence token so the model learns to stop. Prompt and completion are
tokenized on their own and joined as they are, so a prompt should end with its separator.

Chats use the tokenizer's chat template when it has one. Without one they are written as
plain text: each turn ``"{role}: {content}\\n"``, except that an assistant turn ends with the
end-of-sequence token instead of the newline. Rows longer than ``max_length`` keep their last
``max_length`` tokens: the start of the prompt goes first, the labelled tokens are kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ... import hf
from ...errors import DataError
from ..data import Row, Rows
from .base import Batch, Features, Task, batches
from .common import IGNORE, aligned, by_length, device_of, ensure_pad_token, generate, loss_metrics, mask, pad, text, \
    to_device, token_loss_rows

Piece = tuple[list[int], bool]
"""Token ids and whether they are labelled (the model learns to write them)."""


def _has(row: Row, column: str) -> bool:
    """A present, non-null cell (Parquet and CSV files with both row styles hold nulls for the other)."""
    return row.get(column) is not None


class CausalLM(Task):
    """Prompt -> completion, or a chat -> its assistant turns, with a decoder-only LM."""

    name = "causal-lm"
    task_type = "CAUSAL_LM"
    metric = "neg_loss"
    columns = {"prompt": "prompt", "completion": "completion"}
    optional_columns = {"messages": "messages"}

    def __init__(self, tokenizer: Any, max_length: int = 128, column_map: Mapping[str, str] | None = None,
                 state: Mapping[str, Any] | None = None, max_new_tokens: int = 64) -> None:
        super().__init__(tokenizer, max_length, column_map, state)
        self.max_new_tokens = max_new_tokens
        ensure_pad_token(tokenizer, self.name)
        if tokenizer.eos_token_id is None:
            raise DataError(f"task {self.name}: the tokenizer has no end-of-sequence token to end completions with")

    def check(self, rows: Rows) -> None:
        """Every row needs prompt + completion, or messages."""
        prompt, completion, messages = self.column("prompt"), self.column("completion"), self.column("messages")
        for index, row in enumerate(rows.rows):
            if not _has(row, messages) and not (_has(row, prompt) and _has(row, completion)):
                raise DataError(f"{rows.subject(index)} has neither {prompt!r} + {completion!r} nor "
                                f"{messages!r}; columns found: {sorted(row)}. Rename the columns, or map them "
                                "with --columns prompt=... completion=... (or messages=...)")

    def usable(self, rows: Rows, skip_bad_rows: bool = False) -> Rows:
        """A null prompt is normal in a chat row, so :meth:`check` alone says which rows are usable."""
        self.check(rows)
        return rows

    def _check_inputs(self, rows: Sequence[Row]) -> None:
        prompt, messages = self.column("prompt"), self.column("messages")
        for number, row in enumerate(rows, start=1):
            if not _has(row, prompt) and not _has(row, messages):
                raise DataError(f"input row {number} has neither {prompt!r} nor {messages!r}; columns found: "
                                f"{sorted(row)}")

    def load_model(self, model_path: str, dtype: torch.dtype | None = None) -> nn.Module:
        model: nn.Module = hf.from_pretrained("AutoModelForCausalLM", model_path, dtype=dtype)
        return model

    # -- rows -> token pieces -------------------------------------------------------------
    def _ids(self, value: str, special: bool) -> list[int]:
        ids: list[int] = self.tokenizer(value, add_special_tokens=special)["input_ids"]
        return ids

    def _messages(self, row: Row, where: str) -> list[dict[str, str]]:
        column = self.column("messages")
        value = row[column]
        if not isinstance(value, list) or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                                  and isinstance(m.get("content"), str) for m in value):
            raise DataError(f"{where}: column {column!r} must be a list of {{\"role\": ..., \"content\": ...}} "
                            f"objects with text values, found {value!r:.100}")
        return [{"role": m["role"], "content": m["content"]} for m in value]

    def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
        rendered: str = self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                           add_generation_prompt=generation_prompt)
        return rendered

    def _template_pieces(self, messages: list[dict[str, str]], where: str) -> list[Piece]:
        """Pieces of a templated chat: the text the template adds before each assistant turn is
        context, the text of the turn itself (with the template's end-of-turn marker) is labelled."""
        pieces: list[Piece] = []
        done = ""
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before, through = self._render(messages[:i], True), self._render(messages[:i + 1], False)
            if not before.startswith(done) or not through.startswith(before):
                raise DataError(f"{where}: the tokenizer's chat template does not render this chat turn by turn "
                                "(a prefix of the chat renders differently), so the assistant tokens cannot be found")
            pieces += [(self._ids(before[len(done):], False), False), (self._ids(through[len(before):], False), True)]
            done = through
        return pieces

    def _plain_pieces(self, messages: list[dict[str, str]]) -> list[Piece]:
        pieces: list[Piece] = []
        context = ""
        for message in messages:
            if message["role"] != "assistant":
                context += f"{message['role']}: {message['content']}\n"
                continue
            pieces.append((self._ids(context + "assistant: ", not pieces), False))
            pieces.append((self._ids(message["content"], False) + [self.tokenizer.eos_token_id], True))
            context = ""
        return pieces

    def _pieces(self, row: Row, where: str) -> list[Piece]:
        if _has(row, self.column("messages")):
            messages = self._messages(row, where)
            has_template = getattr(self.tokenizer, "chat_template", None)
            return self._template_pieces(messages, where) if has_template else self._plain_pieces(messages)
        prompt = text(row[self.column("prompt")], self.column("prompt"), where)
        completion = text(row[self.column("completion")], self.column("completion"), where)
        return [(self._ids(prompt, True), False), (self._ids(completion, False) + [self.tokenizer.eos_token_id], True)]

    def _context(self, row: Row, where: str) -> list[int]:
        """The tokens generation starts from: the prompt, or the chat with the assistant's turn opened.

        A chat that ends with an assistant turn (an evaluation row) has that turn written anew."""
        if _has(row, self.column("messages")):
            messages = self._messages(row, where)
            if messages and messages[-1]["role"] == "assistant":
                messages = messages[:-1]
            if getattr(self.tokenizer, "chat_template", None):
                ids = self._ids(self._render(messages, True), False)
            else:
                ids = [i for piece, _ in self._plain_pieces(messages + [{"role": "assistant", "content": ""}])
                       for i in piece][:-1]  # drop the eos that closes the empty turn
        else:
            ids = self._ids(text(row[self.column("prompt")], self.column("prompt"), where), True)
        return ids[-self.max_length:]

    # -- features and batches --------------------------------------------------------------
    def encode(self, rows: Rows) -> list[Features]:
        features = []
        for index, row in enumerate(rows.rows):
            where = rows.where(index)
            pieces = self._pieces(row, where)
            ids = [i for piece, _ in pieces for i in piece][-self.max_length:]
            labels = [i if learn else IGNORE for piece, learn in pieces for i in piece][-self.max_length:]
            if all(label == IGNORE for label in labels):
                raise DataError(f"{where}: nothing to learn (an empty completion, or a chat without an assistant "
                                "turn); give the row a completion or an assistant message")
            features.append({"input_ids": ids, "labels": labels})
        return features

    def collate(self, features: Sequence[Features]) -> Batch:
        ids = [f["input_ids"] for f in features]
        return {"input_ids": pad(ids, self.tokenizer.pad_token_id), "attention_mask": mask(ids),
                "labels": pad([f["labels"] for f in features], IGNORE)}

    @torch.inference_mode()
    def outputs(self, model: nn.Module, features: Sequence[Features], batch_size: int) -> list[Any]:
        """Each row's (summed cross-entropy, scored tokens)."""
        sums: list[Any] = [None] * len(features)
        for chunk in batches(by_length(features), batch_size):
            batch = to_device(self.collate([features[i] for i in chunk]), device_of(model))
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = aligned(logits, batch["input_ids"].shape[1])
            # position t predicts token t + 1
            for i, row in zip(chunk, token_loss_rows(logits[:, :-1], batch["labels"][:, 1:]), strict=True):
                sums[i] = row
        return sums

    def score(self, features: Sequence[Features], outputs: Sequence[Any]) -> dict[str, float]:
        return loss_metrics(sum(total for total, _ in outputs), sum(count for _, count in outputs))

    @torch.inference_mode()
    def predict(self, model: nn.Module, rows: Sequence[Row], batch_size: int = 32) -> list[Any]:
        """The greedy continuation (up to ``max_new_tokens``) of each row's prompt or chat."""
        self._check_inputs(rows)
        contexts = [self._context(row, f"row {number}") for number, row in enumerate(rows, start=1)]
        outputs: list[str] = [""] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: len(contexts[i]))
        for chunk in batches(order, batch_size):
            ids = [contexts[i] for i in chunk]
            # left padding: every row's last prompt token sits at the same position, where generation starts
            batch = to_device({"input_ids": pad(ids, self.tokenizer.pad_token_id, left=True),
                               "attention_mask": mask(ids, left=True)}, device_of(model))
            generated = generate(model, **batch, max_new_tokens=self.max_new_tokens, do_sample=False,
                                       pad_token_id=self.tokenizer.pad_token_id,
                                       eos_token_id=self.tokenizer.eos_token_id)
            new = generated[:, batch["input_ids"].shape[1]:]
            for i, tokens in zip(chunk, new.tolist(), strict=True):
                outputs[i] = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return outputs
