"""PNG figures: image panels kept as arrays (numpy), placed pixel for pixel, and the line plots, ROC
curves, titles and colour bars drawn with matplotlib's object API (a Figure on its own Agg canvas,
never pyplot), so that importing this module sets no global matplotlib state."""

import os
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
from matplotlib import cm
from matplotlib import colors
from matplotlib import ticker
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from esm import files

DPI = 100
TITLE_PX = 18  # strip above the image panels for their titles
GAP_PX = 6  # between image panels
BAR_PX = 72  # a colour bar beside a panel: the strip and its tick labels
MIN_BAR_HEIGHT_PX = 96  # so that a colour bar beside a small image still has tick values
Range = Tuple[float, float]
Series = Dict[str, Tuple[Sequence[float], Sequence[float]]]  # name -> (x, y)


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


# The colour bars' map: heatmap's own 256 colours, so a bar reads the panels it stands beside.
HEATMAP_COLOURS = colors.ListedColormap(heatmap(np.linspace(0.0, 1.0, 256)) / 255.0, 'esm_heatmap')


def new_figure(width_px: int, height_px: int, layout: Optional[str] = 'constrained') -> Figure:
  """A Figure of that many pixels at DPI, drawn by its own Agg canvas."""
  fig = Figure(figsize=(width_px / DPI, height_px / DPI), dpi=DPI, layout=layout)
  FigureCanvasAgg(fig)
  return fig


def to_image(fig: Figure) -> Image.Image:
  """The figure rendered, as an RGB image of its pixel size."""
  fig.canvas.draw()
  return Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())


def save(figure, path: str) -> None:
  """Writes a Figure or a PIL image as a PNG (atomically: a reader never sees half a file)."""
  image = to_image(figure) if isinstance(figure, Figure) else figure
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with files.atomic_path(path) as tmp:
    image.save(tmp, format='PNG')


def stack_rows(rows: List[Image.Image]) -> Image.Image:
  """Images one under another, left-aligned on white."""
  canvas = Image.new('RGB', (max(r.width for r in rows), sum(r.height for r in rows)), 'white')
  y = 0
  for r in rows:
    canvas.paste(r, (0, y))
    y += r.height
  return canvas


def _rgb_tile(panel, scale: int) -> np.ndarray:
  """A uint8 panel as HxWx3, enlarged by pixel repetition (no resampling)."""
  p = np.clip(np.asarray(panel), 0, 255).astype(np.uint8)
  p = np.repeat(p[..., None], 3, -1) if p.ndim == 2 else p
  return p.repeat(scale, 0).repeat(scale, 1)


def colour_bar(fig: Figure, box_px: Tuple[float, float, float, float], value_range: Range):
  """A vertical colour bar of HEATMAP_COLOURS over value_range, in a box (x, y, w, h) of pixels
  from the figure's lower left corner, with tick values on its right."""
  width, height = fig.bbox.width, fig.bbox.height
  x, y, w, h = box_px
  cax = fig.add_axes((x / width, y / height, w / width, h / height))
  mappable = cm.ScalarMappable(colors.Normalize(*value_range), HEATMAP_COLOURS)
  bar = fig.colorbar(mappable, cax=cax)
  bar.ax.tick_params(labelsize=7, length=2, pad=1)
  bar.ax.yaxis.set_major_locator(ticker.MaxNLocator(5))
  # Whole values on each tick: an offset or "1e-3" text above the bar would collide with titles.
  formatter = ticker.ScalarFormatter(useOffset=False)
  formatter.set_scientific(False)
  bar.ax.yaxis.set_major_formatter(formatter)
  return bar


def _fit_text(fig: Figure, text, width_px: float, min_size: float = 6.0) -> None:
  """Shrinks a text to fit width_px, down to min_size points, then shortens it with an ellipsis,
  so that neighbouring titles never run together."""
  renderer = fig.canvas.get_renderer()
  needed = text.get_window_extent(renderer).width
  if needed > width_px:
    text.set_fontsize(max(text.get_fontsize() * width_px / needed, min_size))
  full = text.get_text()
  for keep in range(len(full) - 1, 0, -1):
    if text.get_window_extent(renderer).width <= width_px:
      break
    text.set_text(full[:keep] + '…')


