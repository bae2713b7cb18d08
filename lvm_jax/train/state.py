"""Train state, the objective protocol, and the training configuration."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
from flax.training import train_state

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """flax TrainState plus `model_state`: non-parameter collections such as BatchNorm
    statistics or EMA codebook sums ({} for models without them)."""

    model_state: Any = flax.struct.field(default_factory=dict)


def _identity(batch):
    return batch


@dataclasses.dataclass(frozen=True)
class Objective:
    """All that `fit` knows of a model.

    Attributes:
      init: (rng, batch) -> variables {"params": ..., other collections}; `batch`
        is already preprocessed.
      loss: (params, model_state, batch, rng, train) -> (loss, (metrics, new_model_state));
        `loss` a scalar, `metrics` a dict of scalar batch means, `train` a Python bool.
      preprocess: applied to each raw batch inside the compiled step (e.g. uint8 -> [-1, 1]).
      units: metric name -> unit, written into summary.json.
    """

    init: Callable
    loss: Callable
    preprocess: Callable = _identity
    units: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def stateless(cls, init: Callable, loss_fn: Callable, **kwargs) -> "Objective":
        """From a pure `loss_fn(params, batch, rng) -> (loss, metrics)` of a model with
        parameters only (the DESIGN.md §2 signature)."""

        def loss(params, model_state, batch, rng, train):
            del train  # no behaviour differs between training and evaluation
            value, metrics = loss_fn(params, batch, rng)
            return value, (metrics, model_state)

        return cls(init=init, loss=loss, **kwargs)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Hyperparameters of the training loop (the model's live in the objective).

    Attributes:
      epochs: passes over the training set; a trailing partial batch is dropped
        and the data reshuffled each epoch.
      batch_size: global batch, split over the devices of the mesh.
      learning_rate: Adam step size, used when `fit` gets no optimizer.
      seed: the run is reproducible from it.
      steps_per_call: training steps compiled into one `lax.scan` call; the
        progress bar and `metrics.csv` are updated after each call. Use 1 for
        convolutional models on CPU, where XLA runs convolutions inside loops
        many times slower (jax-ml/jax#12868); 100 elsewhere.
      eval_batch_size: batch size of test-set evaluation.
      progress: show a tqdm progress bar.
    """

    epochs: int = 10
    batch_size: int = 128
    learning_rate: float = 1e-3
    seed: int = 0
    steps_per_call: int = 100
    eval_batch_size: int = 500
    progress: bool = True

    # Changing these between a run and its resumption keeps the result identical.
    RESUMABLE = ("epochs", "steps_per_call", "eval_batch_size", "progress")
