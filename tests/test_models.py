import pytest
import torch
from conftest import tiny_model

from medkd.models.classifier import OUTPUT_KEYS, CrossAttentionFusion, ModelConfig, build_model, count_parameters

# The study's table (MedPix class counts 2 and 5), all with one fusion layer.
STUDY_SIZES = {
    ("vit-base", "bio-clinical-bert", 0.185, 8): 197.07e6,
    ("deit-small", "distilbert", 0.238, 4): 90.40e6,
    ("deit-tiny", "minilm", 0.238, 4): 30.27e6,
    ("deit-small", "minilm", 0.238, 4): 46.60e6,
}


@pytest.mark.parametrize("config", list(STUDY_SIZES), ids=lambda c: f"{c[0]}+{c[1]}")
def test_parameter_counts_match_study_table(config):
    vision, text, dropout, heads = config
    with torch.device("meta"):  # counts only: no memory, no weights
        model = build_model(ModelConfig(vision, text, fusion_dim=384, fusion_layers=1, fusion_heads=heads,
                                        dropout=dropout), (2, 5))
    n = count_parameters(model)
    assert abs(n - STUDY_SIZES[config]) / STUDY_SIZES[config] < 0.01, n


def test_second_fusion_layer_adds_one_block():
    with torch.device("meta"):
        one = build_model(ModelConfig("deit-tiny", "minilm", fusion_layers=1, fusion_heads=4), (2, 5))
        two = build_model(ModelConfig("deit-tiny", "minilm", fusion_layers=2, fusion_heads=4), (2, 5))
    d = 384
    block = 2 * d + (3 * d * d + 3 * d) + (d * d + d) + 2 * d + (d * 4 * d + 4 * d) + (4 * d * d + d)
    assert count_parameters(two) - count_parameters(one) == block
    assert abs(block - 1.77e6) < 0.01e6


@pytest.mark.parametrize("num_classes", [(2, 5), (10, 3)])
def test_output_keys_and_shapes(tiny_batch, num_classes):
    model = tiny_model(fusion_dim=24, num_classes=num_classes).eval()
    out = model(tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    assert set(out) == set(OUTPUT_KEYS)
    b = 4
    assert out["logits_modality"].shape == (b, num_classes[0])
    assert out["logits_location"].shape == (b, num_classes[1])
    assert out["img_raw"].shape == (b, model.img_dim) == (b, 32)
    assert out["txt_raw"].shape == (b, model.txt_dim) == (b, 32)
    for key in ("img_proj", "txt_proj", "fused"):
        assert out[key].shape == (b, 24)


def test_study_architectures_forward_shapes():
    # Real widths of a student, random weights, tiny images: checks wiring of widths.
    torch.manual_seed(0)
    model = build_model(ModelConfig("deit-tiny", "tiny-bert", fusion_dim=384, fusion_heads=4), (2, 5)).eval()
    ids = torch.randint(5, 50, (2, 8))
    out = model(torch.rand(2, 3, 64, 64), ids, torch.ones_like(ids))
    assert out["img_raw"].shape == (2, 192) and out["img_proj"].shape == (2, 384)


def test_fusion_layers_are_honoured(tiny_batch):
    fusion = CrossAttentionFusion(16, layers=3, heads=2)
    assert len(fusion.blocks) == 3
    img, txt = torch.randn(4, 16), torch.randn(4, 16)
    # Recompute by hand: query = mean of tokens, refined by each block in turn.
    tokens = torch.stack((img, txt), 1)
    query = tokens.mean(1)
    for block in fusion.blocks:
        q = block.norm_query(query).unsqueeze(1)
        attn = torch.nn.functional.multi_head_attention_forward(
            q.transpose(0, 1), tokens.transpose(0, 1), tokens.transpose(0, 1), 16, 2,
            block.attention.in_proj_weight, block.attention.in_proj_bias, None, None, False, 0.0,
            block.attention.out_proj.weight, block.attention.out_proj.bias, need_weights=False,
        )[0].transpose(0, 1).squeeze(1)
        query = query + attn
        query = query + block.ffn(block.norm_ffn(query))
    torch.testing.assert_close(fusion(img, txt), query)
    # Dropping the last block changes the output: every layer is used.
    fusion.blocks = fusion.blocks[:2]
    assert not torch.allclose(fusion(img, txt), query)


def test_dropout_only_in_training(tiny_batch):
    model = tiny_model(dropout=0.5)
    args = (tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"])
    model.eval()
    a, b = model(*args)["logits_modality"], model(*args)["logits_modality"]
    torch.testing.assert_close(a, b)
    model.train()
    torch.manual_seed(1)
    c = model(*args)["logits_modality"]
    assert not torch.allclose(a, c)


def test_bad_fusion_config_is_refused():
    with pytest.raises(ValueError, match="divisible"):
        tiny_model(fusion_dim=18, heads=4)
    with pytest.raises(ValueError, match="num_classes"):
        tiny_model(num_classes=(2,))


@pytest.mark.parametrize("kept", ["image", "text"])
def test_a_single_modality_model_has_one_backbone_and_ignores_the_other_input(kept, tiny_batch):
    cfg = ModelConfig(vision="tiny-vit", text="tiny-bert", fusion_dim=16, fusion_heads=2, modalities=(kept,))
    torch.manual_seed(0)
    model = build_model(cfg, (2, 5)).eval()
    both = build_model(ModelConfig(vision="tiny-vit", text="tiny-bert", fusion_dim=16, fusion_heads=2), (2, 5))
    assert (model.vision is None) == (kept == "text") and (model.text is None) == (kept == "image")
    assert count_parameters(model) < count_parameters(both)
    pixels, ids, mask = tiny_batch["pixel_values"], tiny_batch["input_ids"], tiny_batch["attention_mask"]
    out = model(pixels, ids, mask)
    present = {"img_raw", "img_proj"} if kept == "image" else {"txt_raw", "txt_proj"}
    assert set(out) == {"logits_modality", "logits_location", "fused"} | present
    # The input it does not have cannot move its outputs.
    other = (torch.rand_like(pixels), ids, mask) if kept == "text" else (pixels, torch.zeros_like(ids), mask)
    torch.testing.assert_close(model(*other)["fused"], out["fused"])
    with pytest.raises(ValueError, match="distinct"):
        ModelConfig(vision="tiny-vit", text="tiny-bert", fusion_heads=2, fusion_dim=16, modalities=("image", "image"))
