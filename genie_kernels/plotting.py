"""Small image writers on Pillow alone (no plotting library needed at run time)."""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageDraw


# formats Pillow saves both grey and RGB grids in (several of its other writers refuse such images)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".pdf")


def scatter_panels(panels, path, size: int = 400, extent: float = 2.5) -> Path:
    """Draw each ``(title, points (N, 2))`` as a square scatter panel, side by side."""
    image = Image.new("RGB", (size * len(panels), size + 20), "white")
    draw = ImageDraw.Draw(image)
    for i, (title, points) in enumerate(panels):
        left = i * size
        draw.rectangle([left, 20, left + size - 1, size + 19], outline="gray")
        draw.text((left + 6, 4), title, fill="black")
        pix = ((points.to(torch.float64).clamp(-extent, extent) + extent) / (2 * extent) * (size - 1)).round()
        for px, py in pix.tolist():
            x, y = left + px, 20 + (size - 1 - py)
            draw.rectangle([x - 1, y - 1, x + 1, y + 1], fill=(30, 60, 200))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def uint8_images(images: torch.Tensor) -> torch.Tensor:
    """Images in [−1, 1] as bytes on the CPU: ``round((clamp(x, −1, 1) + 1) · 127.5)``."""
    return ((images.detach().cpu().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def image_grid(images: torch.Tensor, path, nrow: int = 8, padding: int = 2) -> Path:
    """Save ``(N, C, H, W)`` images in [−1, 1] as one PNG grid."""
    images = uint8_images(images)
    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + padding) + padding, nrow * (w + padding) + padding, dtype=torch.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + k * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    array = grid.permute(1, 2, 0).squeeze(-1).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path
