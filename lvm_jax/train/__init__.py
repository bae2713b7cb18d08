"""The generic trainer: it knows objectives, never models."""

from lvm_jax.train.checkpoint import CheckpointError, Checkpointer
from lvm_jax.train.loop import (FitResult, NonFiniteLossError, device_description, fit,
                                initial_state)
from lvm_jax.train.state import Objective, TrainConfig, TrainState

__all__ = ["CheckpointError", "Checkpointer", "FitResult", "NonFiniteLossError", "Objective",
           "TrainConfig", "TrainState", "device_description", "fit", "initial_state"]
