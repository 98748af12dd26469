"""The rank layout of co-distillation with students on their own ranks (codistill_ranks.py):
which images move where (every student rank gets exactly its contiguous slice of the global
batch, every rank's images reach exactly one rank of each student), and the layout checks."""

from __future__ import annotations

import pytest
from test_trainer_step import SMOKE

from fastdino.codistill_ranks import check_layout, plan
from fastdino.config import ConfigError, load_config


@pytest.mark.parametrize("sizes,B", [([1, 1], 2), ([2, 1], 2), ([4, 2, 2], 3), ([3, 1], 3),
                                     ([1], 5), ([2, 3, 1], 1)])
def test_plan_gives_each_student_rank_its_slice_and_each_image_to_every_student(sizes, B):
    world = sum(sizes)
    G, pieces = B * world, plan(sizes, B)
    start = 0
    for n in sizes:
        m = G // n
        for j in range(n):  # this student rank: pieces in order tile [j·m, (j+1)·m) exactly
            mine = [p for p in pieces if p.dst == start + j]
            assert [(p.lo, p.hi) for p in mine][0][0] == j * m and mine[-1].hi == (j + 1) * m
            assert all(a.hi == b.lo for a, b in zip(mine, mine[1:], strict=False))
            assert all(p.src * B <= p.lo < p.hi <= (p.src + 1) * B for p in mine)  # src holds it
        # every global image reaches exactly one rank of this student
        got = sorted(i for p in pieces if start <= p.dst < start + n for i in range(p.lo, p.hi))
        assert got == list(range(G))
        start += n


def _students(*stages):
    cfgs = [load_config(SMOKE, [f"deepspeed.zero_stage={s}"]) for s in stages]
    return [(f"s{i}", c) for i, c in enumerate(cfgs)]


def test_check_layout_names_what_is_wrong():
    assert check_layout(_students(2, 1, 0), [4, 2, 2], 3, 8) == [6, 12, 12]
    with pytest.raises(ConfigError, match=r"sum to 3 ranks but the run has 4.*s0, s1"):
        check_layout(_students(2, 2), [2, 1], 2, 4)
    with pytest.raises(ConfigError, match=r"global batch of 8 images .* s1: 3 ranks"):
        check_layout(_students(2, 2), [1, 3], 2, 4)
    with pytest.raises(ConfigError, match="student s1 has deepspeed.zero_stage=3"):
        check_layout(_students(2, 3), [1, 1], 2, 2)


def test_student_ranks_config_rule():
    with pytest.raises(ConfigError, match="student_ranks.*empty, or 2 rank counts"):
        load_config(SMOKE, ["distillation.enabled=true", "distillation.teacher=t",
                            "distillation.students=[a.yaml]", "distillation.student_ranks=[1]"])
    with pytest.raises(ConfigError, match="rank counts >= 1"):
        load_config(SMOKE, ["distillation.enabled=true", "distillation.teacher=t",
                            "distillation.students=[a.yaml]", "distillation.student_ranks=[2,0]"])
    with pytest.raises(ConfigError, match="empty unless distillation.students"):
        load_config(SMOKE, ["distillation.enabled=true", "distillation.teacher=t",
                            "distillation.student_ranks=[2]"])


def test_balance_report_names_the_slowest_student_and_proportional_ranks():
    from fastdino.codistill import balance_report

    assert balance_report(["main", "b"], [4, 4], [0.40, 0.38]) is None  # within 10 %
    line = balance_report(["main", "b", "s"], [4, 2, 2], [0.40, 0.20, 0.20])
    # work (time x ranks) 1.6 : 0.4 : 0.4 of 8 ranks -> 5.33 : 1.33 : 1.33 -> [6, 1, 1]; the
    # two fast students idle half of their 4 ranks' time: 25 % of the GPU time
    assert "waits for the slowest (main)" in line and "25% of the ranks' time idles" in line
    assert "about [6, 1, 1]" in line and "main 0.400 s on 4 ranks" in line
    assert "already follow the work" in balance_report(["a", "b"], [1, 1], [1.0, 0.1])  # >= 1
