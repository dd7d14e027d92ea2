"""The q/k/v/output projections of a transformers attention module, across families' names."""

from __future__ import annotations

from torch import Tensor, nn

from tokensieve import calls
from tokensieve.hosts.base import linear_macs


def _first_attribute(module: nn.Module, *names: str):
    for name in names:
        if hasattr(module, name):
            return getattr(module, name)
    raise TypeError(f"{type(module).__name__} has none of {names}")


class HFAttentionPart:
    """Reads separate q_proj / k_proj / v_proj linears and the output projection of `attention`."""

    def __init__(self, attention: nn.Module) -> None:
        self.attention = attention
        self.num_heads = _first_attribute(attention, "num_attention_heads", "num_heads")
        self.head_dim = attention.head_dim
        self.scale = _first_attribute(attention, "scaling", "scale")
        self.output_projection = _first_attribute(attention, "o_proj", "out_proj")
        self._dropout = _first_attribute(attention, "attention_dropout", "dropout")
        self.attention_linear_macs = linear_macs(attention)

    def project(self, h: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, tokens, _ = h.shape
        a = self.attention
        shape = (batch, tokens, self.num_heads, self.head_dim)
        return tuple(calls.linear(linear, h).view(shape).transpose(1, 2)
                     for linear in (a.q_proj, a.k_proj, a.v_proj))

    def attention_dropout(self) -> float:
        return self._dropout if self.attention.training else 0.0
