"""Config rules that only the rank count decides are checked when the trainer starts, as one
ConfigError, not at the first step: distributed KoLeo's groups must divide the gathered batch
(the high-res presets, 8 images per GPU in groups of 16, stopped with a ValueError traceback from
the KoLeo loss on 1, 3, 5 or 7 GPUs)."""

import pytest
from test_trainer_step import SMALL, SMOKE

from fastdino.config import ConfigError, load_config
from fastdino.train import Trainer, check_rank_count


def test_distributed_koleo_groups_must_divide_the_gathered_batch():
    cfg = load_config(SMOKE, ["koleo.distributed=true", "koleo.group_size=16",
                              "data.batch_size_per_gpu=8"])
    check_rank_count(cfg, 2)  # 16 images: one group
    check_rank_count(cfg, 4)
    with pytest.raises(ConfigError, match=r"koleo.group_size = 16 does not divide the gathered "
                       r"batch of 24 images \(data.batch_size_per_gpu=8 x 3 ranks\): allowed "
                       r"here are 8, 24"):
        check_rank_count(cfg, 3)
    # weight 0: no KoLeo is computed, nothing to check
    check_rank_count(load_config(SMOKE, ["koleo.distributed=true", "koleo.group_size=16",
                                         "data.batch_size_per_gpu=8", "koleo.loss_weight=0"]), 1)


def test_the_trainer_refuses_before_building_anything(tmp_path):
    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path}", "koleo.distributed=true",
                              "koleo.group_size=16", "data.batch_size_per_gpu=8"])
    with pytest.raises(ConfigError, match="allowed here are 8, or a rank count"):
        Trainer(cfg)


def test_a_first_start_that_fails_leaves_no_config(tmp_path):
    """The config is written before the build; a first start that fails (here the KoLeo rule)
    removed nothing, and the next start in that folder kept the failed one as a 'previous'
    config.<date>.yaml and logged its keys as changes."""
    cfg = load_config(SMOKE, [*SMALL, f"train.output_dir={tmp_path}", "koleo.distributed=true",
                              "koleo.group_size=16", "data.batch_size_per_gpu=8"])
    with pytest.raises(ConfigError):
        Trainer(cfg)
    assert list(tmp_path.iterdir()) == []


def test_every_rank_resumes_rank_0s_checkpoint(tmp_path, monkeypatch, caplog):
    """Each rank resolves `latest` itself; a rank with a stale view of a shared filesystem could
    load another iteration than the others. Rank 0's resolution is broadcast and used; a rank
    that cannot see it stops naming it."""
    import fastdino.dist as fdist
    from fastdino.train import same_checkpoint_on_every_rank

    ck0, ck1 = tmp_path / "iter_0000020", tmp_path / "iter_0000010"
    for ck in (ck0, ck1):
        ck.mkdir()
        (ck / "trainer_state.pt").write_bytes(b"")
    assert same_checkpoint_on_every_rank(ck1) == ck1  # one process: its own
    assert same_checkpoint_on_every_rank(None) is None
    monkeypatch.setattr(fdist, "broadcast_object", lambda obj: str(ck0))  # rank 0 saw iter 20
    with caplog.at_level("WARNING", logger="fastdino"):
        assert same_checkpoint_on_every_rank(ck1) == ck0
    assert "using rank 0's" in caplog.text
    (ck0 / "trainer_state.pt").unlink()
    with pytest.raises(FileNotFoundError, match="cannot read the checkpoint rank 0 resumes from"):
        same_checkpoint_on_every_rank(ck1)
