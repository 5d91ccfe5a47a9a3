"""The figures: matplotlib's object API without global state, legends beside the lines, tick
values, titles that do not run together, image panels placed pixel for pixel, and only the panels
a model can fill."""

import os
import subprocess
import sys

import numpy as np
from matplotlib.figure import Figure
from PIL import Image

from esm import metrics, plotting, predict, report
from esm.analysis import plot

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_IMPORTS = r'''
import sys
from esm import Detector
assert 'matplotlib' not in sys.modules, 'from esm import Detector loaded matplotlib'
import esm.detector
assert 'matplotlib' not in sys.modules, 'esm.detector loaded matplotlib'
import matplotlib
raw_params = lambda: dict(dict.items(matplotlib.rcParams))  # RcParams' own would pick a backend
before = raw_params()
from esm import plotting, predict, report
from esm.analysis import plot
plotting.save(plotting.line_plot({'a': ([0, 1], [0, 1])}, 't', 'x', 'y'), sys.argv[1])
assert 'matplotlib.pyplot' not in sys.modules
assert raw_params() == before and matplotlib.rcParams._get_backend_or_none() is None
'''


def _tuned():
  candidates = [{'method': m, 't_d': t, 'image_auroc': a}
                for m, auroc in (('sgm', (0.6, 0.7, 0.75)), ('esm', (0.9, 0.8, 0.85)))
                for t, a in zip((25, 50, 100), auroc)]
  sweep = [{'method': 'esm', 't_d': t, 'image_auroc': a} for t, a in ((25, 0.5), (100, 0.95))]
  return {'methods': ['sgm', 'esm'], 'candidates': candidates}, sweep


def _overlaps(a, b) -> bool:
  return a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1


def _kept(rng, with_variance: bool):
  x = rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32)
  var0 = rng.uniform(1e-4, 1e-1, x.shape) if with_variance else x * np.nan  # as FigureKeeper keeps
  return {'input': x, 'x0_hat': 0.5 * x, 'var0': var0}


