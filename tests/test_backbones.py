import pytest
import timm
import torch

from medkd.catalog import backbone_specs
from medkd.catalog.backbone_specs import (
    BackboneSpec,
    BackboneWeightsError,
    OfflinePackage,
    get_spec,
    get_text_pretrained_name,
    list_backbones,
    register_backbone,
)
from medkd.models.backbones import build_backbone, build_tokenizer


def test_study_names_and_hub_ids():
    assert get_text_pretrained_name("bio-clinical-bert") == "emilyalsentzer/Bio_ClinicalBERT"
    assert get_text_pretrained_name("distilbert") == "distilbert-base-uncased"
    assert get_text_pretrained_name("minilm") == "sentence-transformers/all-MiniLM-L6-v2"
    assert {"vit-base", "deit-small", "deit-tiny", "tiny-vit"} <= set(list_backbones("vision"))
    assert {"bio-clinical-bert", "distilbert", "minilm", "tiny-bert"} <= set(list_backbones("text"))
    assert get_spec("vit-base").arch == "vit_base_patch16_224"


@pytest.mark.parametrize("name,width", [("vit-base", 768), ("deit-small", 384), ("deit-tiny", 192),
                                        ("bio-clinical-bert", 768), ("distilbert", 768), ("minilm", 384)])
def test_random_architectures_build_offline_with_declared_width(name, width):
    with torch.device("meta"):
        backbone = build_backbone(name, pretrained=False)
    assert backbone.width == width
    if name == "bio-clinical-bert":
        assert backbone.body.config.vocab_size == 28996 and backbone.body.config.num_hidden_layers == 12


def test_unknown_or_wrong_modality_names_are_explained():
    with pytest.raises(KeyError, match="unknown backbone 'resnet-9000'.*deit-small"):
        build_backbone("resnet-9000")
    with pytest.raises(ValueError, match="'minilm' is a text backbone, not vision"):
        build_backbone("minilm", modality="vision")


def test_offline_without_weights_names_the_backbone_and_the_remedies(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(BackboneWeightsError) as err:
        build_backbone("bio-clinical-bert", pretrained=True)
    message = str(err.value)
    assert "'bio-clinical-bert'" in message and "text_weights:" in message and "pretrained: false" in message
    with pytest.raises(BackboneWeightsError, match="does not exist"):
        build_backbone("deit-tiny", pretrained=True, weights="/nonexistent/weights.pth")


def test_local_weight_file_for_a_timm_backbone(tmp_path):
    torch.manual_seed(0)
    reference = timm.create_model("deit_tiny_patch16_224", num_classes=0).eval()
    torch.save(reference.state_dict(), tmp_path / "deit.pth")
    loaded = build_backbone("deit-tiny", pretrained=True, weights=tmp_path / "deit.pth").eval()
    x = torch.rand(1, 3, 224, 224)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    # The wrapper applies the backbone's own normalisation to [0, 1] pixels.
    torch.testing.assert_close(loaded(x), reference((x - mean) / std))


def test_local_directory_for_a_text_backbone(tmp_path):
    torch.manual_seed(0)
    original = build_backbone("tiny-bert").eval()
    original.body.save_pretrained(tmp_path)
    loaded = build_backbone("tiny-bert", pretrained=True, weights=tmp_path).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3, 0]])
    mask = (ids != 0).long()
    torch.testing.assert_close(loaded(ids, mask), original(ids, mask))


def test_mean_pooling_ignores_padding():
    backbone = build_backbone("minilm")
    backbone.body = backbone.body.eval()
    ids = torch.tensor([[101, 2000, 2001, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    hidden = backbone.body(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(backbone(ids, mask), hidden[0, :4].mean(0, keepdim=True))


def test_tiny_tokenizer_needs_no_download():
    tok = build_tokenizer("tiny-bert")
    enc = tok(["CT chest"], padding="max_length", max_length=12, truncation=True)
    assert enc["input_ids"][0][0] == tok.cls_token_id and len(enc["input_ids"][0]) == 12
    assert tok.unk_token_id not in enc["input_ids"][0]


def test_offline_package_weights_are_sha256_verified(tmp_path):
    weights = tmp_path / "w.pth"
    torch.save(build_backbone("tiny-bert").body.state_dict(), weights)
    spec = BackboneSpec("tiny-vit-pkg-test", "vision", "timm", 192, "deit_tiny_patch16_224",
                        offline=OfflinePackage(("some-weights-package",), lambda: weights, sha256="0" * 64))
    register_backbone(spec)
    try:
        with pytest.raises(BackboneWeightsError, match="sha256 of .*w.pth is [0-9a-f]{64}, expected 0000"):
            build_backbone("tiny-vit-pkg-test", pretrained=True)
    finally:
        del backbone_specs.BACKBONES["tiny-vit-pkg-test"]


@pytest.mark.parametrize("name", [n for n in list_backbones() if get_spec(n).offline is not None])
def test_random_architecture_matches_offline_weights(name):
    """A checkpoint rebuilds its model with random weights: the shapes must be the pretrained ones."""
    spec = get_spec(name)
    if spec.offline.locate() is None:
        pytest.skip(f"offline weights for {name} not installed (`make offline-weights`)")
    pretrained = build_backbone(name, pretrained=True).state_dict()
    random = build_backbone(name, pretrained=False).state_dict()
    assert {k: v.shape for k, v in random.items()} == {k: v.shape for k, v in pretrained.items()}
