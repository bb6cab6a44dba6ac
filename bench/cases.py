"""The GPU timing cases shared by ``gpu_check.py`` and ``test_kernel_speed.py`` (random weights, fp16, CUDA)."""

from __future__ import annotations

import torch

from genie_kernels.heads.conv import ConvHead
from genie_kernels.ode.protocol import ModelOutput
from genie_kernels.models.unet import UNet


def head_case(batch: int = 256):
    """The 1-block conv head of the targets (nf 128, 32 groups, features 128, temb 512) with
    inputs at 32×32: ``(head, x, model_output, gamma)``."""
    head = ConvHead(3, feature_channels=128, temb_channels=512, nf=128, num_blocks=1, groups=32)
    for p in head.parameters():  # conv_out starts at zero; give every weight some size
        torch.nn.init.normal_(p, std=0.05)
    head = head.cuda().half().eval()
    x, eps = (torch.randn(batch, 3, 32, 32, device="cuda", dtype=torch.float16) for _ in range(2))
    out = ModelOutput(eps, torch.randn(batch, 128, 32, 32, device="cuda", dtype=torch.float16),
                      torch.randn(batch, 512, device="cuda", dtype=torch.float16))
    return head, x, out, torch.full((batch,), 0.7, device="cuda")


def unet_and_head():
    """A random-weight UNet of this package for 32×32×3 images and a conv head on its features."""
    model = UNet(image_size=32, in_channels=3, channels=64, channel_mults=(1, 2, 2), attn_resolutions=(8,))
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.02)
    model = model.cuda().half().eval()
    head = ConvHead(3, feature_channels=model.feature_channels, temb_channels=model.temb_dim, nf=64, groups=8)
    return model, head.cuda().half().eval()
