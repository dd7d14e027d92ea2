"""The core's capabilities end to end, each through a small method written only here: tokens
frozen and later reactivated from the grid (timm ViT), a per-call guidance input (SAM's image
encoder), and parts shared by BLIP's image and text towers with a loss from both (trained by fit)."""

from __future__ import annotations

import copy
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from models import IMAGE, PATCH, blip_retrieval, host_model, images, sam_model, texts
from torch import Tensor, nn
from torch.utils.data import Dataset

import tokensieve as ts
from tokensieve import ops
from tokensieve.methods import CallInput, Method, MethodRun
from tokensieve.spec import ModelSpec
from tokensieve.tokens import TokenState, Trace
from tokensieve.train import TrainConfig, cross_entropy, fit, load_trained

TOLERANCE = 1e-5

# --- the grid: freeze at one block, reactivate at a later one -------------------------------------


@dataclass(frozen=True)
class FreezeThenWake(Method):
    """Before block `freeze`, a linear gate freezes the lower-scoring half of the patch tokens;
    before block `wake`, every frozen token comes back with the features it had when frozen.
    In mask mode (training) the gate's hard decision carries a straight-through gradient."""

    freeze: int = 1
    wake: int = 3
    keep: float = 0.5

    @property
    def uses_grid(self) -> bool:
        return True

    def bind(self, spec: ModelSpec) -> nn.Module:
        return nn.Linear(spec.dim, 1)

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if layer == self.freeze:
            scores = run.parts(state.x[:, state.prefix :])[..., 0]  # [B, Np]
            if run.training:
                soft = scores.sigmoid()
                hard = (soft > soft.median(dim=1, keepdim=True).values).to(soft.dtype)
                decisions = hard + soft - soft.detach()  # straight-through
                keep = torch.cat([decisions.new_ones(decisions.shape[0], state.prefix), decisions], dim=1)
                return state.replace(keep=keep)
            slots, _ = ops.keep_top(scores, ops.keep_count(state.patch_counts(), self.keep), state.prefix)
            return state.activate(state.index.gather(1, slots))
        if layer == self.wake:
            if run.training:
                return state.replace(keep=None)
            everyone = torch.arange(state.grid.shape[1] - 1, device=state.x.device)
            return state.activate(everyone.expand(state.x.shape[0], -1))
        return state


def _freeze_then_wake_by_hand(model: nn.Module, gate: nn.Linear, x: Tensor, method: FreezeThenWake) -> Tensor:
    """The same computation on the unpatched timm model, spelled out: frozen rows are left alone."""
    prefix = model.num_prefix_tokens
    with torch.no_grad():
        tokens = model.norm_pre(model._pos_embed(model.patch_embed(x)))
        grid, kept = None, None
        for layer, block in enumerate(model.blocks):
            if layer == method.freeze:
                scores = gate(tokens[:, prefix:])[..., 0]
                count = ops.keep_count(scores.shape[1], method.keep)
                kept = torch.cat([torch.arange(prefix).expand(len(x), -1),
                                  scores.topk(count, dim=1).indices.sort(dim=1).values + prefix], dim=1)
                grid = tokens.clone()
                tokens = torch.stack([t[k] for t, k in zip(tokens, kept, strict=True)])
            if layer == method.wake:
                for b in range(len(x)):
                    grid[b, kept[b]] = tokens[b]
                tokens = grid
            tokens = block(tokens)
        return model.norm(tokens)


