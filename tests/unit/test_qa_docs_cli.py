"""The command-line surface as documented: `fastdino --help` succeeds on stdout, every option of
`fastdino eval` / `fastdino curate` is described with its default, bad numbers are argparse's
one-line errors naming the flag (before any weights load), and curation's bad paths are one line
and exit 2 instead of a traceback."""

import argparse

import pytest

from fastdino import cli
from fastdino.curation import cli as curate_cli
from fastdino.eval import cli as eval_cli


def test_help_is_printed_on_stdout_with_success(capsys):
    for flag in ("--help", "-h"):
        assert cli.main([flag]) == 0
        out, err = capsys.readouterr()
        assert out.startswith("usage: fastdino {train|export|profile|eval|curate|health}")
        assert err == ""


def test_no_or_an_unknown_command_is_a_usage_error_naming_it(capsys):
    assert cli.main([]) == 2
    assert "give one of train, export" in capsys.readouterr().err
    assert cli.main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out.startswith("fastdino ")


def _subcommands(parser: argparse.ArgumentParser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            yield from action.choices.items()


@pytest.mark.parametrize("module", [eval_cli, curate_cli], ids=["eval", "curate"])
def test_every_option_is_described_and_shows_its_default(module):
    for name, sub in _subcommands(module.build_parser()):
        formatter = sub._get_formatter()
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{flag} has no help text"
            shown = formatter._get_help_string(action).replace("%(default)s", "<value>")
            if action.option_strings and action.default not in (None, False) \
                    and not action.required:
                assert "default" in shown, f"{flag}: its default is not shown"
            assert shown.count("default") <= 1, f"{flag}: the default is said twice: {shown}"


@pytest.mark.parametrize("argv, flag", [
    (["knn", "--data", "digits", "--batch-size", "0"], "--batch-size"),
    (["knn", "--data", "digits", "--num-workers", "-1"], "--num-workers"),
    (["knn", "--data", "digits", "--image-size", "0"], "--image-size"),
    (["linear", "--data", "digits", "--iterations", "0"], "--iterations"),
    (["seg", "--data", "x", "--lr", "-1"], "--lr"),
    (["depth", "--data", "x", "--crop", "0", "10"], "--crop"),
    (["pca", "--out", "o", "--resolution", "0", "img.jpg"], "--resolution"),
])
def test_eval_numbers_out_of_range_are_usage_errors(capsys, argv, flag):
    with pytest.raises(SystemExit) as e:
        eval_cli.build_parser().parse_args([*argv, "--weights", "random"])
    assert e.value.code == 2
    assert f"argument {flag}:" in capsys.readouterr().err


def test_curate_numbers_out_of_range_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as e:
        curate_cli.build_parser().parse_args(["sample", "C", "--n", "0", "--out", "x.txt"])
    assert e.value.code == 2
    assert "argument --n: 0 is invalid: allowed is an integer > 0" in capsys.readouterr().err


def test_curate_bad_paths_are_one_line_errors(tmp_path, capsys):
    missing = str(tmp_path / "nope")
    assert curate_cli.main(["sample", missing, "--n", "3", "--out",
                            str(tmp_path / "x.txt")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdino curate sample: error: ") and "meta.json" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert curate_cli.main(["cluster", missing, "--clusters", "3", "--out",
                            str(tmp_path / "C")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastdino curate cluster: error: ") and len(err.splitlines()) == 1
    assert "not a `fastdino curate embed` folder" in err
