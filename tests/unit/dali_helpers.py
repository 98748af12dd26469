"""What the tests that run DALI share: whether it is installed (`needs_dali` skips a test with the
reason when not) and its CPU image decoder on one encoded image (`cpu_decode`: what the DALI
loader's decoder makes of the bytes the probe hands it)."""

from __future__ import annotations

import numpy as np
import pytest

try:
    import nvidia.dali  # noqa: F401

    HAVE_DALI = True
except ImportError:
    HAVE_DALI = False
needs_dali = pytest.mark.skipif(not HAVE_DALI, reason="NVIDIA DALI is not installed "
                                "(pip install 'fastdino[dali]'): the DALI pipeline is not "
                                "testable here (the host-side plan tests still run)")


def cpu_decode(encoded) -> np.ndarray:
    """[H, W, 3] uint8: DALI's CPU decoder (RGB, no EXIF rotation) on one encoded image."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        data = fn.external_source(name="encoded", dtype=types.UINT8)
        return fn.decoders.image(data, device="cpu", output_type=types.RGB,
                                 adjust_orientation=False)

    pipe = decode()
    pipe.build()
    pipe.feed_input("encoded", [np.frombuffer(bytes(encoded), np.uint8)])
    return np.array(pipe.run()[0][0])
