"""The score-analysis figure: ESM_l / DSM_l and the score error against the step label, log-log,
drawn with matplotlib's object API (esm/plotting.py)."""

from typing import Dict, List, Sequence

from matplotlib import lines
from matplotlib import ticker

from esm import plotting

# One colour per score estimator of esm/analysis/study.py.
ESTIMATOR_COLORS: Dict[str, str] = {
    'ESM model, eq. 3': '#1f77b4',
    'DSM model, eq. 4': '#e67814',
    'ESM model ε, eq. 4': '#2ca02c',
    'loss minimiser, eq. 3': '#787878',
}
PANEL_PX = (380, 300)


def _rows_of(rows: List[Dict], name: str) -> List[Dict]:
  return sorted((r for r in rows if r['score'] == name), key=lambda r: r['i'])


def _log_axes(ax, title: str, steps: Sequence[int]) -> None:
  """Log-log axes with a tick at each measured step label."""
  ax.set_xscale('log')
  ax.set_yscale('log')
  ax.set_xticks(steps, [f'{s:g}' for s in steps])
  ax.xaxis.set_minor_locator(ticker.NullLocator())
  ax.set_title(title, fontsize=9)
  ax.set_xlabel('step i', fontsize=8)
  ax.tick_params(labelsize=7)
  ax.grid(True, which='major', alpha=0.3)


def _loss_panel(ax, rows: List[Dict], dim: int, l: int) -> None:
  for name in ('ESM model, eq. 3', 'DSM model, eq. 4', 'loss minimiser, eq. 3'):
    sel = _rows_of(rows, name)
    steps = [r['i'] for r in sel]
    ax.plot(steps, [r[f'ESM_{l}'] for r in sel], color=ESTIMATOR_COLORS[name], marker='o', ms=3)
    ax.plot(steps, [r[f'DSM_{l}'] for r in sel], color=ESTIMATOR_COLORS[name], marker='o', ms=3,
            linestyle='--')
  _log_axes(ax, f'd={dim}: ESM_{l} (solid), DSM_{l} (dashed)', sorted({r['i'] for r in rows}))


def _error_panel(ax, rows: List[Dict], dim: int) -> None:
  for name, color in ESTIMATOR_COLORS.items():
    sel = _rows_of(rows, name)
    ax.plot([r['i'] for r in sel], [r['rel_err'] for r in sel], color=color, marker='o', ms=3)
  _log_axes(ax, f'd={dim}: rel. error vs ∇log p_i', sorted({r['i'] for r in rows}))


def study_figure(rows: List[Dict], path: str, powers: Sequence[int] = (2, 3, 4)):
  """One row of panels per d: ESM_l (solid) and DSM_l (dashed) per l, then the error of each
  score estimator against the true marginal score, all against the step label i; written to path
  and returned."""
  dims = sorted({r['d'] for r in rows})
  ncols = len(powers) + 1
  fig = plotting.new_figure(ncols * PANEL_PX[0], 70 + len(dims) * PANEL_PX[1])
  axes = fig.subplots(len(dims), ncols, squeeze=False)
  for row, dim in zip(axes, dims):
    mine = [r for r in rows if r['d'] == dim]
    for ax, l in zip(row, powers):
      _loss_panel(ax, mine, dim, l)
    _error_panel(row[-1], mine, dim)
  handles = [lines.Line2D([], [], color=c, marker='o', ms=3, label=n)
             for n, c in ESTIMATOR_COLORS.items()]
  handles.append(lines.Line2D([], [], color='black', linestyle='--',
                              label='dashed: DSM_l (vs conditional score)'))
  fig.suptitle('Section 3.1 on Gaussian mixtures: score error vs step i (log-log)')
  fig.legend(handles=handles, loc='outside lower center', ncols=len(handles), fontsize=8,
             frameon=False)
  plotting.save(fig, path)
  return fig
