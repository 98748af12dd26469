"""`fastdino profile --help` names the command as users run it (the console script exists)."""

import pytest

from fastdino.cli import main


def test_profile_help_names_fastdino_profile(capsys):
    with pytest.raises(SystemExit) as e:
        main(["profile", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastdino profile")
    assert "`fastdino profile --config" in out and "later" not in out
