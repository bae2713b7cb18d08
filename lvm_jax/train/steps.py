"""The compiled pieces of training: the initial state, the training chunk, the evaluation.

Each compiled call runs `steps_per_call` optimizer steps as one `lax.scan` over batches
read on the device (`lvm_jax.train.feeds`). Batches are split over the `data` axis of the
mesh and parameters replicated; XLA inserts the gradient all-reduce (DESIGN.md §4).
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lvm_jax.data import batching
from lvm_jax.train.state import Objective, TrainConfig, TrainState


def keys(seed: int) -> tuple:
    """(init, train, eval) keys of a run: its data order and noise derive from them."""
    init_key, train_key, eval_key = jax.random.split(jax.random.key(seed), 3)
    return init_key, train_key, eval_key


def initial_state(objective: Objective, example: np.ndarray, config: TrainConfig,
                  tx: optax.GradientTransformation | None = None) -> TrainState:
    """The TrainState `fit` starts from, and the target a checkpoint restores into.

    Args:
      objective: the model's init and loss.
      example: one stored example batch (1, ...), e.g. `dataset.train[:1]`.
      config: the run's TrainConfig (seed, optimizer, clipping, EMA).
      tx: optimizer, default Adam(config.learning_rate); preceded by gradient clipping
        when config.grad_clip_norm is set.
    """
    init_key = keys(config.seed)[0]
    example = objective.preprocess(jnp.asarray(example))
    variables = jax.jit(objective.init)(init_key, example)  # one compiled op, not hundreds
    params = variables.pop("params")
    tx = tx or optax.adam(config.learning_rate)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return TrainState.create(apply_fn=None, params=params, tx=tx, model_state=variables,
                             ema_params=params if config.ema_decay is not None else None)


def make_train_chunk(objective: Objective, mesh, ema_decay: float | None = None, read=None):
    """jit((state, data, idx (n, batch), key) -> (state, metrics stacked over n steps)).

    `data` from `batching.put_host_shard`, `idx` from `batching.put_host_indices`; or
    with `read` (a feed's, `lvm_jax.train.feeds`), step i trains on read(data, idx[i]).
    """
    read = read or (lambda data, idx: batching.gather_host_shard(data, idx, mesh))

    def step(state, idx, data, key):
        batch = objective.preprocess(read(data, idx))
        rng = jax.random.fold_in(key, state.step)

        def loss_of(params):
            return objective.loss(params, state.model_state, batch, rng, True)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params)
        # Named so that a profile (benchmarks.profile_step, TensorBoard) tells the optimizer's
        # operations from the model's: op_name ".../optimizer/...".
        with jax.named_scope("optimizer"):
            state = state.apply_gradients(grads=grads, model_state=model_state)
            if ema_decay is not None:
                state = state.update_ema(ema_decay)
        return state, {"loss": loss, "grad_norm": optax.tree.norm(grads), **metrics}

    @jax.jit
    def chunk(state, data, idx, key):
        if idx.shape[0] == 1:
            # One step needs no loop, and XLA:CPU runs convolutions inside loop
            # bodies many times slower than outside (jax-ml/jax#12868).
            state, metrics = step(state, idx[0], data, key)
            return state, jax.tree.map(lambda v: v[None], metrics)
        return jax.lax.scan(lambda s, i: step(s, i, data, key), state, idx)

    return chunk


# A partial last evaluation batch is cut into its largest multiple of this and the rest,
# so that most of it splits over up to 8 devices (the CPU split of `lvm_jax.cpu_devices`,
# a TPU v2-8) instead of running whole on each; cut the same way on any number of devices,
# it draws the same noise on all.
EVAL_ALIGNMENT = 8


def eval_batches(num_examples: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of the evaluation batches: `batch_size` examples each, then the rest,
    cut into its largest multiple of EVAL_ALIGNMENT and the fewer than EVAL_ALIGNMENT left."""
    batches = [(start, start + batch_size)
               for start in range(0, num_examples - batch_size + 1, batch_size)]
    start = len(batches) * batch_size
    cut = start + (num_examples - start) // EVAL_ALIGNMENT * EVAL_ALIGNMENT
    return batches + [(a, b) for a, b in ((start, cut), (cut, num_examples)) if a < b]


# Evaluation calls queued at once. On 8 CPU devices, XLA:CPU's in-process all-reduce
# deadlocked when 50 or more calls of a program holding one were queued (jax 0.10.2,
# measured): one device's thread never reached the all-reduce the others waited in. 32
# queued calls passed. SVHN's test set is 51 batches of 512.
MAX_EVAL_CALLS_IN_FLIGHT = 8


def dispatch_bounded(queued: collections.deque, call, *args):
    """`call(*args)`, a compiled call, appended to `queued` and returned; dispatched after
    waiting for the oldest call of `queued` when MAX_EVAL_CALLS_IN_FLIGHT are queued."""
    if len(queued) >= MAX_EVAL_CALLS_IN_FLIGHT:
        jax.block_until_ready(queued.popleft())
    queued.append(call(*args))
    return queued[-1]


def make_evaluate(objective: Objective, mesh):
    """Returns evaluate(state, data, batch_size, key) -> test-set means of the loss metrics.

    A compiled call per batch of `eval_batches` (not a compiled loop: jax-ml/jax#12868),
    dispatched ahead of the one read of their means (`dispatch_bounded`); each batch counts
    with its size, and batch j draws its noise from fold_in(key, j) at every evaluation.
    """

    @jax.jit
    def batch_means(state, data, idx, key):
        batch = objective.preprocess(batching.gather(data, idx[0], mesh))
        loss, (metrics, _) = objective.loss(state.eval_params, state.model_state, batch, key, False)
        return {"loss": loss, **metrics}

    def evaluate(state, data, batch_size, key):
        n = data.shape[0]
        batches = eval_batches(n, batch_size)
        queued = collections.deque()
        pending = [dispatch_bounded(queued, batch_means, state, data,
                                    batching.put_indices(np.arange(start, stop)[None], mesh),
                                    jax.random.fold_in(key, j))
                   for j, (start, stop) in enumerate(batches)]
        totals = {}
        for (start, stop), metrics in zip(batches, jax.device_get(pending)):
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value) * (stop - start)
        return {name: total / n for name, total in totals.items()}

    return evaluate


