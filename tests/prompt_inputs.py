"""The token inputs of the prompt-method format tests, shared by the main suite (test_prompt_hub_format.py)
and the AdapterHub oracle suite (adapters_oracle/test_prompt_hub.py), which runs in its own environment:
this module needs torch only, so both can import it (tests/ is on the path of both, through tests/conftest.py)."""

from __future__ import annotations

import torch
from torch import Tensor


def inputs(pad: bool = True) -> dict[str, Tensor]:
    """Two seeded rows of 7 token ids below 128; with ``pad`` the second row's last two are padding."""
    ids = torch.randint(1, 128, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if pad:
        mask[1, 5:] = 0
    return {"input_ids": ids, "attention_mask": mask}
