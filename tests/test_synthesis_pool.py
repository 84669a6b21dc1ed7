"""SamplePool: a bounded FIFO of synthetic batches that resumes exactly (on disk or in memory)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from darkknowledge.errors import ConfigError, ShapeError
from darkknowledge.synthesis.pool import SamplePool

SHAPE = (1, 3)


def chunk(value: float, rows: int = 4) -> torch.Tensor:
    """A batch ``(rows, 1, 3)`` whose every entry is ``value`` (so a sample tells its chunk)."""
    return torch.full((rows, *SHAPE), float(value))


def visible_values(pool: SamplePool) -> list[float]:
    """The value of each visible chunk, oldest first (read through the pool's own loading)."""
    return [float(pool._load(seq)[0, 0, 0]) for seq in pool.visible()]


def files(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


@pytest.mark.parametrize("on_disk", [False, True])
def test_the_window_is_the_last_chunks_and_never_exceeds_the_capacity(tmp_path, on_disk):
    pool = SamplePool(10, SHAPE, tmp_path / "pool" if on_disk else None, teacher_hash="t")  # 10 // 4 = 2 chunks
    for v in range(1, 6):
        pool.add(chunk(v))
        assert len(pool) <= 10
    assert pool.capacity_chunks == 2 and int(pool.count) == 5
    assert len(pool) == 8 and visible_values(pool) == [4.0, 5.0]
    drawn = pool.sample(200, torch.Generator().manual_seed(0))
    assert drawn.shape == (200, *SHAPE)
    assert set(drawn[:, 0, 0].tolist()) == {4.0, 5.0}  # FIFO: 1, 2, 3 are gone, both visible chunks drawn


def test_a_resume_sees_the_chunks_of_its_checkpoint_and_overwrites_a_killed_runs_extra_chunks(tmp_path):
    where = tmp_path / "pool"
    first = SamplePool(8, SHAPE, where, teacher_hash="t")  # 2 chunks visible
    for v in (1, 2, 3):
        first.add(chunk(v))
    checkpoint = {k: v.clone() for k, v in first.state_dict().items()}  # last.pt at count 3
    first.commit()
    first.add(chunk(4))  # written after the checkpoint, then the run is killed
    first.add(chunk(5))
    assert "chunk-00000005.pt" in files(where)

    resumed = SamplePool(8, SHAPE, where, teacher_hash="t")  # a new process
    resumed.load_state_dict(checkpoint)
    assert int(resumed.count) == 3 and visible_values(resumed) == [2.0, 3.0]  # 4 and 5 are not seen
    resumed.add(chunk(40))
    resumed.add(chunk(50))

    straight = SamplePool(8, SHAPE)  # the uninterrupted sequence
    for v in (1, 2, 3, 40, 50):
        straight.add(chunk(v))
    assert visible_values(resumed) == visible_values(straight) == [40.0, 50.0]
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(resumed.sample(16, g1), straight.sample(16, g2))
    assert float(torch.load(where / "chunk-00000004.pt", weights_only=True)["x"][0, 0, 0]) == 40.0  # overwritten


def test_rollback_in_memory_has_the_same_semantics():
    pool = SamplePool(8, SHAPE)
    for v in range(1, 6):
        pool.add(chunk(v))
    pool.load_state_dict({"count": torch.tensor(3)})  # "checkpoint" at count 3
    assert visible_values(pool) == [2.0, 3.0]
    pool.add(chunk(7))
    assert visible_values(pool) == [3.0, 7.0]


def test_commit_deletes_only_chunks_no_resume_can_see(tmp_path):
    where = tmp_path / "pool"
    pool = SamplePool(8, SHAPE, where, teacher_hash="t")
    for v in range(1, 6):
        pool.add(chunk(v))
    assert files(where) == [f"chunk-0000000{i}.pt" for i in range(1, 6)] + ["pool.json"]  # add deletes nothing
    pool.commit(3)  # the checkpoint at count 3 sees 2 and 3: only 1 goes
    assert files(where) == [f"chunk-0000000{i}.pt" for i in range(2, 6)] + ["pool.json"]
    pool.commit()  # at count 5: 4 and 5 visible
    assert files(where) == ["chunk-00000004.pt", "chunk-00000005.pt", "pool.json"]
    assert visible_values(pool) == [4.0, 5.0]


def test_writes_are_atomic_a_failed_add_leaves_no_partial_file(tmp_path, monkeypatch):
    where = tmp_path / "pool"
    pool = SamplePool(8, SHAPE, where, teacher_hash="t")
    pool.add(chunk(1))
    real_save = torch.save

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a chunk")
        raise OSError("disk gone")

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk gone"):
        pool.add(chunk(2))
    monkeypatch.setattr(torch, "save", real_save)
    assert files(where) == ["chunk-00000001.pt", "pool.json"]  # no chunk 2, no temp file
    assert int(pool.count) == 1 and visible_values(pool) == [1.0]
    pool.add(chunk(2))
    assert visible_values(pool) == [1.0, 2.0]


def test_a_directory_of_another_teacher_or_shape_is_refused(tmp_path):
    where = tmp_path / "pool"
    SamplePool(8, SHAPE, where, teacher_hash="aaa").add(chunk(1))
    with pytest.raises(ConfigError, match=r"teacher 'aaa'.*new directory"):
        SamplePool(8, SHAPE, where, teacher_hash="bbb")
    with pytest.raises(ConfigError, match=r"input_shape \[1, 3\].*new directory"):
        SamplePool(8, (1, 4), where, teacher_hash="aaa")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "pool.json").write_text("{}")
    with pytest.raises(ConfigError, match="not a darkknowledge sample pool"):
        SamplePool(8, SHAPE, tmp_path / "other")
    same = SamplePool(8, SHAPE, where, teacher_hash="aaa")
    same.load_state_dict({"count": torch.tensor(1)})
    assert visible_values(same) == [1.0]


def test_bad_batches_are_refused():
    pool = SamplePool(8, SHAPE)
    with pytest.raises(ShapeError, match=r"\(1, 3\)"):
        pool.add(torch.zeros(4, 1, 4))
    with pytest.raises(ConfigError, match="at least one batch"):
        pool.add(torch.zeros(9, *SHAPE))
    pool.add(chunk(1))
    with pytest.raises(ShapeError, match="4 samples"):
        pool.add(chunk(2, rows=3))
    with pytest.raises(ConfigError, match="empty"):
        SamplePool(8, SHAPE).sample(2)


def test_sampling_is_determined_by_the_generator():
    pool = SamplePool(64, SHAPE)
    for v in range(4):
        pool.add(torch.randn(4, *SHAPE) + v)
    a = pool.sample(32, torch.Generator().manual_seed(11))
    b = pool.sample(32, torch.Generator().manual_seed(11))
    c = pool.sample(32, torch.Generator().manual_seed(12))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_open_reads_the_committed_window_read_only(tmp_path):
    where = tmp_path / "pool"
    pool = SamplePool(8, SHAPE, where, teacher_hash="t")
    for v in (1, 2, 3):
        pool.add(chunk(v))
    pool.commit()
    pool.add(chunk(4))  # not committed
    reader = SamplePool.open(where)
    assert reader.read_only and int(reader.count) == 3 and visible_values(reader) == [2.0, 3.0]
    assert len(reader) == 8
    with pytest.raises(ConfigError, match="read-only"):
        reader.add(chunk(5))
    with pytest.raises(ConfigError, match="teacher 't'"):
        SamplePool.open(where, teacher_hash="u")


def test_the_count_is_checkpointed_with_the_owning_module(tmp_path):
    owner = nn.Module()
    owner.pool = SamplePool(8, SHAPE)
    owner.pool.add(chunk(1))
    state = owner.state_dict()
    assert list(state) == ["pool.count"] and int(state["pool.count"]) == 1
    again = nn.Module()
    again.pool = SamplePool(8, SHAPE, tmp_path / "p", teacher_hash="t")
    again.load_state_dict(state)
    assert int(again.pool.count) == 1
