"""Log-log line plots drawn with PIL (no matplotlib dependency) and the score-analysis figure."""

import dataclasses
import math
import os
from typing import Dict, List, Sequence, Tuple

from PIL import Image, ImageDraw, ImageFont

from esm import files

Color = Tuple[int, int, int]

# One colour per score estimator of esm/analysis/study.py.
ESTIMATOR_COLORS: Dict[str, Color] = {
    'ESM model, eq. 3': (31, 119, 180),
    'DSM model, eq. 4': (230, 120, 20),
    'ESM model ε, eq. 4': (44, 160, 44),
    'loss minimiser, eq. 3': (120, 120, 120),
}


@dataclasses.dataclass
class Series:
  label: str
  xs: Sequence[float]
  ys: Sequence[float]
  color: Color
  dashed: bool = False


@dataclasses.dataclass
class Panel:
  title: str
  series: List[Series]
  xlabel: str = ''
  ylabel: str = ''


def _font(size: int):
  try:
    return ImageFont.truetype('DejaVuSans.ttf', size)
  except OSError:
    pass
  try:
    return ImageFont.load_default(size=size)
  except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
    return ImageFont.load_default()


def _ascii(text: str) -> str:
  """Labels in ASCII, since the fallback fonts have no Greek or math glyphs."""
  for old, new in (('ε', 'eps'), ('∇', 'grad '), ('ᾱ', 'abar'), ('σ²', 'var')):
    text = text.replace(old, new)
  return text


def _log10(v: float) -> float:
  return math.log10(max(abs(v), 1e-30))


def _polyline(draw: ImageDraw.ImageDraw, points, color: Color, dashed: bool, width: int = 2):
  if not dashed:
    draw.line(points, fill=color, width=width)
    return
  dash, gap = 7.0, 5.0
  for (x0, y0), (x1, y1) in zip(points[:-1], points[1:]):
    length = math.hypot(x1 - x0, y1 - y0)
    pos = 0.0
    while pos < length:
      end = min(pos + dash, length)
      a, b = pos / length, end / length
      draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)),
                 (x0 + b * (x1 - x0), y0 + b * (y1 - y0))], fill=color, width=width)
      pos = end + gap


def _y_ticks(lo: float, hi: float) -> List[float]:
  """Decade ticks (log10 values) inside [lo, hi], thinned to at most 6."""
  first, last = math.ceil(lo), math.floor(hi)
  ticks = list(range(first, last + 1))
  stride = max(1, math.ceil(len(ticks) / 6))
  return [float(t) for t in ticks[::stride]] or [lo, hi]


def _draw_panel(draw: ImageDraw.ImageDraw, box: Tuple[int, int, int, int], panel: Panel, font,
                small):
  left, top, right, bottom = box
  ax_l, ax_t, ax_r, ax_b = left + 58, top + 24, right - 12, bottom - 40
  draw.rectangle([ax_l, ax_t, ax_r, ax_b], outline=(0, 0, 0))
  draw.text(((ax_l + ax_r) / 2, top + 4), _ascii(panel.title), fill=(0, 0, 0), font=font,
            anchor='ma')
  xs = [_log10(x) for s in panel.series for x in s.xs]
  ys = [_log10(y) for s in panel.series for y in s.ys]
  if not xs:
    return
  x_lo, x_hi = min(xs), max(xs)
  y_lo, y_hi = min(ys), max(ys)
  pad = max(0.05 * (y_hi - y_lo), 0.1)
  y_lo, y_hi = y_lo - pad, y_hi + pad
  x_span = max(x_hi - x_lo, 1e-9)
  x_lo, x_hi = x_lo - 0.04 * x_span, x_hi + 0.04 * x_span

  def to_px(lx, ly):
    px = ax_l + (lx - x_lo) / (x_hi - x_lo) * (ax_r - ax_l)
    py = ax_b - (ly - y_lo) / (y_hi - y_lo) * (ax_b - ax_t)
    return px, py

  for ly in _y_ticks(y_lo, y_hi):
    _, py = to_px(x_lo, ly)
    draw.line([(ax_l, py), (ax_r, py)], fill=(225, 225, 225))
    draw.text((ax_l - 4, py), f'1e{int(round(ly))}' if ly == int(ly) else f'{10 ** ly:.2g}',
              fill=(0, 0, 0), font=small, anchor='rm')
  for x in sorted({x for s in panel.series for x in s.xs}):
    px, _ = to_px(_log10(x), y_lo)
    draw.line([(px, ax_b), (px, ax_b + 4)], fill=(0, 0, 0))
    draw.text((px, ax_b + 6), f'{x:g}', fill=(0, 0, 0), font=small, anchor='ma')
  if panel.xlabel:
    draw.text(((ax_l + ax_r) / 2, bottom - 16), panel.xlabel, fill=(0, 0, 0), font=small,
              anchor='ma')
  for s in panel.series:
    points = [to_px(_log10(x), _log10(y)) for x, y in zip(s.xs, s.ys)]
    if len(points) > 1:
      _polyline(draw, points, s.color, s.dashed)
    for px, py in points:
      draw.ellipse([px - 2.5, py - 2.5, px + 2.5, py + 2.5], fill=s.color)


