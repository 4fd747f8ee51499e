"""PNG figures with Pillow only (no matplotlib): 2-D point clouds as density-shaded scatter plots, image
grids, and rows of titled panels.

Point clouds are rendered as a soft density rather than opaque dots: each point is splatted
bilinearly onto a pixel grid, spread by a small disk, and the per-pixel ink is
alpha = 1 - exp(-strength * count). Dense modes then look dense and single points stay visible,
which a plain dot scatter of thousands of points does not show.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

DATA_COLOR = (40, 90, 170)
MODEL_COLOR = (215, 80, 40)
BACKGROUND = (255, 255, 255)


def font(size: int = 14):
    """Pillow's bundled font at ``size`` (a scalable one on Pillow >= 10.1, else the bitmap font)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, fnt) -> tuple[int, int]:
    box = draw.textbbox((0, 0), text, font=fnt)
    return box[2] - box[0], box[3] - box[1]


def auto_limit(*clouds: torch.Tensor, quantile: float = 0.995, margin: float = 1.15) -> float:
    """A symmetric half-width for axes: the ``quantile`` of |coordinates| over all clouds, padded."""
    vals = torch.cat([c.detach().double().abs().flatten() for c in clouds if c.numel()])
    if vals.numel() == 0:
        return 1.0
    q = torch.quantile(vals[:1_000_000], quantile).item()
    return max(q * margin, 1e-3)


def density_image(points: torch.Tensor, lim: float, size: int = 256, color=MODEL_COLOR, radius: float = 1.6,
                  strength: float | None = None, background=BACKGROUND) -> Image.Image:
    """Render points [n, 2] within [-lim, lim]^2 onto a ``size`` x ``size`` RGB image (y up)."""
    pts = points.detach().double().cpu().numpy()
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"density_image needs points [n, 2], got {tuple(points.shape)}")
    n = max(len(pts), 1)
    if strength is None:
        # Keep the look independent of n: ink per point shrinks as sqrt(n) grows.
        strength = min(1.2, 35.0 / math.sqrt(n))
    fx = (pts[:, 0] + lim) / (2 * lim) * (size - 1)
    fy = (lim - pts[:, 1]) / (2 * lim) * (size - 1)
    ok = np.isfinite(fx) & np.isfinite(fy) & (fx >= 0) & (fx <= size - 1) & (fy >= 0) & (fy <= size - 1)
    fx, fy = fx[ok], fy[ok]
    counts = np.zeros((size + 1, size + 1))
    x0, y0 = np.floor(fx).astype(int), np.floor(fy).astype(int)
    wx, wy = fx - x0, fy - y0
    for dy, dx, w in ((0, 0, (1 - wx) * (1 - wy)), (0, 1, wx * (1 - wy)), (1, 0, (1 - wx) * wy), (1, 1, wx * wy)):
        np.add.at(counts, (y0 + dy, x0 + dx), w)
    counts = counts[:size, :size]
    r = int(math.ceil(radius))
    spread = np.zeros_like(counts)
    for dy in range(-r, r + 1):
        for dx in range(-r, r + 1):
            w = np.clip(radius + 0.5 - math.hypot(dx, dy), 0.0, 1.0)  # antialiased disk edge
            if w <= 0:
                continue
            shifted = np.roll(np.roll(counts, dy, 0), dx, 1)
            # np.roll wraps around; blank the wrapped rows/columns.
            if dy > 0:
                shifted[:dy] = 0
            elif dy < 0:
                shifted[dy:] = 0
            if dx > 0:
                shifted[:, :dx] = 0
            elif dx < 0:
                shifted[:, dx:] = 0
            spread += w * shifted
    alpha = (1 - np.exp(-strength * spread))[..., None]
    # Faint axes through the origin, under the points, for orientation across panels.
    bg_img = Image.new("RGB", (size, size), tuple(background))
    draw = ImageDraw.Draw(bg_img)
    mid = (size - 1) / 2
    draw.line([(0, mid), (size - 1, mid)], fill=(228, 228, 228))
    draw.line([(mid, 0), (mid, size - 1)], fill=(228, 228, 228))
    bg = np.asarray(bg_img, dtype=np.float64)
    rgb = bg * (1 - alpha) + np.array(color, dtype=np.float64) * alpha
    img = Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), "RGB")
    ImageDraw.Draw(img).rectangle([0, 0, size - 1, size - 1], outline=(170, 170, 170))
    return img


