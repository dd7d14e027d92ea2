"""The reference models' image encoders start from the seg backbone: every tensor lands where the
target computes the same thing with it."""

import pytest
import torch
import transformers
from test_reference_tos import tiny_tos
from test_reference_vl import TINY_TEXT, TINY_VISION

from tokensieve.reference import build_nlvr, build_retrieval
from tokensieve.reference import training as reference_training
from tokensieve.reference.recipes import Phase, Recipe
from tokensieve.reference.transfer import start_from_seg
from tokensieve.reference.vl import nlvr_config, retrieval_config


def _source(image_size: int = 224, patch_size: int = 32, layers: int = 3,
            mlp: int = 64) -> transformers.ViTModel:
    """A seg-style backbone at test size, with every weight random (biases and norms too)."""
    torch.manual_seed(0)
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=mlp, image_size=image_size, patch_size=patch_size,
                                    layer_norm_eps=1e-5)
    model = transformers.ViTModel(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0.0, 0.2)
    return model


def _pixels(size: int = 224) -> torch.Tensor:
    return torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def test_the_blip_vision_tower_computes_the_seg_backbones_first_blocks():
    source = _source()
    model = start_from_seg(build_nlvr(nlvr_config(vision=TINY_VISION, text=TINY_TEXT, projection=16)), source)
    tower = model.vision_model.eval()
    expected = source(_pixels(), output_hidden_states=True).hidden_states
    got = tower(pixel_values=_pixels(), output_hidden_states=True).hidden_states
    assert len(got) == 3  # the embeddings and two blocks: the first two of the source's three
    for layer in range(3):
        torch.testing.assert_close(got[layer], expected[layer], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_the_clip_vision_tower_gets_the_seg_patch_bias_in_its_positions():
    source = _source()
    model = start_from_seg(build_retrieval(retrieval_config(vision=TINY_VISION, text=TINY_TEXT,
                                                            projection=16)), source)
    tower = model.vision_model.eval()
    # Before CLIP's own pre-block norm, the embeddings are the seg backbone's, bias included.
    torch.testing.assert_close(tower.embeddings(_pixels()), source.embeddings(_pixels()),
                               atol=1e-5, rtol=1e-5)
    block, origin = tower.encoder.layers[1], source.layers[1]
    pairs = ((block.self_attn.v_proj, origin.attention.v_proj),
             (block.self_attn.out_proj, origin.attention.o_proj), (block.mlp.fc2, origin.mlp.fc2))
    for mine, theirs in pairs:
        assert torch.equal(mine.weight, theirs.weight) and torch.equal(mine.bias, theirs.bias)
    assert torch.equal(tower.post_layernorm.weight, source.layernorm.weight)


@torch.no_grad()
def test_the_classifier_is_the_seg_backbone_with_a_fresh_head():
    source = _source(layers=2)
    config = transformers.ViTConfig(**{**source.config.to_dict(), "num_labels": 8})
    model = start_from_seg(transformers.ViTForImageClassification(config).eval(), source)
    got = model.vit(_pixels()).last_hidden_state
    torch.testing.assert_close(got, source(_pixels()).last_hidden_state, atol=0.0, rtol=0.0)


@torch.no_grad()
def test_the_sam_encoder_takes_fused_qkv_and_a_resampled_position_map():
    model = tiny_tos()
    encoder = model.sam.vision_encoder
    same_grid = _source(image_size=96, patch_size=16, mlp=128)  # 6×6 and the MLP of the tiny SAM
    start_from_seg(model, same_grid)
    grid = same_grid.embeddings.position_embeddings[0, 1:].reshape(1, 6, 6, -1)
    torch.testing.assert_close(encoder.pos_embed, grid)  # resampling to the same size changes nothing
    attention = same_grid.layers[0].attention
    fused = torch.cat([attention.q_proj.weight, attention.k_proj.weight, attention.v_proj.weight])
    assert torch.equal(encoder.layers[0].attn.qkv.weight, fused)
    assert torch.equal(encoder.layers[1].mlp.lin1.bias, same_grid.layers[1].mlp.fc1.bias)

    smaller_grid = _source(image_size=64, patch_size=16, mlp=128)  # 4×4, resampled to 6×6
    start_from_seg(model, smaller_grid)
    assert encoder.pos_embed.shape == (1, 6, 6, 32)
    corner = smaller_grid.embeddings.position_embeddings[0, 1]
    assert not torch.equal(encoder.pos_embed[0, 0, 0], corner)  # interpolated, not copied
    out = model(_pixels(96), text=["the red star", "every circle"]).logits
    assert torch.isfinite(out).all()


def test_a_target_deeper_than_the_source_is_refused():
    model = build_nlvr(nlvr_config(vision={**TINY_VISION, "num_hidden_layers": 4}, text=TINY_TEXT,
                                   projection=16))
    with pytest.raises(ValueError, match="4 blocks, the source only 3"):
        start_from_seg(model, _source())


def test_a_recipe_that_starts_from_seg_loads_the_backbone_before_training(monkeypatch, tmp_path):
    started = []
    monkeypatch.setattr(reference_training, "start_from_seg", started.append)
    source = _source(image_size=64, patch_size=32, layers=1)
    config = transformers.ViTConfig(**{**source.config.to_dict(), "num_labels": 8})
    model = transformers.ViTForImageClassification(config)
    recipe = Recipe("cls", (Phase(64, 1, 1e-3, 0),), batch_size=2, start="seg")
    reference_training.train_reference("cls", tmp_path, recipe=recipe, model=model, progress=False)
    assert started == [model]


def test_a_recipe_names_where_it_starts():
    with pytest.raises(ValueError, match="use 'seg' or None"):
        Recipe("cls", (Phase(64, 1, 1e-3, 0),), start="imagenet")


def test_a_model_without_a_known_image_encoder_is_refused():
    with pytest.raises(TypeError, match="not a Linear"):
        start_from_seg(torch.nn.Linear(2, 2), _source())