def evaluate_test_set(objective: Objective, state: TrainState, test_data: np.ndarray,
                      config: TrainConfig, mesh=None) -> dict[str, float]:
    """Test-set means of `objective`'s metrics for `state`, with the batches and noise of
    `fit`'s evaluations under `config` (seed, eval_batch_size): e.g. a final estimate with
    more Monte Carlo samples than the per-epoch curve, given an objective that draws them."""
    mesh = mesh or batching.data_mesh()
    return make_evaluate(objective, mesh)(state, batching.put_replicated(test_data, mesh),
                                          config.eval_batch_size, keys(config.seed)[2])


def checked(chunk):
    """jit((state, *args) -> (state, metrics, finite)): `chunk` (`make_train_chunk`), and
    whether every floating-point leaf of the state it returns is finite (a replicated bool),
    computed in the same compiled call so that one fetch brings it with the metrics."""

    @jax.jit
    def call(state, *args):
        state, metrics = chunk(state, *args)
        finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
                  if jnp.issubdtype(x.dtype, jnp.inexact)]
        return state, metrics, jnp.all(jnp.stack(finite)) if finite else jnp.bool_(True)

    return call


def non_finite_leaves(tree) -> list[str]:
    """The paths ("opt_state/0/nu/Dense_0/kernel") of the floating-point leaves of `tree`
    that hold a NaN or an infinity."""
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(tree))[0]
            if np.issubdtype(np.result_type(leaf), np.inexact) and not np.all(np.isfinite(leaf))]
