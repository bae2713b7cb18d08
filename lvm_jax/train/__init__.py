"""The generic trainer: it knows objectives, never models."""

from lvm_jax.errors import CheckpointError, ConfigError, NonFiniteLossError, WorkdirError
from lvm_jax.train.checkpoint import Checkpointer
from lvm_jax.train.loop import FitResult, device_description, fit
from lvm_jax.train.state import Objective, TrainConfig, TrainState
from lvm_jax.train.steps import evaluate_test_set, initial_state

__all__ = ["CheckpointError", "Checkpointer", "ConfigError", "FitResult", "NonFiniteLossError",
           "Objective", "TrainConfig", "TrainState", "WorkdirError", "device_description",
           "evaluate_test_set", "fit", "initial_state"]
