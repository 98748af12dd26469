"""fastdino/rank_logging.py: rank 0 prints what holds on every rank; the other ranks print only
errors and the warnings about their own condition, tagged with their rank."""

import io
import logging

import pytest

from fastdino import rank_logging


@pytest.fixture
def capture():
    """A logger whose one handler carries the filter, as train.main() installs it."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.addFilter(rank_logging.MainRankInfo())
    log = logging.getLogger("fastdino.test_rank_logging")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    yield log, stream
    log.removeHandler(handler)


def _as_rank(monkeypatch, rank: int):
    monkeypatch.setattr(rank_logging.fdist, "is_main_process", lambda: rank == 0)
    monkeypatch.setattr(rank_logging, "_world_rank", lambda: rank)


def _emit_all(log):
    log.info("schedule: 10 iterations")
    log.warning("train.resume=none: starting over checkpoints")
    log.warning("skipped unreadable image a.jpg", extra=rank_logging.EVERY_RANK)
    log.error("out of GPU memory")


def test_rank_zero_prints_every_line_untagged(capture, monkeypatch):
    log, stream = capture
    _as_rank(monkeypatch, 0)
    _emit_all(log)
    assert stream.getvalue().splitlines() == [
        "INFO schedule: 10 iterations",
        "WARNING train.resume=none: starting over checkpoints",
        "WARNING skipped unreadable image a.jpg",
        "ERROR out of GPU memory",
    ]


def test_other_ranks_print_their_own_warnings_and_errors_tagged(capture, monkeypatch):
    log, stream = capture
    _as_rank(monkeypatch, 5)
    _emit_all(log)
    # the info line and the warning that holds on every rank alike are rank 0's to print
    assert stream.getvalue().splitlines() == [
        "WARNING [rank 5] skipped unreadable image a.jpg",
        "ERROR [rank 5] out of GPU memory",
    ]


def test_a_record_through_two_handlers_is_tagged_once(capture, monkeypatch):
    log, stream = capture
    second = io.StringIO()
    handler = logging.StreamHandler(second)
    handler.addFilter(rank_logging.MainRankInfo())
    log.addHandler(handler)
    try:
        _as_rank(monkeypatch, 3)
        log.error("disk full")
    finally:
        log.removeHandler(handler)
    assert stream.getvalue() == "ERROR [rank 3] disk full\n"
    assert second.getvalue() == "[rank 3] disk full\n"


def test_install_adds_the_filter_once(monkeypatch):
    root = logging.getLogger()
    handler = logging.StreamHandler(io.StringIO())
    monkeypatch.setattr(root, "handlers", [handler])
    rank_logging.install()
    rank_logging.install()
    assert sum(isinstance(f, rank_logging.MainRankInfo) for f in handler.filters) == 1


@pytest.mark.parametrize("rank", [1, 2])
def test_one_waiting_rank_says_it_waits_for_rank_zeros_conversion(tmp_path, monkeypatch, caplog,
                                                                   rank):
    """Ranks 1..N-1 wait on the filesystem while rank 0 converts a checkpoint (parallel.py): rank
    1 says so for all of them (an EVERY_RANK line, or the filter would drop it), the others
    stay quiet."""
    from fastdino import parallel

    done, failed = tmp_path / "done", tmp_path / "failed"
    clock = iter(range(0, 10_000, 61))  # a minute passes between polls
    monkeypatch.setattr(parallel.time, "monotonic", lambda: next(clock))
    polls = []

    def sleep(_s):
        polls.append(1)
        if len(polls) == 3:
            done.write_text("")

    monkeypatch.setattr(parallel.time, "sleep", sleep)
    monkeypatch.setattr(parallel.fdist, "get_rank", lambda: rank)
    with caplog.at_level(logging.WARNING, logger="fastdino"):
        parallel._wait_for_conversion(done, failed)
    said = [r for r in caplog.records if "waiting for rank 0" in r.getMessage()]
    if rank == 1:
        assert len(said) == 3 and all(getattr(r, "every_rank", False) for r in said)
    else:
        assert said == []


def test_a_students_rank_zero_tags_its_own_warnings_and_errors(capture, monkeypatch):
    """Co-distillation: each student's rank 0 (world rank 4 here) is a main process and prints
    its info lines, but its own warnings (an unreadable image in its shard) and its errors are
    tagged with the world rank as any other rank's: two students' skip lines must not read the
    same."""
    log, stream = capture
    monkeypatch.setattr(rank_logging.fdist, "is_main_process", lambda: True)
    monkeypatch.setattr(rank_logging, "_world_rank", lambda: 4)
    _emit_all(log)
    assert stream.getvalue().splitlines() == [
        "INFO schedule: 10 iterations",
        "WARNING train.resume=none: starting over checkpoints",
        "WARNING [rank 4] skipped unreadable image a.jpg",
        "ERROR [rank 4] out of GPU memory",
    ]
