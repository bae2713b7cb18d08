"""Shared test settings: float32 CPU JAX, as the library uses."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
