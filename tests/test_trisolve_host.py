"""``tm::solve_column`` and the two-thread split of ``solve_column_halves`` (the substitution inside
the sm_90a/generic ``trisolve`` primitive) compiled for the host with nvcc and run against a float64
substitution: their index arithmetic checked on a machine without a GPU. Skipped where nvcc is not
installed (CI); the GPU half is ``test_hopper_primitives``' ``solves`` probe."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

HARNESS = r"""
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <vector>
#define tm tilemix_tm  // the header's namespace would clash with <time.h>'s struct tm
#include "tilemix/hopper.cuh"
#undef tm

template <bool TRANS, int R, bool HALVES> double worst(int C, unsigned seed) {  // max |x - exact| / max(1, |exact|)
  srand(seed);
  alignas(16) static float coef[R * R];
  std::vector<float> l(R * R), b(R * C);
  for (auto& v : l) v = 0.1f * ((float)rand() / RAND_MAX - 0.5f);  // the diagonal and other triangle: ignored
  for (auto& v : b) v = (float)rand() / RAND_MAX - 0.5f;
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < R; ++c) coef[TRANS ? c * R + r : r * R + c] = l[r * R + c];  // as trisolve stores them
  std::vector<float> x = b;
  for (int c = 0; c < C; ++c) {
    float* col = x.data() + c;
    if (!HALVES) {
      tilemix_tm::solve_column<TRANS, R>(col, C, coef);
      continue;
    }
    for (int p = 0; p < R / 4; ++p) {  // solve_column_halves' two threads, half 1's sum first
      float sum[2][4];
      for (int half = 1; half >= 0; --half) {
        for (int r = 0; r < 4; ++r) sum[half][r] = half ? 0.0f : col[(tilemix_tm::quad_row<TRANS, R>(p) + r) * C];
        tilemix_tm::subtract_solved<TRANS, R>(sum[half], col, C, coef, p, half, 2);
      }
      for (int r = 0; r < 4; ++r) sum[0][r] += sum[1][r];
      tilemix_tm::finish_quad<TRANS, R>(sum[0], col, C, coef, p);
    }
  }
  double err = 0;
  for (int c = 0; c < C; ++c) {
    std::vector<double> y(R);
    for (int s = 0; s < R; ++s) {
      const int i = TRANS ? R - 1 - s : s;
      double acc = b[i * C + c];
      for (int j = 0; j < R; ++j)
        if (TRANS ? j > i : j < i) acc -= (double)(TRANS ? l[j * R + i] : l[i * R + j]) * y[j];
      y[i] = acc;
    }
    for (int i = 0; i < R; ++i) err = std::fmax(err, std::fabs(x[i * C + c] - y[i]) / std::fmax(1.0, std::fabs(y[i])));
  }
  return err;
}

int main() {
  double err = 0;
  for (unsigned seed = 1; seed < 6; ++seed) {
    const double e[] = {worst<false, 64, false>(128, seed), worst<true, 64, false>(128, seed),
                        worst<false, 64, true>(64, seed), worst<true, 64, true>(64, seed),
                        worst<false, 64, true>(1, seed), worst<true, 64, true>(1, seed),
                        worst<false, 128, true>(8, seed), worst<true, 128, true>(8, seed)};
    for (double v : e) err = std::fmax(err, v);
  }
  printf("%.3e\n", err);
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc to compile the header for the host")
def test_solve_column_matches_float64_substitution(tmp_path):
    include = Path(__file__).resolve().parents[1] / "tiles" / "include"
    (tmp_path / "harness.cu").write_text(HARNESS)
    subprocess.run(["nvcc", "-std=c++17", f"-I{include}", "harness.cu", "-o", "harness"], cwd=tmp_path,
                   check=True, capture_output=True)
    err = float(subprocess.run([tmp_path / "harness"], check=True, capture_output=True, text=True).stdout)
    assert err < 1e-5, err
