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
