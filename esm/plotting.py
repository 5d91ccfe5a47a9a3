"""Small PNG figures drawn with PIL (no plotting library needed): image panels and line plots."""

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
          (140, 86, 75), (227, 119, 194), (127, 127, 127)]


def to_uint8(image, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
  """An HxW or HxWx3 array as uint8, scaled from [lo, hi] (default: its own min and max)."""
  a = np.asarray(image, np.float32)
  lo = float(a.min()) if lo is None else lo
  hi = float(a.max()) if hi is None else hi
  return (np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1) * 255).astype(np.uint8)


def heatmap(values, lo: Optional[float] = None, hi: Optional[float] = None) -> np.ndarray:
  """A blue-yellow-red colour map of an HxW array, as HxWx3 uint8."""
  t = to_uint8(values, lo, hi).astype(np.float32) / 255
  r = np.clip(2 * t, 0, 1)
  g = np.clip(2 - np.abs(4 * t - 2), 0, 1) * 0.9
  b = np.clip(1 - 2 * t, 0, 1)
  return (np.stack([r, g, b], -1) * 255).astype(np.uint8)


def panel_row(panels: Sequence[np.ndarray], titles: Sequence[str], scale: int = 1) -> Image.Image:
  """Images side by side, each with a title above it; grayscale panels are expanded to RGB."""
  tiles = []
  for p in panels:
    p = np.asarray(p)
    p = np.repeat(p[..., None], 3, -1) if p.ndim == 2 else p
    tile = Image.fromarray(p)
    tiles.append(tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST))
  w = max(t.width for t in tiles)
  h = max(t.height for t in tiles)
  canvas = Image.new('RGB', (len(tiles) * (w + 4), h + 14), 'white')
  draw = ImageDraw.Draw(canvas)
  for k, (tile, title) in enumerate(zip(tiles, titles)):
    canvas.paste(tile, (k * (w + 4), 14))
    draw.text((k * (w + 4) + 1, 1), title[: max(4, w // 6)], fill=(0, 0, 0))
  return canvas


def stack_rows(rows: List[Image.Image]) -> Image.Image:
  canvas = Image.new('RGB', (max(r.width for r in rows), sum(r.height for r in rows)), 'white')
  y = 0
  for r in rows:
    canvas.paste(r, (0, y))
    y += r.height
  return canvas


def line_plot(series: Dict[str, Tuple[Sequence[float], Sequence[float]]], title: str,
              xlabel: str, ylabel: str, size: Tuple[int, int] = (480, 360),
              xlim: Optional[Tuple[float, float]] = None, ylim: Optional[Tuple[float, float]] = None,
              log_y: bool = False) -> Image.Image:
  """Lines (name -> (x, y)) on labelled axes with a legend."""
  w, h = size
  left, right, top, bottom = 56, 12, 24, 40
  img = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(img)
  tf = (lambda v: np.log10(np.maximum(v, 1e-30))) if log_y else (lambda v: v)
  xs = np.concatenate([np.asarray(x, np.float64) for x, _ in series.values()])
  ys = np.concatenate([tf(np.asarray(y, np.float64)) for _, y in series.values()])
  finite = np.isfinite(ys)
  x0, x1 = xlim or (float(xs.min()), float(xs.max()))
  y0, y1 = (tf(np.asarray(ylim)) if ylim else
            (float(ys[finite].min()), float(ys[finite].max())) if finite.any() else (0.0, 1.0))
  x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
  px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
  py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
  draw.rectangle([left, top, w - right, h - bottom], outline=(0, 0, 0))
  for k in range(5):
    xv, yv = x0 + k * (x1 - x0) / 4, y0 + k * (y1 - y0) / 4
    draw.text((px(xv) - 12, h - bottom + 4), f'{xv:.3g}', fill=(0, 0, 0))
    draw.text((2, py(yv) - 5), f'{10 ** yv if log_y else yv:.3g}', fill=(0, 0, 0))
  draw.text((left, 4), title, fill=(0, 0, 0))
  draw.text(((w - len(xlabel) * 6) // 2, h - 16), xlabel, fill=(0, 0, 0))
  draw.text((left + 4, top + 2), ylabel, fill=(90, 90, 90))
  for k, (name, (x, y)) in enumerate(series.items()):
    color = COLORS[k % len(COLORS)]
    pts = [(px(a), py(b)) for a, b in zip(np.asarray(x, float), tf(np.asarray(y, float)))
           if np.isfinite(b)]
    if len(pts) > 1:
      draw.line(pts, fill=color, width=2)
    for p in pts if len(pts) < 30 else []:
      draw.ellipse([p[0] - 2, p[1] - 2, p[0] + 2, p[1] + 2], fill=color)
    draw.text((w - right - 150, top + 6 + 12 * k), name[:24], fill=color)
  return img
