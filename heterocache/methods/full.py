"""FullKV: keep every prompt token (the exact reference)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from heterocache.methods.base import Method, PrefillContext


@dataclass
class Full(Method):
    """Keep all tokens; decode tokens appended. Equals ``DynamicCache`` + SDPA."""

    name = "full"
    description = "FullKV: no compression (exact reference)"

    def select(self, ctx: PrefillContext) -> torch.Tensor:
        return ctx.keep_all()