def image_grid(images: torch.Tensor, nrow: int | None = None, pad: int = 1, scale: int = 1, pad_value: int = 255) -> Image.Image:
    """Tile images [n, C, H, W] with values in [-1, 1] (C = 1 or 3) into one RGB image.

    ``nrow`` images per row (default ceil(sqrt(n))); ``scale`` enlarges pixels (nearest) so 8x8
    digits are visible.
    """
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"image_grid needs [n, 1 or 3, H, W], got {tuple(images.shape)}")
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    n, _, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = torch.full((3, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, nrow)
        grid[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = x[i]
    img = Image.fromarray(grid.permute(1, 2, 0).contiguous().numpy(), "RGB")
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST)
    return img


def panel_row(panels: list, title: str | None = None, footers: list | None = None, gap: int = 14,
              margin: int = 14, font_size: int = 15) -> Image.Image:
    """Place ``[(caption, PIL.Image), ...]`` side by side with captions above, an optional figure
    title on top and optional one-line footers under each panel."""
    fnt, big = font(font_size), font(font_size + 3)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cap_h = max(_text_size(probe, c or "Ag", fnt)[1] for c, _ in panels) + 8
    foot_h = (max(_text_size(probe, f or "Ag", fnt)[1] for f in footers) + 8) if footers else 0
    title_h = (_text_size(probe, title, big)[1] + 14) if title else 0
    width = 2 * margin + sum(im.width for _, im in panels) + gap * (len(panels) - 1)
    height = 2 * margin + title_h + cap_h + max(im.height for _, im in panels) + foot_h
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    if title:
        tw, _ = _text_size(draw, title, big)
        draw.text(((width - tw) / 2, margin), title, fill=(20, 20, 20), font=big)
    x = margin
    y0 = margin + title_h
    for i, (caption, im) in enumerate(panels):
        if caption:
            cw, _ = _text_size(draw, caption, fnt)
            draw.text((x + (im.width - cw) / 2, y0), caption, fill=(40, 40, 40), font=fnt)
        canvas.paste(im, (x, y0 + cap_h))
        if footers and footers[i]:
            fw, _ = _text_size(draw, footers[i], fnt)
            draw.text((x + (im.width - fw) / 2, y0 + cap_h + im.height + 4), footers[i], fill=(90, 90, 90), font=fnt)
        x += im.width + gap
    return canvas


def scatter_panels(clouds: list, lim: float | None = None, size: int = 256, title: str | None = None,
                   footers: list | None = None, colors: list | None = None) -> Image.Image:
    """A row of density scatter plots on shared axes: ``clouds = [(caption, points [n, 2]), ...]``.

    The first cloud is drawn in the data colour, the rest in the model colour (unless ``colors``).
    """
    if lim is None:
        lim = auto_limit(*[p for _, p in clouds])
    if colors is None:
        colors = [DATA_COLOR] + [MODEL_COLOR] * (len(clouds) - 1)
    panels = [(cap, density_image(p[:, :2], lim, size, color=col)) for (cap, p), col in zip(clouds, colors)]
    return panel_row(panels, title=title, footers=footers)


def image_panels(grids: list, title: str | None = None, footers: list | None = None, nrow: int | None = None,
                 scale: int | None = None) -> Image.Image:
    """A row of image grids: ``grids = [(caption, images [n, C, H, W] in [-1, 1]), ...]``."""
    if scale is None:
        # Aim at grids about 220 px wide so tiny images (8x8 digits) are legible.
        w = grids[0][1].shape[-1]
        per_row = nrow or math.ceil(math.sqrt(grids[0][1].shape[0]))
        scale = max(1, round(220 / (per_row * (w + 1))))
    panels = [(cap, image_grid(x, nrow=nrow, scale=scale)) for cap, x in grids]
    return panel_row(panels, title=title, footers=footers)


def samples_figure(data: torch.Tensor, samples: dict, title: str | None = None, footers: list | None = None,
                   max_images: int = 64, lim: float | None = None) -> Image.Image:
    """Data beside model samples for several step counts ``samples = {steps: tensor}``.

    Points ([n, d], plotted in the first two coordinates) give density scatter plots; images
    ([n, C, H, W]) give grids.
    """
    def caption(k):
        return f"{k} step" + ("s" if k != 1 else "")

    if data.dim() == 2:
        clouds = [("data", data)] + [(caption(k), s) for k, s in samples.items()]
        if lim is None:
            lim = auto_limit(data[:, :2])
        return scatter_panels([(c, p[:, :2]) for c, p in clouds], lim=lim, title=title, footers=footers)
    grids = [("data", data[:max_images])] + [(caption(k), s[:max_images]) for k, s in samples.items()]
    return image_panels(grids, title=title, footers=footers)


def save_png(img: Image.Image, path) -> Path:
    """Write ``img`` to ``path`` (creating parent folders) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)
    return path
