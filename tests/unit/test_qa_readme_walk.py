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


def test_device_check_summary_is_this_runs_alone(tmp_path):
    # README: `bash bench/device_check.sh --out DIR`. Its stages append to their logs, so in a
    # reused --out (the default bench/results) a second run's summary counted the first run's
    # parity lines too (a FAIL fixed since stayed in it) and gave a "pytest:" line of a stage
    # it did not run
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).parents[2]
    out = tmp_path / "out"
    out.mkdir()
    (out / "check.log").write_text("dino_loss  case  triton  float32  forward  1  2  3  4  FAIL\n")
    (out / "pytest.log").write_text("3 failed, 1 passed in 1.00s\n")
    proc = subprocess.run(
        ["bash", str(repo / "bench/device_check.sh"), "--out", str(out), "--budget", "120",
         "--python", sys.executable, "--stages", "check", "--ops", "selftest"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = (out / "summary.txt").read_text()
    check = next(line for line in summary.splitlines() if line.startswith("check: "))
    assert " 0 FAIL" in check and " 0 PASS" not in check, summary
    assert "pytest:" not in summary and "FAIL" not in (out / "check.log").read_text()


def test_export_of_a_run_without_a_checkpoint_yet_says_so(tmp_path, capsys):
    # README: "fastdino export --run <output_dir>"; a run writes its config.yaml first, so a run
    # stopped before its first checkpoint (a second Ctrl-C) is a folder of config.yaml and
    # metrics.jsonl: the error named "weights" and the formats a folder could hold instead
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model:\n  arch: vit_test\n")
    (run / "metrics.jsonl").write_text('{"iteration": 3}\n')
    with pytest.raises(SystemExit) as e:
        cli.main(["export", "--run", str(run), "--out", str(tmp_path / "t.pth")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--run {str(run)!r} is a training run without a checkpoint yet" in err


@pytest.mark.parametrize("outcome", ["report", "error"])
def test_profile_leaves_no_run_folder_behind(tmp_path, monkeypatch, capsys, outcome):
    # README: `python -m fastdino.profile --config ...`; each profile made a run folder
    # (train.output_dir, its config.yaml) under the temp dir and left it there
    import tempfile

    from fastdino import profile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def fake_profile(cfg, steps, warmup, fixed_batch):
        assert list(tmp_path.glob("fastdino-profile-*")) == [tmp_path / cfg.train.output_dir]
        if outcome == "error":
            raise FileNotFoundError("data.root='/nowhere' does not exist")
        return {}

    monkeypatch.setattr(profile, "profile", fake_profile)
    monkeypatch.setattr(profile, "format_report", lambda r: "report")
    if outcome == "error":
        with pytest.raises(SystemExit):
            profile.main(["--config", "smoke", "--steps", "1"])
    else:
        assert profile.main(["--config", "smoke", "--steps", "1"]) == 0
    assert list(tmp_path.glob("fastdino-profile-*")) == []


def test_bench_step_leaves_no_run_folder_behind(tmp_path, monkeypatch, capsys):
    # README: `python -m bench step`; each row made a run folder under the temp dir and left it
    import tempfile

    import fastdino.profile
    from bench import bench_step

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def fake_profile(cfg, steps, warmup, fixed_batch):
        seen.append(cfg.train.output_dir)
        assert list(tmp_path.glob("bench-step-*")) == [tmp_path / cfg.train.output_dir]
        raise RuntimeError("stop here")

    monkeypatch.setattr(fastdino.profile, "profile", fake_profile)
    monkeypatch.setattr(bench_step.torch.cuda, "is_available", lambda: False)
    assert bench_step.main(["--no-save", "--steps", "1"]) == 1  # the row's error, reported
    assert len(seen) == 1 and list(tmp_path.glob("bench-step-*")) == []
