"""Train state, the objective protocol, and the training configuration."""

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

Metrics = dict[str, jax.Array]


class TrainState(train_state.TrainState):
    """flax TrainState plus `model_state`, the non-parameter collections (BatchNorm
    statistics, EMA codebook sums; {} for models without them), and `ema_params`, an
    exponential moving average of the parameters (None when not kept)."""

    model_state: Any = flax.struct.field(default_factory=dict)
    ema_params: Any = None

    @property
    def eval_params(self):
        """The parameters to evaluate and sample with: the EMA when kept."""
        return self.params if self.ema_params is None else self.ema_params

    def update_ema(self, decay: float) -> "TrainState":
        """ema <- d * ema + (1 - d) * params, with d = min(decay, (1 + t) / (10 + t)) at step t
        so that early averages are not dominated by the initialisation."""
        t = jnp.asarray(self.step, jnp.float32)
        d = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        return self.replace(ema_params=optax.incremental_update(self.params, self.ema_params, 1.0 - d))


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
    def stateless(cls, init: Callable, loss_fn: Callable, eval_loss_fn: Callable | None = None,
                  **kwargs) -> "Objective":
        """From a pure `loss_fn(params, batch, rng) -> (loss, metrics)` of a model with
        parameters only (the DESIGN.md §2 signature); `eval_loss_fn`, same signature,
        replaces it in evaluation (e.g. more Monte Carlo samples for a tighter estimate)."""

        def loss(params, model_state, batch, rng, train):
            fn = loss_fn if train or eval_loss_fn is None else eval_loss_fn
            value, metrics = fn(params, batch, rng)
            return value, (metrics, model_state)

        return cls(init=init, loss=loss, **kwargs)


# The field metadata of a setting that a resumed run may change: how long or how the
# process runs (epochs, the progress bar), or the learning rate from here on, rather than
# what has been trained. A resume compares every other setting with config.json's.
MAY_CHANGE_ON_RESUME = {"may_change_on_resume": True}


def may_change_on_resume(config: type) -> tuple[str, ...]:
    """The fields of the dataclass type `config` that a resumed run may change (declared
    with `MAY_CHANGE_ON_RESUME` in their metadata)."""
    return tuple(f.name for f in dataclasses.fields(config)
                 if f.metadata.get("may_change_on_resume"))


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
      eval_batch_size: batch size of test-set evaluation; a batch splits over the
        devices when their number divides it, else runs whole on each.
      grad_clip_norm: clip the global gradient norm to this before the optimizer
        (None: off); keeps ill-posed objectives such as a learned-variance
        Gaussian decoder on images from diverging.
      ema_decay: keep an exponential moving average of the parameters with this
        decay and evaluate, checkpoint and sample with it (None: off).
      progress: show a tqdm progress bar.
      checkpoint_interval: seconds at least between the checkpoints taken at the ends of
        epochs (0: every epoch), as orbax's `ContinuousCheckpointingPolicy` decides; the last
        epoch, a signal and a non-finite stop always save. A resumed run redoes the epochs
        since its checkpoint, to the same numbers.
    """

    epochs: int = dataclasses.field(default=10, metadata=MAY_CHANGE_ON_RESUME)
    batch_size: int = 128
    learning_rate: float = dataclasses.field(default=1e-3, metadata=MAY_CHANGE_ON_RESUME)
    seed: int = 0
    steps_per_call: int = dataclasses.field(default=100, metadata=MAY_CHANGE_ON_RESUME)
    eval_batch_size: int = dataclasses.field(default=500, metadata=MAY_CHANGE_ON_RESUME)
    grad_clip_norm: float | None = None
    ema_decay: float | None = None
    progress: bool = dataclasses.field(default=True, metadata=MAY_CHANGE_ON_RESUME)
    checkpoint_interval: float = dataclasses.field(default=0.0, metadata=MAY_CHANGE_ON_RESUME)