def image_row(panels: Sequence[np.ndarray], titles: Optional[Sequence[str]] = None, scale: int = 1,
              colour_ranges: Optional[Sequence[Optional[Range]]] = None) -> Figure:
  """uint8 panels (HxW or HxWx3) side by side at `scale` pixels per pixel, each with its title
  above it and, where colour_ranges[k] is given, a colour bar of that range beside it."""
  tiles = [_rgb_tile(p, scale) for p in panels]
  ranges = list(colour_ranges or [None] * len(tiles))
  h = max(t.shape[0] for t in tiles)
  title_px = TITLE_PX if titles else 0
  height = max(h, MIN_BAR_HEIGHT_PX if any(ranges) else 0) + title_px
  widths = [t.shape[1] + (BAR_PX if r else 0) for t, r in zip(tiles, ranges)]
  fig = new_figure(sum(widths) + GAP_PX * (len(tiles) - 1), height, layout=None)
  fig.patch.set_facecolor('white')
  x = 0
  for k, tile in enumerate(tiles):
    top = height - title_px  # pixels count from the bottom; the panel hangs below the titles
    fig.figimage(tile, xo=x, yo=top - tile.shape[0], origin='upper')
    if titles:
      text = fig.text((x + tile.shape[1] / 2) / fig.bbox.width, (top + 3) / height, titles[k],
                      ha='center', va='bottom', fontsize=8)
      _fit_text(fig, text, tile.shape[1] + (BAR_PX if ranges[k] else GAP_PX) - 2)
    if ranges[k]:
      bar_h = max(tile.shape[0], MIN_BAR_HEIGHT_PX) - 8
      colour_bar(fig, (x + tile.shape[1] + 4, top - 4 - bar_h, 10, bar_h), ranges[k])
    x += widths[k] + GAP_PX
  return fig


def _legend_below(fig: Figure, num_entries: int) -> None:
  """The legend under the axes (outside them), so that it never covers a line."""
  fig.legend(loc='outside lower center', ncols=min(num_entries, 4), fontsize=8, frameon=False)


def line_plot(series: Series, title: str, xlabel: str, ylabel: str,
              size: Tuple[int, int] = (560, 420), ylim: Optional[Range] = None,
              integer_x: bool = False, styles: Optional[Dict[str, dict]] = None) -> Figure:
  """Lines (name -> (x, y)) on labelled axes with tick values, a grid and a legend below;
  styles[name] holds extra Axes.plot arguments of a line (colour, linestyle)."""
  fig = new_figure(*size)
  ax = fig.add_subplot()
  for name, (x, y) in series.items():
    x = np.asarray(x, np.float64)
    ax.plot(x, np.asarray(y, np.float64), label=name, linewidth=1.5,
            marker='o' if x.size < 30 else None, markersize=4, **(styles or {}).get(name, {}))
  if integer_x:
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
  ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
  ax.set_ylim(ylim)
  ax.grid(True, alpha=0.3)
  _legend_below(fig, len(series))
  return fig


def roc_plot(curves: Series, title: str, size: Tuple[int, int] = (480, 520)) -> Figure:
  """ROC curves (name -> (false positive rate, true positive rate)) on the unit square, with the
  chance diagonal."""
  fig = new_figure(*size)
  ax = fig.add_subplot()
  ax.plot([0, 1], [0, 1], linestyle='--', color='0.6', linewidth=1, label='chance')
  for name, (fpr, tpr) in curves.items():
    ax.plot(fpr, tpr, label=name, linewidth=1.5)
  ax.set(title=title, xlabel='false positive rate', ylabel='true positive rate', xlim=(0, 1),
         ylim=(0, 1), aspect='equal')
  ax.grid(True, alpha=0.3)
  _legend_below(fig, len(curves) + 1)
  return fig