def test_frozen_tokens_are_reactivated_from_the_grid_with_the_features_they_had():
    method = FreezeThenWake()
    host = host_model("timm-vit")
    model = copy.deepcopy(host)
    sieve = ts.patch(model, method, dense=True)
    torch.nn.init.normal_(sieve.parts[0].weight)
    x = images(3)
    with torch.no_grad(), ts.trace(model) as traces:
        out = model.forward_features(x)

    expected = _freeze_then_wake_by_hand(host, sieve.parts[0], x, method)
    assert out.shape == expected.shape == (3, 1 + (IMAGE // PATCH) ** 2, 64)
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)
    attention_tokens = traces[0].attention_tokens()[:, 0].tolist()
    assert attention_tokens == [65, 33, 33, 65]  # all, half while frozen, all again after the wake


def test_a_grid_method_without_dense_output_returns_its_active_tokens():
    model = host_model("timm-vit")
    ts.patch(model, FreezeThenWake(wake=2))
    with torch.no_grad():
        assert model.forward_features(images(2)).shape == (2, 65, 64)  # everyone is active again
    ts.patch(model, FreezeThenWake(wake=0))  # the wake comes before the freeze: half stays frozen
    with torch.no_grad():
        assert model.forward_features(images(2)).shape == (2, 33, 64)


def test_the_gate_of_a_grid_method_gets_gradients_in_mask_mode_training():
    model = host_model("timm-vit")
    sieve = ts.patch(model, FreezeThenWake(), dense=True)
    model.train()
    out = model.forward_features(images(2))
    assert out.shape == (2, 65, 64)
    out.pow(2).mean().backward()
    gate = sieve.parts[0]
    assert gate.weight.grad is not None and torch.isfinite(gate.weight.grad).all()
    assert gate.weight.grad.abs().sum() > 0


# --- per-call inputs: a guidance vector on SAM's image encoder ------------------------------------

WIDTH = 12


@dataclass(frozen=True)
class GuidedDrop(Method):
    """Keeps, before block `layer`, the tokens most similar to the call's guidance (projected to
    the model's width)."""

    width: int = WIDTH
    layer: int = 1
    keep: float = 0.5

    def call_inputs(self, spec: ModelSpec) -> tuple[CallInput, ...]:
        return (CallInput("guidance", width=self.width),)

    def bind(self, spec: ModelSpec) -> nn.Module:
        return nn.Linear(self.width, spec.dim, bias=False)

    def start(self, state: TokenState, run: MethodRun) -> TokenState:
        guidance = run.inputs["guidance"]
        if guidance.dim() == 3:  # [B, T, D] tokens: their mean
            guidance = guidance.mean(dim=1)
        run.scratch["query"] = run.parts(guidance)  # [B, C]
        return state

    def before_block(self, layer: int, state: TokenState, run: MethodRun) -> TokenState:
        if layer != self.layer:
            return state
        scores = (state.x[:, state.prefix :] * run.scratch["query"][:, None]).sum(dim=-1)
        kept = ops.keep_count(state.patch_counts(), self.keep)
        return state.select(*ops.keep_top(scores, kept, state.prefix))


def _layer_input(model: nn.Module, x: Tensor, layer: int) -> Tensor:
    """The tokens [B, N, C] entering SAM encoder layer `layer` of an unpatched model."""
    seen = {}

    def keep(module, args):
        seen["x"] = args[0]

    handle = model.layers[layer].register_forward_pre_hook(keep)
    with torch.no_grad():
        model(pixel_values=x)
    handle.remove()
    return seen["x"].flatten(1, 2)


def test_a_guidance_input_reaches_the_method_of_each_call_on_the_sam_encoder():
    host = sam_model()
    model = copy.deepcopy(host)
    method = GuidedDrop()
    sieve = ts.patch(model, method)
    x = images(2)
    first, second = torch.randn(2, WIDTH), torch.randn(2, 3, WIDTH)  # [B, D], and [B, T, D] tokens
    kept = []
    for guidance in (first, second):
        with ts.inputs(model, guidance=guidance), ts.trace(model) as traces, torch.no_grad():
            out = model(pixel_values=x).last_hidden_state
        assert out.shape[0] == 2 and torch.isfinite(out).all()
        kept.append(traces[0].layers[method.layer].index)
        query = sieve.parts[0](guidance if guidance.dim() == 2 else guidance.mean(dim=1))
        scores = (_layer_input(host, x, method.layer) * query[:, None]).sum(dim=-1)
        expected = scores.topk(ops.keep_count(scores.shape[1], method.keep), dim=1).indices.sort(dim=1).values
        assert torch.equal(kept[-1], expected)
    assert not torch.equal(kept[0], kept[1])


def test_a_call_without_its_guidance_or_with_the_wrong_one_is_refused_with_the_fix():
    model = sam_model()
    ts.patch(model, GuidedDrop())
    x = images(2)
    with pytest.raises(ValueError, match=r"needs the per-call input 'guidance'.*tokensieve.inputs"):
        model(pixel_values=x)
    with pytest.raises(ValueError, match=r"is 5 wide and the method reads 12"), ts.inputs(
            model, guidance=torch.randn(2, 5)):
        model(pixel_values=x)
    with pytest.raises(ValueError, match=r"has 3 rows and the call has 2 samples"), ts.inputs(
            model, guidance=torch.randn(3, WIDTH)):
        model(pixel_values=x)
    with pytest.raises(ValueError, match=r"give it as \[B, 12\] or \[B, T, 12\]"), ts.inputs(
            model, guidance=torch.randn(WIDTH)):
        model(pixel_values=x)
    with pytest.raises(ValueError, match=r"reads guidance; it does not read prompt"), ts.inputs(
            model, prompt=torch.randn(2, WIDTH)):
        pass


def test_inputs_stay_with_their_block_and_their_thread():
    model = sam_model()
    ts.patch(model, GuidedDrop())
    x = images(2)
    refused = []

    def call_elsewhere():
        try:
            model(pixel_values=x)
        except ValueError as error:
            refused.append(str(error))

    with ts.inputs(model, guidance=torch.randn(2, WIDTH)), torch.no_grad():
        model(pixel_values=x)
        other = threading.Thread(target=call_elsewhere)
        other.start()
        other.join()
    assert len(refused) == 1 and "guidance" in refused[0]  # another thread does not see this block's inputs
    with pytest.raises(ValueError, match="needs the per-call input"):
        model(pixel_values=x)  # nothing stays on the model after the block


def test_pruning_disabled_runs_without_the_methods_inputs_and_equals_the_host():
    host = sam_model()
    model = copy.deepcopy(host)
    ts.patch(model, GuidedDrop())
    x = images(2)
    with torch.no_grad(), ts.pruning_disabled(model):
        out = model(pixel_values=x).last_hidden_state
        expected = host(pixel_values=x).last_hidden_state
    torch.testing.assert_close(out, expected, atol=TOLERANCE, rtol=TOLERANCE)


# --- parts shared by two towers, and a loss from both ---------------------------------------------

BANK, SHARED_WIDTH = 4, 16


@dataclass(frozen=True)
class SharedBank(Method):
    """A bank of learnable tokens shared by every patched tower; each tower pools its last tokens
    onto the bank (through its own projection), and the loss pulls the image's and the text's
    pooled features of the same bank token together."""

    weight: float = 1.0

    def bind(self, spec: ModelSpec) -> nn.Module:
        return nn.Linear(spec.dim, SHARED_WIDTH)

    def bind_shared(self, specs: Sequence[ModelSpec]) -> nn.Module:
        bank = nn.Module()
        bank.tokens = nn.Parameter(torch.randn(BANK, SHARED_WIDTH))
        return bank

    def finish(self, state: TokenState, run: MethodRun) -> TokenState:
        features = run.parts(state.x)  # [B, N, W]
        logits = features @ run.shared.tokens.t()  # [B, N, bank]
        if state.valid is not None:  # padding pools nothing
            logits = logits.masked_fill(~state.valid[..., None], -torch.inf)
        pooled = logits.softmax(dim=1).transpose(1, 2) @ features  # [B, bank, W]
        run.report("pooled", pooled)
        return state

    def losses(self, traces: Sequence[Trace]) -> dict[str, Tensor]:
        pooled = {trace.module: trace.reports["pooled"] for trace in traces}
        if len(pooled) < 2:
            return {}
        similarity = F.cosine_similarity(pooled[0], pooled[1], dim=-1)  # [B, bank]
        return {"align": self.weight * (1 - similarity).mean()}


class Towers(nn.Module):
    """BLIP's image-text matching: the text encoder cross-attends to the vision tower's tokens."""

    def __init__(self, blip: nn.Module) -> None:
        super().__init__()
        self.blip = blip

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        image = self.blip.vision_model(pixel_values=pixel_values).last_hidden_state
        text = self.blip.text_encoder(input_ids=input_ids, attention_mask=attention_mask,
                                      encoder_hidden_states=image).last_hidden_state
        return self.blip.itm_head(text[:, 0])


class Pairs(Dataset):
    def __init__(self, count: int = 24) -> None:
        self.pixels = images(count, height=32, width=32)
        self.ids, self.mask = texts([3 + i % 5 for i in range(count)], seed=1)
        self.labels = torch.arange(count) % 2

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        inputs = {"pixel_values": self.pixels[i], "input_ids": self.ids[i], "attention_mask": self.mask[i]}
        return inputs, self.labels[i]


def _towers(method_seed: int = 0) -> tuple[Towers, ts.Sieve]:
    blip = blip_retrieval()
    torch.manual_seed(method_seed)
    sieve = ts.patch([blip.vision_model, blip.text_encoder], SharedBank())
    return Towers(blip), sieve


def _config(**settings) -> TrainConfig:
    return TrainConfig(**{**dict(steps=12, batch_size=8, lr=2e-2, progress=False), **settings})


def test_one_handle_spans_both_towers_and_unpatch_restores_both():
    blip = blip_retrieval()
    host = copy.deepcopy(blip)
    sieve = ts.patch([blip.vision_model, blip.text_encoder], SharedBank())
    assert ts.sieve_of(blip.vision_model) is sieve is ts.sieve_of(blip.text_encoder)
    names = {name for name, _ in sieve.named_parameters()}
    assert names == {"parts.0.weight", "parts.0.bias", "parts.1.weight", "parts.1.bias", "shared.tokens"}
    assert blip.state_dict().keys() == host.state_dict().keys()
    inputs = Pairs()[0]
    batch = {key: value[None] for key, value in inputs[0].items()}
    with ts.trace(blip.vision_model) as image_traces, ts.trace(blip.text_encoder) as text_traces:
        Towers(blip)(**batch)
    assert [t.module for t in image_traces + text_traces] == [0, 1]
    assert {"pooled"} == image_traces[0].reports.keys() == text_traces[0].reports.keys()

    ts.unpatch(blip.text_encoder)
    assert not ts.is_patched(blip.vision_model) and not ts.is_patched(blip.text_encoder)
    with torch.no_grad():
        torch.testing.assert_close(Towers(blip)(**batch), Towers(host)(**batch), atol=0, rtol=0)


def test_fit_trains_shared_parts_on_a_loss_from_both_towers():
    model, sieve = _towers()
    bank_before = sieve.shared.tokens.detach().clone()
    result = fit(model, Pairs(), cross_entropy, _config())
    align = [step.method_losses["align"] for step in result.history]
    assert all(step.loss_task is not None for step in result.history)
    assert sum(align[-3:]) / 3 < 0.5 * align[0]
    assert not torch.equal(sieve.shared.tokens, bank_before)
    for module in (model.blip.vision_model, model.blip.text_encoder):  # the hosts stay frozen and patched
        assert ts.sieve_of(module) is sieve


def test_a_shared_parts_run_checkpoints_loads_and_resumes_as_if_it_never_stopped(tmp_path):
    straight, straight_sieve = _towers()
    fit(straight, Pairs(), cross_entropy, _config())

    run_dir = tmp_path / "run"
    first, _ = _towers()
    assert fit(first, Pairs(), cross_entropy, _config(checkpoint_dir=str(run_dir)), until=5).step == 5
    resumed, resumed_sieve = _towers(method_seed=9)  # parts start elsewhere: the checkpoint must set them
    result = fit(resumed, Pairs(), cross_entropy, _config(checkpoint_dir=str(run_dir)))
    assert result.resumed_from is not None and result.step == 12
    expected, actual = straight_sieve.state_dict(), resumed_sieve.state_dict()
    assert expected.keys() == actual.keys()
    for key in expected:
        torch.testing.assert_close(actual[key], expected[key], atol=1e-6, rtol=1e-6, msg=key)

    loaded, loaded_sieve = _towers(method_seed=5)
    load_trained(loaded, run_dir, sieve=loaded_sieve)
    for key, value in loaded_sieve.state_dict().items():
        assert torch.equal(value, actual[key]), key


# --- attention views: the attention that ran, or a refusal -----------------------------------------


@dataclass(frozen=True)
class RecordReceived(Method):
    """Keeps every token; records the attention each token receives at `layer`."""

    layer: int = 0

    def after_attention(self, layer: int, state: TokenState, attn, run: MethodRun) -> TokenState:
        if layer == self.layer:
            run.report("received", attn.received_attention())
        return state


def test_received_attention_is_the_mean_over_queries_of_the_hosts_attention_max_over_heads():
    host = host_model("timm-vit")
    model = copy.deepcopy(host)
    ts.patch(model, RecordReceived())
    x = images(2)
    with torch.no_grad(), ts.trace(model) as traces:
        model(x)
        tokens = host.norm_pre(host._pos_embed(host.patch_embed(x)))
        attn = host.blocks[0].attn
        batch, count, _ = tokens.shape
        qkv = attn.qkv(host.blocks[0].norm1(tokens)).reshape(batch, count, 3, attn.num_heads, -1)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # [B, H, N, d]
        weights = (q @ k.transpose(-2, -1) * attn.scale).softmax(dim=-1)
        expected = weights.mean(dim=2).amax(dim=1)[:, host.num_prefix_tokens :]
    torch.testing.assert_close(traces[0].reports["received"], expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_attention_scores_are_refused_where_the_view_runs_its_own_attention():
    model = sam_model()
    ts.patch(model, RecordReceived(layer=1))
    with pytest.raises(ValueError, match="attention received read from its plain q and k"):
        model(pixel_values=images(1))
