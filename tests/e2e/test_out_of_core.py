"""A party whose table is larger than its memory trains from a memory-mapped .npy (issue 25): its node runs
in a cgroup whose memory limit is below the file size, with the page cache dropped first. Reading the
same file whole under the same limit is killed, which shows the limit bites."""
from __future__ import annotations

import pytest

from benchmarks.bank import out_of_core
from benchmarks.memory_limit import unavailable

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.mark.skipif(unavailable() is not None, reason=f"{unavailable()}")
def test_a_party_trains_from_a_memory_mapped_file_larger_than_its_memory_limit(tmp_path):
    result = out_of_core(tmp_path / "data", rows=250_000, features=1_000, limit_mib=640, steps=20, work=tmp_path)
    assert result["file_mib"] > result["limit_mib"]
    assert result["exit_codes"] == {"party0": 0, "party1": 0}, result["log_tail"]
    assert not result["oom_killed"]
    assert result["cgroup_peak_mib"] <= result["limit_mib"]
    assert result["whole_read_killed_under_same_limit"]
    assert result["eval"]["samples"] == 12_500 and result["eval"]["auroc"] > 0.6  # it learned from the mapped rows
