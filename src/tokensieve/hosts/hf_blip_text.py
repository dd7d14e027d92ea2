"""transformers BLIP text encoder (BlipTextModel: the `text_encoder` of BlipForImageTextRetrieval
and BlipForQuestionAnswering, the `text_model` of BlipModel).

Each layer is BERT-style, post-norm: self-attention over the text (padding masked), then, when
image tokens are passed (`encoder_hidden_states`, with `encoder_attention_mask` for a padded or
ragged image batch), cross-attention to them, then the MLP, each followed by its residual add and
LayerNorm. The first token ([CLS] / [ENC], read by the ITM head and the text projection) is
protected. Runs as an encoder only (is_decoder=False, no key/value cache).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from tokensieve import calls, ops
from tokensieve.hosts.base import BlockCall, Host, Step, linear_macs
from tokensieve.spec import ModelSpec

FAMILY = "transformers BlipTextModel"
_ARGUMENTS = ("encoder_hidden_states", "attention_mask", "encoder_attention_mask", "past_key_values")


def matches(model: nn.Module) -> bool:
    cls = type(model)
    return cls.__name__ == "BlipTextModel" and cls.__module__.startswith("transformers.")


class _Heads:
    """Query/key/value linears of a BlipTextSelfAttention, split into heads."""

    def __init__(self, attention: nn.Module) -> None:
        inner = attention.self
        self.inner, self.output = inner, attention.output
        self.num_heads, self.head_dim = inner.num_attention_heads, inner.attention_head_size
        self.scale = self.head_dim**-0.5

    def split(self, linear: nn.Linear, x: Tensor) -> Tensor:
        batch, tokens, _ = x.shape
        return calls.linear(linear, x).view(batch, tokens, self.num_heads, self.head_dim).transpose(1, 2)

    def branch(self, heads_out: Tensor) -> Tensor:
        """Output projection and dropout; the residual add and LayerNorm follow in `norm_after`."""
        return calls.apply((self.output.dropout,), calls.linear(self.output.dense, heads_out))

    def attention_dropout(self) -> float:
        return self.inner.dropout.p if self.inner.training else 0.0


class BlipTextCrossAttentionView(_Heads):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__(attention)
        inner = attention.self
        self.query_linear_macs = linear_macs(inner.query) + linear_macs(attention.output)
        self.memory_linear_macs = linear_macs(inner.key) + linear_macs(inner.value)

    def query(self, x: Tensor) -> Tensor:
        return self.split(self.inner.query, x)

    def key_value(self, memory: Tensor) -> tuple[Tensor, Tensor]:
        return self.split(self.inner.key, memory), self.split(self.inner.value, memory)


class BlipTextLayerView(_Heads):
    """BlipTextLayer: attention, crossattention, intermediate + output; LayerNorm after each residual."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__(layer.attention)
        self.layer = layer
        self.attention_linear_macs = linear_macs(layer.attention)
        self.mlp_macs = linear_macs(layer.intermediate) + linear_macs(layer.output)
        cross = getattr(layer, "crossattention", None)
        self.cross_attention = BlipTextCrossAttentionView(cross) if cross is not None else None
        self._norms = {"attention": layer.attention.output.LayerNorm, "mlp": layer.output.LayerNorm}
        if cross is not None:
            self._norms["cross_attention"] = cross.output.LayerNorm

    def qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        inner = self.inner
        return self.split(inner.query, x), self.split(inner.key, x), self.split(inner.value, x)

    def attention_branch(self, heads_out: Tensor) -> Tensor:
        return self.branch(heads_out)

    def mlp_branch(self, x: Tensor) -> Tensor:
        intermediate, output = self.layer.intermediate, self.layer.output
        hidden = calls.activate(intermediate.intermediate_act_fn, calls.linear(intermediate.dense, x))
        return calls.apply((output.dropout,), calls.linear(output.dense, hidden))

    def norm_after(self, step: Step, x: Tensor) -> Tensor:
        return self._norms[step](x)


def read_call(x: Tensor, args: tuple, kwargs: dict, entry: Any) -> BlockCall:
    """Reads a BlipTextLayer call: (hidden_states, encoder_hidden_states, attention_mask=...,
    encoder_attention_mask=..., past_key_values=...)."""
    if len(args) > len(_ARGUMENTS):
        raise ValueError(f"a BlipTextLayer takes at most {len(_ARGUMENTS) + 1} positional arguments")
    inputs = dict(zip(_ARGUMENTS, args, strict=False))
    inputs.update({k: v for k, v in kwargs.items() if k in _ARGUMENTS})
    if inputs.get("past_key_values") is not None:
        raise ValueError("a patched BlipTextModel runs as an encoder; decoding with a key/value cache is not "
                         "supported (call it with use_cache=False, is_decoder=False)")
    others = [k for k, v in kwargs.items() if k not in _ARGUMENTS and isinstance(v, Tensor)]
    if others:
        raise ValueError(f"a patched BlipTextLayer cannot take {others}")
    try:
        valid = ops.key_mask(inputs.get("attention_mask"), x.shape[1])
    except ValueError as error:
        raise ValueError(f"{error} (a patched BlipTextModel runs as an encoder, is_decoder=False)") from None
    memory = inputs.get("encoder_hidden_states")
    memory_mask = None
    if memory is not None:
        memory_mask = ops.key_mask(inputs.get("encoder_attention_mask"), memory.shape[1])
    return BlockCall(key_mask=valid, memory=memory, memory_mask=memory_mask)


def keep_cross_attention_mask(text_encoder: nn.Module) -> nn.Module:
    """Make an unpatched BlipTextModel apply `encoder_attention_mask` in its cross-attention, so a
    ragged image batch's padding is not attended; returns `text_encoder`. Idempotent.

    transformers' BlipTextLayer hands its cross-attention the mask as `attention_mask`, and
    BlipTextSelfAttention then reads `encoder_attention_mask` (None) in its place. A pre-hook on
    each cross-attention passes the mask under the name it is read by; where transformers passes
    it itself, the hook changes nothing. A patched encoder applies the mask on its own."""
    if not matches(text_encoder):
        raise TypeError(f"keep_cross_attention_mask takes a transformers BlipTextModel, got "
                        f"{type(text_encoder).__name__}")
    for layer in text_encoder.encoder.layer:
        inner = getattr(getattr(layer, "crossattention", None), "self", None)
        if inner is not None and not getattr(inner, "_tokensieve_passes_mask", False):
            inner.register_forward_pre_hook(_pass_cross_attention_mask, with_kwargs=True)
            inner._tokensieve_passes_mask = True
    return text_encoder


def _pass_cross_attention_mask(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if kwargs.get("encoder_hidden_states") is None or kwargs.get("encoder_attention_mask") is not None:
        return None
    return args, {**kwargs, "encoder_attention_mask": kwargs.get("attention_mask")}


def resolve(model: nn.Module) -> Host:
    layers = list(model.encoder.layer)
    views = [BlipTextLayerView(layer) for layer in layers]
    config = model.config
    spec = ModelSpec(
        family="transformers BlipTextModel", depth=len(views), dim=config.hidden_size,
        num_heads=views[0].num_heads, head_dim=views[0].head_dim, prefix=1, has_class_token=True,
        input_tokens=config.max_position_embeddings, image_size=0,
    )
    pooler = getattr(model, "pooler", None)
    return Host(
        spec=spec, blocks=layers, views=views, mean_pooled=False, embed_macs_per_patch=0,
        head_macs=linear_macs(pooler) if pooler is not None else 0, read_call=read_call,
        checkpoints_in_layers=True,
    )
