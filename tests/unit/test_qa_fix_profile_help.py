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


def test_profile_build_errors_are_one_line_usage_errors(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # CPU: Triton cannot run here
    with pytest.raises(SystemExit) as e:
        main(["profile", "--config", "smoke", "--steps", "1", "--warmup", "0",
              "kernels.impl=triton", "model.arch=vit_test"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith(
        "fastdino profile: error: config error: config key 'kernels.impl' = 'triton'")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(SystemExit) as e:
        main(["profile", "--config", "smoke", "--steps", "1", "--warmup", "0",
              "model.arch=vit_test", f"data.homogeneous_root={tmp_path / 'nope'}"])
    assert e.value.code == 2
    assert "data.homogeneous_root" in capsys.readouterr().err.strip().splitlines()[-1]
