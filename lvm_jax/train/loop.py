"""`fit`: the one training loop, for every model.

The dataset lives whole on the devices; each compiled call runs
`steps_per_call` optimizer steps as one `lax.scan` over batches gathered on
the device from permuted indices, so no step waits on the host. Batches are
split over the `data` axis of the mesh and parameters replicated; XLA inserts
the gradient all-reduce (DESIGN.md §4).

Multi-host: every process (one per host, after `jax.distributed.initialize()`)
calls `fit` with the same arguments. Each keeps its shard of the training set
on its devices (`batching.host_shard`) and contributes batch_size / hosts
examples to every step; the test set is replicated. Every process computes
the same metrics and parameters, calls the orbax checkpointer (orbax
coordinates the hosts), and only process 0 writes metrics, config and summary.
"""

import dataclasses
import math
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from lvm_jax.data import batching
from lvm_jax.train import records
from lvm_jax.train.checkpoint import Checkpointer
from lvm_jax.train.state import Objective, TrainConfig, TrainState


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or infinite loss; the last good state is checkpointed."""


@dataclasses.dataclass
class FitResult:
    state: TrainState
    test_metrics: dict[str, float]
    summary: dict


def _keys(seed: int):
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
    init_key = _keys(config.seed)[0]
    example = objective.preprocess(jnp.asarray(example))
    variables = jax.jit(objective.init)(init_key, example)  # one compiled op, not hundreds
    params = variables.pop("params")
    tx = tx or optax.adam(config.learning_rate)
    if config.grad_clip_norm is not None:
        tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
    return TrainState.create(apply_fn=None, params=params, tx=tx, model_state=variables,
                             ema_params=params if config.ema_decay is not None else None)


def make_train_chunk(objective: Objective, mesh, ema_decay: float | None = None):
    """jit((state, data, idx (n, batch), key) -> (state, metrics stacked over n steps)).

    `data` from `batching.put_host_shard`, `idx` from `batching.put_host_indices`.
    """

    def step(state, idx, data, key):
        batch = objective.preprocess(batching.gather_host_shard(data, idx, mesh))
        rng = jax.random.fold_in(key, state.step)

        def loss_of(params):
            return objective.loss(params, state.model_state, batch, rng, True)

        (loss, (metrics, model_state)), grads = jax.value_and_grad(loss_of, has_aux=True)(
            state.params)
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


def make_evaluate(objective: Objective, mesh):
    """Returns evaluate(state, data, batch_size, key) -> test-set means of the loss metrics.

    One compiled call per batch (evaluation is not a hot loop, and convolutions
    run slowly inside compiled loops on CPU); a trailing partial batch counts
    with its size, so every example counts exactly once. Batch j draws its noise
    from fold_in(key, j), the same at every evaluation.
    """

    @jax.jit
    def batch_metrics(state, data, idx, key):
        batch = objective.preprocess(batching.gather(data, idx[0], mesh))
        loss, (metrics, _) = objective.loss(state.eval_params, state.model_state, batch, key, False)
        return {"loss": loss, **metrics}

    def evaluate(state, data, batch_size, key):
        n = data.shape[0]
        totals = {}
        for j, start in enumerate(range(0, n, batch_size)):
            idx = batching.put_indices(np.arange(start, min(start + batch_size, n))[None], mesh)
            metrics = jax.device_get(batch_metrics(state, data, idx, jax.random.fold_in(key, j)))
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + float(value) * idx.shape[1]
        return {name: total / n for name, total in totals.items()}

    return evaluate


def _check_finite(metrics: dict, first_step: int, what: str):
    loss = np.asarray(metrics["loss"])
    bad = np.flatnonzero(~np.isfinite(loss))
    if bad.size:
        return f"non-finite {what} loss ({loss.flat[bad[0]]}) at step {first_step + int(bad[0])}"
    return None


def device_description() -> str:
    devices = jax.devices()
    hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}){hosts}"


def fit(objective: Objective, train_data: np.ndarray, test_data: np.ndarray,
        config: TrainConfig, workdir: str, run_config: dict | None = None,
        tx: optax.GradientTransformation | None = None, mesh=None) -> FitResult:
    """Trains `objective` on `train_data`, evaluating on `test_data`, in `workdir`.

    Evaluates on the test set before training and after every epoch, appends to
    `metrics.csv`, checkpoints every epoch, resumes from the workdir's latest
    checkpoint, and writes `summary.json`. A resumed run gives the same result
    as an uninterrupted one: data order and noise derive from (seed, epoch, step).

    Args:
      objective: the model's init and loss (the loop knows nothing else of it).
      train_data, test_data: whole arrays (N, ...) as stored, e.g. uint8 images; in a
        multi-host run every process passes the same ones and keeps its
        `batching.host_shard` of train_data (the last N % hosts examples are dropped).
      config: loop hyperparameters.
      workdir: output directory.
      run_config: the experiment's settings; a resumed run must have the same.
      tx: optimizer, default Adam(config.learning_rate) (see `initial_state`).
      mesh: a Mesh with a "data" axis; default all devices of every host.
    Raises:
      ValueError: bad sizes (batch larger than the data, not divisible by the devices).
      CheckpointError: the workdir holds an unusable or different run.
      NonFiniteLossError: the loss became NaN or infinite.
    """
    mesh = mesh or batching.data_mesh()
    num_devices, num_hosts = mesh.devices.size, jax.process_count()
    shard = batching.host_shard(len(train_data), jax.process_index(), num_hosts)
    # The examples that divide evenly over the hosts: all of them on one host.
    num_train = (shard.stop - shard.start) * num_hosts
    if config.batch_size > num_train:
        hosts = f" that divide over the {num_hosts} hosts" if num_hosts > 1 else ""
        raise ValueError(f"batch_size {config.batch_size} exceeds the {num_train} training "
                         f"examples{hosts}.")
    if config.batch_size % num_devices:
        raise ValueError(f"batch_size {config.batch_size} must be divisible by the "
                         f"{num_devices} devices of the mesh.")
    if len(test_data) == 0:
        raise ValueError("the test set is empty.")
    steps_per_epoch = num_train // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    run_config = dict(run_config or {})
    loop_config = {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in TrainConfig.RESUMABLE}
    saved_config = {**run_config, "train": loop_config}

    checkpointer = Checkpointer(workdir)
    try:
        return _fit(objective, train_data, test_data, config, workdir, saved_config, tx, mesh,
                    checkpointer, shard, steps_per_epoch, total_steps)
    finally:
        checkpointer.close()


def _fit(objective, train_data, test_data, config, workdir, saved_config, tx, mesh,
         checkpointer, shard, steps_per_epoch, total_steps) -> FitResult:
    local_batch = config.batch_size // jax.process_count()
    checkpointer.check_config(saved_config)

    _, train_key, eval_key = _keys(config.seed)
    state = batching.put_replicated(initial_state(objective, train_data[:1], config, tx), mesh)
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        state = checkpointer.restore(state)
    checkpointer.save_config(saved_config)
    start_step = int(jax.device_get(state.step))

    train_on_device = batching.put_host_shard(train_data[shard], mesh)
    test_on_device = batching.put_replicated(test_data, mesh)
    train_chunk = make_train_chunk(objective, mesh, config.ema_decay)
    evaluate = make_evaluate(objective, mesh)

    metric_names = jax.eval_shape(
        train_chunk, state, train_on_device, jnp.zeros((1, config.batch_size), jnp.int32),
        train_key)[1].keys()
    log = records.MetricsLog(os.path.join(workdir, "metrics.csv"), metric_names, resume_step)
    run_start = time.perf_counter()
    train_seconds, train_steps_timed, compiled_sizes = 0.0, 0, set()

    def elapsed():
        return log.time_offset + time.perf_counter() - run_start

    def log_eval(epoch):
        metrics = evaluate(state, test_on_device, config.eval_batch_size, eval_key)
        log.append([{"split": "test", "epoch": epoch, "step": int(state.step), "time": elapsed(),
                     **metrics}])
        return metrics

    test_metrics = log_eval(0) if start_step == 0 else None
    initial_metrics = test_metrics
    steps_per_call = max(1, min(config.steps_per_call, steps_per_epoch))
    primary = records.is_primary()
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               disable=not (config.progress and primary),
               desc=os.path.basename(os.path.normpath(workdir)))
    step = start_step
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        order = batching.epoch_order(config.seed, epoch, len(train_data), steps_per_epoch,
                                     local_batch, shard)
        while offset < steps_per_epoch:
            n = min(steps_per_call, steps_per_epoch - offset)
            idx = batching.put_host_indices(order[offset:offset + n], mesh)
            tic = time.perf_counter()
            new_state, metrics = train_chunk(state, train_on_device, idx, train_key)
            metrics = jax.device_get(metrics)
            if n in compiled_sizes:  # steps/s leaves out the calls that compiled
                train_seconds += time.perf_counter() - tic
                train_steps_timed += n
            compiled_sizes.add(n)
            problem = _check_finite(metrics, step + 1, "training")
            if problem:
                checkpointer.save(state)
                bar.close()
                raise NonFiniteLossError(
                    f"{problem} (epoch {epoch + 1}). The last good state (step {step}) is saved in "
                    f"{checkpointer.directory}. Lower --learning_rate or check the data.")
            state = new_state
            log.append([{"split": "train", "epoch": epoch + 1, "step": step + 1 + i,
                         "time": elapsed(), **{k: float(v[i]) for k, v in metrics.items()}}
                        for i in range(n)])
            step += n
            offset += n
            bar.update(n)
            bar.set_postfix(epoch=epoch + 1, loss=f"{float(np.mean(metrics['loss'])):.4g}")
        test_metrics = log_eval(epoch + 1)
        if not all(math.isfinite(v) for v in test_metrics.values()):
            raise NonFiniteLossError(f"non-finite test metrics after epoch {epoch + 1}: {test_metrics}")
        checkpointer.save(state)
        if primary:
            bar.write(f"epoch {epoch + 1}/{config.epochs}: test "
                      + ", ".join(f"{k} {v:.4f}" for k, v in test_metrics.items()))
    bar.close()
    if test_metrics is None:  # resumed a finished run: evaluate once more for the summary
        test_metrics = log_eval(config.epochs)

    summary = {
        "config": saved_config,
        "test_metrics": test_metrics,
        "initial_test_metrics": initial_metrics,
        "units": dict(objective.units),
        "epochs": config.epochs,
        "steps": total_steps,
        "resumed_from_step": start_step or None,
        "wall_time_seconds": time.perf_counter() - run_start,
        "train_steps_per_second": train_steps_timed / train_seconds if train_seconds else None,
        "train_examples_per_second": (train_steps_timed * config.batch_size / train_seconds
                                      if train_seconds else None),
        "device": device_description(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    records.write_json(os.path.join(workdir, "summary.json"), summary)
    return FitResult(state=state, test_metrics=test_metrics, summary=summary)
