"""fastdino benchmark and verification harness (`python -m bench`)."""
