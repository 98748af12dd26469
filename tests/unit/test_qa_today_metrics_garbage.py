"""A crash can leave arbitrary bytes at the end of metrics.jsonl (blocks allocated but not yet
written on some filesystems): a resume drops them as a cut-short line instead of stopping with a
UnicodeDecodeError (every start of the run failed until the file was edited by hand)."""

from __future__ import annotations

from fastdino.metrics import drop_redone_lines


def test_undecodable_bytes_after_a_crash_are_dropped_not_fatal(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"iteration": 1, "total_loss": 2.0}\n{"iteration": 2, "total_loss": 1.5}\n'
                     b'\xff\xfe\x80garbage\x00\x9c\n')
    assert drop_redone_lines(path, 1) == 2  # iteration 2 (redone) and the garbage
    assert path.read_text() == '{"iteration": 1, "total_loss": 2.0}\n'
