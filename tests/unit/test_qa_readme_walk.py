"""What a new user meets walking README.md top to bottom: `fastdino <command> --help` describes
the command they typed."""

import pytest

from fastdino import cli


def test_train_help_names_the_fastdino_train_command(capsys):
    # README: "`fastdino <command> --help` their options"; the usage line of `fastdino train`
    # named the console script alone ("usage: fastdino [-h] ..."), as if the options were
    # fastdino's own
    with pytest.raises(SystemExit) as e:
        cli.main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastdino train [-h]")
    assert "preset's name" in " ".join(out.split())  # --config: yaml or preset name
