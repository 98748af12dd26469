"""tests/gpu needs CUDA: every test here is skipped, with the reason below, on a machine without
it (CI). On the GPU machine they run through bench/device_check.sh."""

import pytest
import torch

REASON = ("needs CUDA (torch.cuda.is_available() is False); tests/gpu runs on a GPU machine, "
          "e.g. through bench/device_check.sh")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    here = str(__import__("pathlib").Path(__file__).resolve().parent)
    for item in items:
        if str(item.path).startswith(here):
            item.add_marker(pytest.mark.skip(reason=REASON))
