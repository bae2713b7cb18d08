"""`fit`: the one training loop, for every model.

The dataset lives whole on the devices; each compiled call runs
`steps_per_call` optimizer steps as one `lax.scan` over batches gathered on
the device from permuted indices, so no step waits on the host. Batches are
split over the `data` axis of the mesh and parameters replicated; XLA inserts
the gradient all-reduce (DESIGN.md §4). Training data given as a source
(`lvm_jax.data.stream`) is streamed instead: read by grain, the same batches
in the same order, placed on the devices while the previous call runs
(`lvm_jax.train.feeds`).

Multi-host: every process (one per host, after `jax.distributed.initialize()`)
calls `fit` with the same arguments. Each keeps its shard of the training set
on its devices (`batching.host_shard`) and contributes batch_size / hosts
examples to every step; the test set is replicated. Every process computes
the same metrics and parameters, calls the orbax checkpointer (orbax
coordinates the hosts), and only process 0 writes metrics, config and summary.
"""

import collections
import dataclasses
import math
import os
import platform
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lvm_jax.data import batching
from lvm_jax.errors import ConfigError, NonFiniteLossError
from lvm_jax.train import feeds, interrupt, links, records, workdir as workdir_lock
from lvm_jax.train.checkpoint import Checkpointer
from lvm_jax.train.progress import Progress
from lvm_jax.train.state import Objective, TrainConfig, TrainState

# The units of the metrics.csv columns `fit` adds to an objective's metrics.
LOG_UNITS = {"time": "seconds since the run started (over resumed segments)",
             "grad_norm": "global L2 norm of the gradient of the loss, before clipping"}
# Settings a resumed run may change; config.json records the step of each change. Both
# inputs train on the same batches, so a run may switch between them.
CHANGEABLE_ON_RESUME = ("train.learning_rate", "input")


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

    One compiled program per batch size, called once per batch of `eval_batches`
    (convolutions run many times slower inside compiled loops on CPU,
    jax-ml/jax#12868); the calls are dispatched ahead of the one read of their
    means, at most MAX_EVAL_CALLS_IN_FLIGHT queued at once (`dispatch_bounded`), so
    the host rarely waits between batches. Each batch counts with its size, so every
    example counts exactly once. Batch j draws its noise from fold_in(key, j), the same at every
    evaluation.
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
                                          config.eval_batch_size, _keys(config.seed)[2])


def _first_non_finite(losses) -> int | None:
    """Index of the first NaN or infinite value of `losses` (None when all are finite)."""
    bad = np.flatnonzero(~np.isfinite(np.asarray(losses)))
    return int(bad[0]) if bad.size else None


@jax.jit
def _all_finite(tree) -> jax.Array:
    """Whether every floating-point leaf of `tree` is finite (a replicated bool)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
              if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def non_finite_leaves(tree) -> list[str]:
    """The paths ("opt_state/0/nu/Dense_0/kernel") of the floating-point leaves of `tree`
    that hold a NaN or an infinity."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    inexact = [(path, leaf) for path, leaf in flat
               if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    finite = jax.device_get(jax.jit(lambda leaves: [jnp.all(jnp.isfinite(x)) for x in leaves])(
        [leaf for _, leaf in inexact]))
    return [jax.tree_util.keystr(path, simple=True, separator="/")
            for (path, _), ok in zip(inexact, finite) if not ok]


