"""Figure tables: written by a stage, rendered by the report."""

import os

import numpy as np

from wsss_jax.reporting import figures


def test_save_row_writes_pngs_relative_to_the_workdir(tmp_path):
  workdir = str(tmp_path)
  out_dir = os.path.join(workdir, 'labels', 'figures')
  image = np.zeros((4, 5, 3), np.uint8)
  row = figures.save_row(workdir, out_dir, 'm', 'img_1',
                         {'input': image, 'map': None, 'gray': image[..., 0]},
                         ('input', 'map', 'gray', 'absent'))
  assert row == ['img_1', 'labels/figures/m_img_1_input.png', None,
                 'labels/figures/m_img_1_gray.png', None]
  assert os.path.exists(os.path.join(workdir, row[1]))
  table = figures.figure_table('T', 'cap', ('input', 'map', 'gray', 'absent'),
                               [row])
  lines = figures.render_table(table)
  assert lines[0] == '## T' and 'cap' in lines
  assert lines[-2] == ('| img_1 | ![](labels/figures/m_img_1_input.png) | – | '
                       '![](labels/figures/m_img_1_gray.png) | – |')


def test_heatmap_clips_to_the_unit_interval():
  out = figures.heatmap(np.array([[-1.0, 0.0], [1.0, 2.0]]))
  assert out.shape == (2, 2, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out[0, 0], out[0, 1])    # -1 shows as 0
  np.testing.assert_array_equal(out[1, 0], out[1, 1])    # 2 shows as 1
  assert not np.array_equal(out[0, 0], out[1, 0])


def test_image_grid_fits_each_image_into_its_cell():
  wide = np.full((10, 40, 3), 7, np.uint8)
  grid = figures.image_grid([[wide, None], [wide[..., 0], wide]], cell=20,
                            gap=2)
  assert grid.shape == (42, 42, 3)
  # The 40x10 image becomes 20x5, centred vertically in its cell; a small
  # one is enlarged to fill it.
  assert (grid[7:12, 0:20] == 7).all() and (grid[0:7, 0:20] == 255).all()
  assert (grid[0:20, 22:42] == 230).all()          # the empty cell
  small = figures.image_grid([[np.full((2, 4, 3), 9, np.uint8)]], cell=20)
  assert small.shape == (20, 20, 3) and (small[5:15] == 9).all()


def test_history_plot_has_a_panel_per_term_and_a_fixed_miou_axis(tmp_path):
  history = {'train': [{'step': s, 'loss': 1.0 / s, 'ce': 0.5 / s,
                        'lr': 0.01, 'grad_norm': 1.0} for s in (1, 2, 3)],
             'val': [{'step': 3, 'miou': 65.1}]}
  path = str(tmp_path / 'curve.png')
  assert figures.plot_history(history, 'stage train', path)
  assert os.path.getsize(path) > 0
  assert not figures.plot_history({'train': []}, 't', path + '2')


def test_class_legend(tmp_path):
  path = str(tmp_path / 'legend.png')
  figures.class_legend(('background', 'disc'),
                       np.array([[0, 0, 0], [128, 0, 0]]), path)
  assert os.path.getsize(path) > 0
