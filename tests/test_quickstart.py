"""The main job as shipped: `dk run` (quickstart) beats the baseline by more than the seed spread."""

import pytest

from helpers import dk, results

pytestmark = pytest.mark.slow


def test_quickstart_kd_beats_baseline_beyond_seed_spread(tmp_path):
    proc = dk("run", "--out", "q", "--quiet", cwd=tmp_path, timeout=900)
    assert proc.returncode == 0, proc.stderr
    assert "Distillation helps" in proc.stdout
    from darkknowledge.runs.report import group_rows

    rows = {r["role"]: r for r in group_rows(list(results(tmp_path / "q").values()))}
    base, kd = rows["baseline"], rows["student"]
    assert len(kd["seeds"]) >= 3
    assert kd["last_mean"] - base["last_mean"] > max(base["last_std"], kd["last_std"])
    assert (tmp_path / "q" / "report.md").is_file()