def _leaves_line(paths: list[str], limit: int = 3) -> str:
    """"opt_state/0/nu/Dense_0/kernel, ... (5 leaves)": the first `limit` of `paths`."""
    more = f", ... ({len(paths)} leaves)" if len(paths) > limit else ""
    return ", ".join(paths[:limit]) + more


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
    The workdir is locked for the whole call (`lvm_jax.train.workdir`). Rerunning
    a finished run changes none of its files, whatever its learning rate. The
    learning rate may change on resume (config.json records the step); every
    other setting must match.

    SIGINT and SIGTERM (inside `interrupt.handled()`, as the experiments run) stop
    the run at the next step boundary after checkpointing the current step, and
    raise `interrupt.Interrupted`; rerunning the same call resumes from there.

    A NaN or infinite training loss stops the run after checkpointing the last
    good state: the newest state whose floating-point leaves are all finite and
    whose own loss (the loss of the next step) was finite. So does a parameter or
    optimizer state (e.g. Adam's second moment overflowing while the loss stays
    finite) that becomes non-finite, checked after every call: the message names
    the leaves, and the newest state whose every leaf is finite is checkpointed.
    The summary is written once the final checkpoint is committed, and names it
    ("checkpoint_step").

    Args:
      objective: the model's init and loss (the loop knows nothing else of it).
      train_data, test_data: whole arrays (N, ...) as stored, e.g. uint8 images; in a
        multi-host run every process passes the same ones and keeps its
        `batching.host_shard` of train_data (the last N % hosts examples are dropped).
        train_data may be a source (`lvm_jax.data.stream`, `--input stream`): each
        host then reads only its shard's examples, while training.
      config: loop hyperparameters.
      workdir: output directory.
      run_config: the experiment's settings; a resumed run must have the same.
      tx: optimizer, default Adam(config.learning_rate) (see `initial_state`).
      mesh: a Mesh with a "data" axis; default all devices of every host.
    Raises:
      ConfigError: bad sizes (batch larger than the data, not divisible by the devices),
        or fewer epochs than the workdir's checkpoint has trained.
      WorkdirError: the workdir is a file, is not writable, or another run holds it; a
        file of the run is a symbolic link; the disk filled up or refused a write (the
        message names the path and the cause: fix it and rerun to resume).
      CheckpointError: the workdir holds a corrupted checkpoint or a different run.
      RecordError: config.json or metrics.csv is malformed or disagrees with the checkpoint.
      NonFiniteLossError: the loss, a parameter or the optimizer state became NaN or
        infinite (the last good state is saved; the message names the leaves).
      interrupt.Interrupted: a signal stopped the run (the current step is saved).
    """
    mesh = mesh or batching.data_mesh()
    num_devices, num_hosts = mesh.devices.size, jax.process_count()
    shard = batching.host_shard(len(train_data), jax.process_index(), num_hosts)
    # The examples that divide evenly over the hosts: all of them on one host.
    num_train = (shard.stop - shard.start) * num_hosts
    if config.batch_size > num_train:
        hosts = f" that divide over the {num_hosts} hosts" if num_hosts > 1 else ""
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {num_train} training "
                          f"examples{hosts}: choose a --batch_size of at most {num_train}.")
    if config.batch_size % num_devices:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the "
                          f"{num_devices} devices of the mesh: choose a multiple of "
                          f"{num_devices}.")
    if len(test_data) == 0:
        raise ConfigError("the test set is empty.")
    steps_per_epoch = num_train // config.batch_size
    loop_config = {k: v for k, v in dataclasses.asdict(config).items()
                   if k not in TrainConfig.RESUMABLE}
    saved_config = {**dict(run_config or {}), "train": loop_config}

    steps_per_call = max(1, min(config.steps_per_call, steps_per_epoch))
    try:
        with interrupt.handled(), workdir_lock.locked(workdir):
            if records.is_primary():  # before anything is written, not when summary.json is
                links.refuse_links_in(workdir, inside=(records.TENSORBOARD_DIR,))
            with Checkpointer(workdir) as checkpointer:
                feed = feeds.feed_for(train_data, mesh, config.seed, steps_per_epoch,
                                      config.batch_size // num_hosts, shard,
                                      config.epochs * steps_per_epoch, steps_per_call)
                try:
                    return _fit(objective, feed, test_data, config, workdir, saved_config,
                                tx, mesh, checkpointer, steps_per_call, steps_per_epoch)
                finally:
                    feed.close()
    except Exception as err:
        # A full disk or a refused write, met anywhere (orbax's threads wrap it): the
        # checkpointer has closed, waiting for the save in flight, so name the cause alone.
        disk_error = records.disk_error(err)
        if disk_error is None:
            raise
        raise disk_error from None


# The longest line of a run's notes (epoch lines and the units line wrap before it).
LINE_WIDTH = 160


def metrics_line(prefix: str, metrics: dict[str, float]) -> str:
    """`prefix` then "kl 12.6177, recon 986.1637": each metric and its value, with no unit
    (`units_line` names them once), wrapped between metrics into lines shorter than
    LINE_WIDTH."""
    items = [f"{name} {value:.4f}" for name, value in metrics.items()]
    lines = [prefix + items[0]]
    for item in items[1:]:
        if len(lines[-1]) + len(", ") + len(item) + len(",") < LINE_WIDTH:  # room for a comma
            lines[-1] += ", " + item
        else:
            lines[-1] += ","
            lines.append("    " + item)
    return "\n".join(lines)


def units_line(names, units: Mapping[str, str]) -> str | None:
    """"units: kl, recon in nats per example; ...": the metrics `names` grouped by unit (the
    first clause of each in `units`), printed once before the epoch lines; when one line would
    not be shorter than LINE_WIDTH, "units:" then a line "  kl, recon: nats per example" per
    unit. None when no metric has a unit."""
    groups = {}
    for name in names:
        unit = units.get(name, "").split(",")[0]
        if unit:
            groups.setdefault(unit, []).append(name)
    if not groups:
        return None
    line = "units: " + "; ".join(f"{', '.join(group)} in {unit}" for unit, group in groups.items())
    if len(line) < LINE_WIDTH:
        return line
    return "\n  ".join(["units:", *(f"{', '.join(group)}: {unit}" for unit, group in groups.items())])


def _fit(objective, feed, test_data, config, workdir, saved_config, tx, mesh,
         checkpointer, steps_per_call, steps_per_epoch) -> FitResult:
    total_steps = config.epochs * steps_per_epoch
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        # A different run first: its steps count in other epochs, so "pass --epochs N" would
        # send the user the wrong way.
        saved_config = checkpointer.check_config(saved_config, resume_step, CHANGEABLE_ON_RESUME,
                                                 record_changes=resume_step < total_steps)
        if resume_step > total_steps:
            raise ConfigError(
                f"the workdir {workdir} holds a model trained for {resume_step} steps, more than "
                f"the {config.epochs} epochs ({total_steps} steps) asked for: pass --epochs "
                f"{math.ceil(resume_step / steps_per_epoch)} or more to resume or evaluate it, "
                "or use another --workdir.")

    _, train_key, eval_key = _keys(config.seed)
    state = batching.put_replicated(initial_state(objective, feed.example, config, tx), mesh)
    timing = {"elapsed_seconds": 0.0, "timed_steps": 0, "timed_seconds": 0.0}
    if resume_step is not None:
        state = checkpointer.restore(state, data_iterator=feed)
        timing.update(checkpointer.timing(resume_step))
    checkpointer.save_config(saved_config)
    start_step = int(jax.device_get(state.step))

    feed.start(start_step)
    train_on_device = feed.data
    test_on_device = batching.put_replicated(test_data, mesh)
    train_chunk = make_train_chunk(objective, mesh, config.ema_decay, feed.read)
    evaluate = make_evaluate(objective, mesh)

    # Traced with the rows of a whole call, so that the first call reuses this trace.
    metric_names = jax.eval_shape(train_chunk, state, train_on_device,
                                  feed.placeholder(steps_per_call), train_key)[1].keys()
    log = records.MetricsLog(os.path.join(workdir, "metrics.csv"), metric_names, resume_step)
    primary = records.is_primary()
    progress = Progress(total_steps, start_step, os.path.basename(os.path.normpath(workdir)),
                        bar=config.progress, enabled=primary)
    run_start, time_offset = time.perf_counter(), timing["elapsed_seconds"]
    compiled_sizes = set()

    def elapsed():
        return time_offset + time.perf_counter() - run_start

    def log_eval(epoch):
        metrics = evaluate(state, test_on_device, config.eval_batch_size, eval_key)
        log.append([{"split": "test", "epoch": epoch, "step": int(state.step), "time": elapsed(),
                     **metrics}])
        return metrics

    def checkpoint(good_state):
        checkpointer.save(good_state, {**timing, "elapsed_seconds": elapsed()},
                          data_iterator=feed.iterator_state(int(jax.device_get(good_state.step))))

    def stop_if_requested():
        """On a signal (`interrupt`), checkpoints the current state, waits until it is on
        disk with its record, and raises `interrupt.Interrupted`."""
        signum = interrupt.requested()
        if signum is None:
            return
        checkpoint(state)
        checkpointer.wait()
        progress.close()
        raise interrupt.stopped(signum, f"step {step} of {total_steps} is saved in "
                                        f"{checkpointer.step_directory(step)}; rerun the same "
                                        "command to resume from it")

    if 0 < start_step < total_steps:
        progress.note(f"resuming from step {start_step} of {total_steps}")
    step = start_step
    stop_if_requested()  # a signal while loading, restoring, or in an earlier stage

    initial_metrics = log.test_metrics(0)
    if start_step == 0 and initial_metrics is None:
        progress.note("evaluating the initial model on the test set (compiling the evaluation)")
        initial_metrics = log_eval(0)
        stop_if_requested()
    test_metrics = log.test_metrics(start_step)
    # (state, step, batch indices) of the latest calls: where the last good state is found.
    recent_calls = collections.deque(maxlen=2)
    units_noted = False  # the units are named once, before the first epoch line
    if step < total_steps:
        progress.note(f"compiling the training step ({steps_per_call} step(s) per call); "
                      "the first call waits for it")
    while step < total_steps:
        epoch, offset = divmod(step, steps_per_epoch)
        while offset < steps_per_epoch:
            n = min(steps_per_call, steps_per_epoch - offset)
            rows = feed.rows(step, n)
            tic = time.perf_counter()
            new_state, metrics = train_chunk(state, train_on_device, feed.put(rows), train_key)
            metrics = jax.device_get(metrics)
            if n in compiled_sizes:  # steps/s leaves out the calls that compiled
                timing["timed_seconds"] += time.perf_counter() - tic
                timing["timed_steps"] += n
            compiled_sizes.add(n)
            recent_calls.append((state, step, rows))
            bad = _first_non_finite(metrics["loss"])
            log.append([{"split": "train", "epoch": epoch + 1, "step": step + 1 + i,
                         "time": elapsed(), **{k: float(v[i]) for k, v in metrics.items()}}
                        for i in range(n if bad is None else bad)])
            if bad is not None:
                progress.close()
                raise _non_finite_error(
                    metrics["loss"][bad], step + 1 + bad, epoch,
                    _save_last_good_state(train_chunk, train_on_device, train_key, feed.put,
                                          recent_calls, step + 1 + bad, checkpoint,
                                          checkpointer.latest_step()),
                    checkpointer)
            if not _all_finite(new_state):
                progress.close()
                raise _non_finite_state_error(
                    new_state, train_chunk, train_on_device, train_key, feed.put, state, step,
                    rows,
                    checkpoint, checkpointer)
            state = new_state
            step += n
            offset += n
            progress.update(n, epoch=epoch + 1, loss=f"{float(np.mean(metrics['loss'])):.4g}")
            if offset < steps_per_epoch:  # else the epoch's evaluation comes first
                stop_if_requested()
        test_metrics = log_eval(epoch + 1)
        if not all(math.isfinite(v) for v in test_metrics.values()):
            progress.close()
            raise NonFiniteLossError(
                f"non-finite test metrics after epoch {epoch + 1}: {test_metrics}. "
                f"{_resume_advice(checkpointer.latest_step(), checkpointer)}")
        checkpoint(state)
        header = None if units_noted else units_line(test_metrics, objective.units)
        if header:
            progress.note(header)
        units_noted = True
        progress.note(metrics_line(f"epoch {epoch + 1}/{config.epochs}: test ", test_metrics))
        stop_if_requested()
    progress.close()

    if test_metrics is None:  # a finished run whose log lost its last evaluation
        test_metrics = log_eval(config.epochs)
    summary_path = os.path.join(workdir, "summary.json")
    if step == start_step and os.path.exists(summary_path):
        summary = records.read_record(summary_path)
        # A finished run, rerun: nothing was trained, so its files stand as they are, unless
        # its summary describes another step (an older lvm_jax wrote it before the final
        # checkpoint committed, and was killed between the two).
        if summary.get("checkpoint_step", step) == step:
            progress.note(f"{workdir} holds a finished run (step {step} of {total_steps}): "
                          "nothing to train, and its files stay as they are")
            return FitResult(state=state, test_metrics=test_metrics, summary=summary)
    # The summary describes the final checkpoint: written once that is committed.
    checkpointer.wait()
    summary = {
        "config": saved_config,
        "test_metrics": test_metrics,
        "initial_test_metrics": initial_metrics,
        "units": {**LOG_UNITS, **objective.units},
        "epochs": config.epochs,
        "steps": total_steps,
        "checkpoint_step": step,
        "resumed_from_step": start_step or None,
        "wall_time_seconds": elapsed(),
        "train_steps_per_second": (timing["timed_steps"] / timing["timed_seconds"]
                                   if timing["timed_seconds"] else None),
        "train_examples_per_second": (timing["timed_steps"] * config.batch_size
                                      / timing["timed_seconds"] if timing["timed_seconds"] else None),
        "device": device_description(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    records.write_json(summary_path, summary)
    return FitResult(state=state, test_metrics=test_metrics, summary=summary)


def _save_last_good_state(train_chunk, data, key, put, recent_calls, bad_step: int,
                          checkpoint, latest_saved: int | None) -> int | None:
    """Checkpoints the newest good state held in memory and returns its step; None when
    there is none newer than the latest checkpoint, `latest_saved`, which then stays the
    newest (a resumed run starts from the newest).

    The loss of step k is computed from the state after k - 1 steps, so the state
    after bad_step - 1 steps gave the non-finite loss, and the newest candidate
    is the state after bad_step - 2 steps, replayed from the start of the call
    that passed through it. The next candidates are the states that started the
    recent calls, newest first. A candidate is good when every floating-point
    leaf (parameters, EMA parameters, optimizer state) is finite and its own
    loss, recomputed on its batch, is finite.

    Args:
      put: the feed's, places a call's rows on the devices.
      recent_calls: (state at the call's start, its step, the feed's rows of the call),
        oldest first.
      checkpoint: saves a state.
    """
    def run(state, rows):
        return train_chunk(state, data, put(rows), key)

    target = bad_step - 2  # the newest state that may be good
    for start, first, rows in reversed(recent_calls):
        if target < first:
            continue
        for k in dict.fromkeys((target - first, 0)):  # replayed to the target, or the call's start
            if latest_saved is not None and first + k < latest_saved:
                return None
            state = run(start, rows[:k])[0] if k else start
            own_loss = run(state, rows[k:k + 1])[1]["loss"][0]
            if bool(_all_finite(state)) and np.isfinite(jax.device_get(own_loss)):
                checkpoint(state)
                return first + k
        target = first - 1
    return None


def _non_finite_state_error(bad_state, train_chunk, data, key, put, start, first: int, rows,
                            checkpoint, checkpointer) -> NonFiniteLossError:
    """The error of a call that left a non-finite leaf in `bad_state` while its losses stayed
    finite, after checkpointing the newest state whose every leaf is finite: the call is
    replayed one step at a time from `start`, the finite state that began it at step
    `first`, up to the step that made a leaf non-finite. The message names those leaves."""
    good, good_step = start, first
    for k in range(len(rows) - 1):
        state = train_chunk(good, data, put(rows[k:k + 1]), key)[0]
        if not _all_finite(state):
            break
        good, good_step = state, first + k + 1
    latest = checkpointer.latest_step()
    if latest is None or good_step > latest:
        checkpoint(good)
    leaves = non_finite_leaves(bad_state)
    return NonFiniteLossError(
        f"non-finite values in {_leaves_line(leaves)} by step {first + len(rows)}, while the "
        f"training loss stayed finite. {_resume_advice(max(good_step, latest or 0), checkpointer)}")


def _resume_advice(step: int | None, checkpointer) -> str:
    if step is None:
        return ("No state was saved: check the data and the model's initialisation, or lower "
                "--learning_rate.")
    return (f"The last good state (step {step}) is saved in {checkpointer.directory}: rerun the "
            "same command with a lower --learning_rate to resume from it (config.json records "
            "the change), or check the data.")


def _non_finite_error(loss, bad_step: int, epoch: int, saved_step: int | None,
                      checkpointer) -> NonFiniteLossError:
    good_step = saved_step if saved_step is not None else checkpointer.latest_step()
    return NonFiniteLossError(f"non-finite training loss ({loss}) at step {bad_step} "
                              f"(epoch {epoch + 1}). {_resume_advice(good_step, checkpointer)}")