def save_grid(panels: List[Panel], ncols: int, path: str, title: str,
              legend: List[Series], panel_size: Tuple[int, int] = (380, 300)) -> None:
  """Draws panels (log-log axes) in a grid under a title and a one-row legend; writes a PNG."""
  font, small = _font(14), _font(12)
  nrows = math.ceil(len(panels) / ncols)
  header = 62
  width, height = ncols * panel_size[0], header + nrows * panel_size[1]
  image = Image.new('RGB', (width, height), (255, 255, 255))
  draw = ImageDraw.Draw(image)
  draw.text((width / 2, 6), title, fill=(0, 0, 0), font=font, anchor='ma')
  x = 12
  for entry in legend:
    y = 40
    _polyline(draw, [(x, y), (x + 34, y)], entry.color, entry.dashed)
    draw.text((x + 40, y), _ascii(entry.label), fill=(0, 0, 0), font=small, anchor='lm')
    x += 52 + int(draw.textlength(_ascii(entry.label), font=small))
  for index, panel in enumerate(panels):
    row, col = divmod(index, ncols)
    left, top = col * panel_size[0], header + row * panel_size[1]
    _draw_panel(draw, (left, top, left + panel_size[0], top + panel_size[1]), panel, font, small)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_path(path) as tmp:
    image.save(tmp)


def study_figure(rows: List[Dict], path: str, powers: Sequence[int] = (2, 3, 4)) -> None:
  """One row of panels per d: ESM_l (solid) and DSM_l (dashed) per l, then the error of each
  score estimator against the true marginal score, all against the step label i."""
  dims = sorted({r['d'] for r in rows})
  main = ('ESM model, eq. 3', 'DSM model, eq. 4', 'loss minimiser, eq. 3')
  panels = []
  for dim in dims:
    mine = [r for r in rows if r['d'] == dim]
    for l in powers:
      series = []
      for name in main:
        sel = sorted((r for r in mine if r['score'] == name), key=lambda r: r['i'])
        steps = [r['i'] for r in sel]
        series.append(Series(name, steps, [r[f'ESM_{l}'] for r in sel], ESTIMATOR_COLORS[name]))
        series.append(Series(name, steps, [r[f'DSM_{l}'] for r in sel], ESTIMATOR_COLORS[name],
                             dashed=True))
      panels.append(Panel(f'd={dim}: ESM_{l} (solid), DSM_{l} (dashed)', series, 'step i'))
    series = []
    for name in ESTIMATOR_COLORS:
      sel = sorted((r for r in mine if r['score'] == name), key=lambda r: r['i'])
      series.append(Series(name, [r['i'] for r in sel], [r['rel_err'] for r in sel],
                           ESTIMATOR_COLORS[name]))
    panels.append(Panel(f'd={dim}: rel. error vs ∇log p_i', series, 'step i'))
  legend = [Series(name, [], [], color) for name, color in ESTIMATOR_COLORS.items()]
  legend.append(Series('dashed: DSM_l (vs conditional score)', [], [], (0, 0, 0), dashed=True))
  save_grid(panels, len(powers) + 1, path,
            'Section 3.1 on Gaussian mixtures: score error vs step i (log-log)', legend)
