"""`fastdino curate cluster --impl triton` where Triton cannot run: one line naming the flag the
user typed (not the trainer's kernels.impl key), exit 2, before any clustering starts."""

import numpy as np

from fastdino.curation.cli import main
from fastdino.curation.embed import EMBEDDINGS


def test_impl_triton_where_it_cannot_run_names_the_flag(tmp_path, monkeypatch, capsys):
    import fastdino.kernels._utils as utils

    import fastdino.layers.select as select

    monkeypatch.setattr(utils, "can_run_triton", lambda x: False)  # as without the package
    monkeypatch.setattr(select, "triton_available", lambda: False)
    E = tmp_path / "E"
    E.mkdir()
    np.save(E / EMBEDDINGS, np.random.default_rng(0).standard_normal((12, 8)).astype(np.float16))
    rc = main(["cluster", str(E), "--clusters", "3", "--impl", "triton", "--device", "cpu",
               "--out", str(tmp_path / "C")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert "--impl triton cannot run here: triton is not installed" in err[0]
    assert "allowed here is --impl auto | torch" in err[0]
    assert not (tmp_path / "C").exists()
