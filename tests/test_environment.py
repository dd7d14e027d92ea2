"""The installed torch, torchvision and timm work together (they must come from one torch build)."""

import torch


def test_timm_and_torchvision_import_and_build_a_model():
    import timm
    import torchvision
    from torchvision.ops import nms

    assert torchvision.__version__.split("+")[0]
    boxes = torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8]), 0.5).tolist() == [0]  # a compiled torchvision op
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=16, depth=1,
                              num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
