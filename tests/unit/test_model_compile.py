"""`model.compile`: each block torch.compiled in place, with and without activation
checkpointing, gives the eager backbone's outputs and gradients; a block whose compile fails runs
eagerly when `model.compile_fallback` is on and stops the run when it is off (USERS.md §6:
"compile per block with a tested AC + compile policy and an automatic eager fallback").

CPU: the aot_eager backend (dynamo + AOT autograd, no code generation: inductor's C++ build is
too slow for a unit test); inductor code generation itself is not exercised by the CPU tests."""

from __future__ import annotations

import pytest
import torch
import torch._dynamo

from fastdino.config import load_config
from fastdino.models import build_backbone

_FAIL_BACKEND = "fastdino_test_failing_backend"


@torch._dynamo.register_backend(name=_FAIL_BACKEND)
def _failing_backend(gm, example_inputs):
    raise RuntimeError("this backend always fails (test)")


def _cfg(**over):
    # train mode without randomness: no drop path, no RoPE rescale jitter
    base = {"model.arch": "vit_test", "model.drop_path_rate": 0.0, "model.rope_rescale": "null",
            "model.attn_impl": "torch"}
    base.update(over)
    return load_config(None, [f"{k}={v}" for k, v in base.items()]).model


def _run(model, seed=0):
    torch.manual_seed(seed)
    x = [torch.randn(2, 3, 32, 32), torch.randn(3, 3, 16, 16)]
    outs = model.forward_features(x)
    loss = sum((o["x_norm_patchtokens"] ** 2).sum() + o["x_norm_clstoken"].sum() for o in outs)
    loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return [o["x_norm_patchtokens"].detach() for o in outs], grads


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    saved = torch._dynamo.config.suppress_errors
    yield
    torch._dynamo.config.suppress_errors = saved
    torch._dynamo.reset()


@pytest.mark.parametrize("ac", [False, True])
def test_compiled_blocks_match_eager(ac):
    torch.manual_seed(0)
    eager = build_backbone(_cfg(**{"model.activation_checkpointing": ac})).train()
    # no fallback here: a compile failure must fail this test, not run eagerly
    compiled = build_backbone(_cfg(**{"model.activation_checkpointing": ac, "model.compile": True,
                                      "model.compile_backend": "aot_eager",
                                      "model.compile_fallback": False})).train()
    compiled.load_state_dict(eager.state_dict())
    assert all(blk._compiled_call_impl is not None for blk in compiled.blocks)
    torch._dynamo.utils.counters.clear()
    want, got = _run(eager), _run(compiled)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # compiled code ran
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_failed_compile_falls_back_to_eager():
    torch.manual_seed(0)
    eager = build_backbone(_cfg()).train()
    model = build_backbone(_cfg(**{"model.compile": True,
                                   "model.compile_backend": _FAIL_BACKEND})).train()
    model.load_state_dict(eager.state_dict())
    want, got = _run(eager), _run(model)  # no exception: every block ran eagerly
    for a, b in zip(got[0] + got[1], want[0] + want[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_failed_compile_stops_without_fallback():
    model = build_backbone(_cfg(**{"model.compile": True, "model.compile_backend": _FAIL_BACKEND,
                                   "model.compile_fallback": False})).train()
    with pytest.raises(Exception, match="always fails"):
        _run(model)


def test_unknown_backend_is_named():
    with pytest.raises(ValueError, match="'no_such_backend' is not a torch.compile backend"):
        build_backbone(_cfg(**{"model.compile": True, "model.compile_backend": "no_such_backend"}))
