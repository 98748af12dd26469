"""`fastdino health RUN` reads finished runs as they were written: a config.yaml that a later
fastdino refuses (a whole-config rule added since, a key renamed since) still gives its run's
thresholds, and a run folder without config.yaml is one line, exit 2 (it was a traceback)."""

import json
import math

import pytest
import yaml

from fastdino.config import load_config, save_config
from fastdino.health import main


def _run(tmp_path, edit=None):
    """A smoke run folder (K = 1024, warm-up 20 iterations) whose DINO targets stay uniform."""
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config("smoke"), run / "config.yaml")
    if edit is not None:
        data = yaml.safe_load((run / "config.yaml").read_text())
        edit(data)
        (run / "config.yaml").write_text(yaml.safe_dump(data))
    lines = [{"iteration": it, "dino_teacher_entropy": math.log(1024)} for it in range(5, 60, 5)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return run


def test_a_config_a_later_rule_refuses_is_read_as_written(tmp_path, capsys):
    run = _run(tmp_path, lambda d: d["crops"].update(local_crops_size=8))
    assert main([str(run)]) == 1
    out, err = capsys.readouterr()
    assert "uniform_teacher (since 35)" in out and err == ""


def test_a_config_that_no_longer_loads_gives_the_keys_the_checks_need(tmp_path, capsys, caplog):
    """An unknown key (renamed since): dropped with a warning by load_unvalidated, and K = 1024 is
    still read from the file (with the default K = 65,536 the entropy ln 1024 is far from uniform
    and nothing would be reported)."""
    run = _run(tmp_path, lambda d: d["model"].update(renamed_key=1))
    assert main([str(run)]) == 1
    out = capsys.readouterr().out
    assert "uniform_teacher (since 35)" in out
    assert "ignoring keys this version of fastdino does not have: model.renamed_key" \
        in caplog.text


def test_a_run_without_config_is_a_usage_error(tmp_path, capsys):
    run = _run(tmp_path)
    (run / "config.yaml").unlink()
    with pytest.raises(SystemExit) as e:
        main([str(run)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "config.yaml does not exist" in err and "Traceback" not in err