def test_importing_the_project_sets_no_matplotlib_state_and_detector_skips_it(tmp_path):
  path = str(tmp_path / 'line.png')
  out = subprocess.run([sys.executable, '-c', _IMPORTS, path], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  with Image.open(path) as image:
    assert image.size == (560, 420)


def test_tuning_figure_has_its_legend_below_the_axes_and_tick_values(tmp_path):
  tuned, sweep = _tuned()
  fig = report.tuning_figure(tuned, sweep)
  assert isinstance(fig, Figure)
  plotting.save(fig, str(tmp_path / 'tuning.png'))
  (ax,), (legend,) = fig.axes, fig.legends
  assert [t.get_text() for t in legend.get_texts()] == ['dev, sgm', 'dev, esm', 'test, esm']
  _, dev_esm, test_esm = ax.get_lines()
  assert test_esm.get_color() == dev_esm.get_color() and test_esm.get_linestyle() == '--'
  renderer = fig.canvas.get_renderer()
  box = legend.get_window_extent(renderer)
  assert not _overlaps(box, ax.get_window_extent(renderer))  # a legend outside covers no line
  entries = [t.get_window_extent(renderer) for t in legend.get_texts()]
  assert not any(_overlaps(a, b) for k, a in enumerate(entries) for b in entries[k + 1:])
  x_ticks = [t.get_text() for t in ax.get_xticklabels() if 25 < t.get_position()[0] < 100]
  y_ticks = [t.get_text() for t in ax.get_yticklabels() if 0 < t.get_position()[1] < 1]
  assert x_ticks and all(x_ticks) and len(y_ticks) >= 3 and all(y_ticks)
  assert all(float(t) == int(float(t)) for t in x_ticks)  # T_d is an integer
  with Image.open(tmp_path / 'tuning.png') as image:
    assert image.size == (560, 420)


def test_roc_plot_draws_the_curves_and_the_chance_line_on_the_unit_square(tmp_path):
  rng = np.random.default_rng(0)
  labels = np.r_[np.zeros(30), np.ones(20)].astype(bool)
  fpr, tpr = metrics.roc_curve(rng.normal(size=50) + labels, labels)
  fig = plotting.roc_plot({'image AUROC 80.0': (fpr, tpr)}, 'ROC object (esm)')
  (ax,) = fig.axes
  assert ax.get_xlim() == (0, 1) and ax.get_ylim() == (0, 1)
  assert [line.get_label() for line in ax.get_lines()] == ['chance', 'image AUROC 80.0']
  np.testing.assert_array_equal(ax.get_lines()[1].get_xdata(), fpr)
  assert [t.get_text() for t in fig.legends[0].get_texts()] == ['chance', 'image AUROC 80.0']
  plotting.save(fig, str(tmp_path / 'roc.png'))
  with Image.open(tmp_path / 'roc.png') as image:
    assert image.size == (480, 520)


def test_example_row_of_an_sgm_model_leaves_out_the_variance_panel():
  rng = np.random.default_rng(0)
  pixel_map, mask = rng.random((8, 8)), rng.random((8, 8)) > 0.8
  rows = {}
  for name, with_variance in (('esm', True), ('sgm', False)):
    fig = report.example_row(_kept(rng, with_variance), 'crack 0.50', pixel_map, mask,
                             (0.1, 0.9), scale=16)  # 128 px, as the report draws them
    rows[name] = fig, [t.get_text() for t in fig.texts]
  assert rows['esm'][1] == ['crack 0.50', 'reconstruction', 'log10 σ²₀', 'anomaly map', 'mask']
  assert rows['sgm'][1] == ['crack 0.50', 'reconstruction', 'anomaly map', 'mask']
  assert len(rows['esm'][0].axes) == 2 and len(rows['sgm'][0].axes) == 1  # one colour bar each
  (bar,) = rows['sgm'][0].axes
  assert bar.get_ylim() == (0.1, 0.9)
  width = lambda fig: plotting.to_image(fig).width
  assert width(rows['esm'][0]) - width(rows['sgm'][0]) == 8 * 16 + plotting.BAR_PX + plotting.GAP_PX


def test_image_row_places_panels_pixel_for_pixel_and_keeps_titles_apart():
  rng = np.random.default_rng(1)
  panels = [rng.integers(0, 255, (10, 12, 3), np.uint8), rng.integers(0, 255, (10, 12), np.uint8)]
  titles = ['a title far longer than its panel', 'another long title']
  fig = plotting.image_row(panels, titles, scale=3)
  image = np.asarray(plotting.to_image(fig))
  assert image.shape == (30 + plotting.TITLE_PX, 2 * 36 + plotting.GAP_PX, 3)
  top = plotting.TITLE_PX
  np.testing.assert_array_equal(image[top:, :36], panels[0].repeat(3, 0).repeat(3, 1))
  np.testing.assert_array_equal(image[top:, 36 + plotting.GAP_PX:, 0],
                                panels[1].repeat(3, 0).repeat(3, 1))
  renderer = fig.canvas.get_renderer()
  boxes = [t.get_window_extent(renderer) for t in fig.texts]
  assert not _overlaps(*boxes) and all(b.width <= 36 + plotting.GAP_PX for b in boxes)
  assert [t.get_text()[:-1] for t in fig.texts] == [t[:len(s.get_text()) - 1] for t, s in
                                                    zip(titles, fig.texts)]  # shortened with '…'
  assert all(t.get_text().endswith('…') for t in fig.texts)


def test_overlay_keeps_the_input_size_and_adds_a_colour_bar_with_values():
  rng = np.random.default_rng(2)
  rgb, amap = rng.integers(0, 255, (40, 50, 3), np.uint8), rng.random((40, 50))
  image = np.asarray(predict.overlay(rgb, amap, 0.2, 0.8))
  assert image.shape == (plotting.MIN_BAR_HEIGHT_PX, 50 + plotting.BAR_PX, 3)
  blend = (0.5 * rgb + 0.5 * plotting.heatmap(np.clip(amap, 0.2, 0.8), 0.2, 0.8)).astype(np.uint8)
  np.testing.assert_array_equal(image[:40, :50], blend)
  fig = plotting.image_row([blend], colour_ranges=[(0.2, 0.8)])
  fig.canvas.draw()
  ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
  assert len(ticks) >= 3 and all(ticks), ticks


def test_colour_bar_uses_the_panels_colours():
  values = np.linspace(0.0, 1.0, 256)
  np.testing.assert_allclose(plotting.HEATMAP_COLOURS(values)[:, :3] * 255,
                             plotting.heatmap(values, 0.0, 1.0), atol=1.0)


def test_study_figure_has_one_row_per_dimension(tmp_path):
  rows = [{'d': d, 'score': name, 'i': i, 'rel_err': 0.1 * i, 'ESM_2': 1.0 + i, 'DSM_2': 2.0 + i,
           'ESM_3': 3.0, 'DSM_3': 4.0, 'ESM_4': 5.0, 'DSM_4': 6.0}
          for d in (2, 64) for name in plot.ESTIMATOR_COLORS for i in (1, 10, 100)]
  path = str(tmp_path / 'study.png')
  fig = plot.study_figure(rows, path)
  assert len(fig.axes) == 2 * 4
  assert [t.get_text() for t in fig.legends[0].get_texts()] == [
      *plot.ESTIMATOR_COLORS, 'dashed: DSM_l (vs conditional score)']
  assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ['1', '10', '100']
  with Image.open(path) as image:
    assert image.size == (4 * plot.PANEL_PX[0], 70 + 2 * plot.PANEL_PX[1])


def test_colour_bar_of_a_narrow_range_writes_whole_values_within_its_strip():
  """A nearly constant log σ² (a barely trained model): no offset text over the titles, and tick
  labels that differ and stay inside the bar's strip."""
  fig = plotting.image_row([np.zeros((128, 128), np.uint8)], ['log10 σ²₀'],
                           colour_ranges=[(-3.28445, -3.28405)])
  image = plotting.to_image(fig)
  (bar,) = fig.axes
  renderer = fig.canvas.get_renderer()
  assert bar.yaxis.get_offset_text().get_text() == ''
  ticks = [t.get_text() for t in bar.get_yticklabels()
           if -3.28445 <= t.get_position()[1] <= -3.28405]
  assert len(ticks) >= 3 and len(set(ticks)) == len(ticks), ticks
  assert bar.get_tightbbox(renderer).x1 <= image.width
