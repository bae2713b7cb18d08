"""`fit`: the one training loop, for every model.

`fit` locks the workdir, restores the newest checkpoint or initialises, then runs compiled
calls of `steps_per_call` steps, logging each call's rows, evaluating and checkpointing at
the end of every epoch, and stopping on a signal or at the first non-finite call. What stays
fixed while a run trains is one frozen `Run`. Multi-host: every process calls `fit` with the
same arguments and trains on its shard; only process 0 writes files.
"""

import contextlib
import dataclasses
import math
import os
import platform
import time
from collections.abc import Collection

import jax
import numpy as np
import optax

from lvm_jax import files, interrupt
from lvm_jax import workdir as workdir_lock
from lvm_jax.data import batching
from lvm_jax.errors import ConfigError, NonFiniteLossError
from lvm_jax.progress import Progress, metrics_line, units_line
from lvm_jax.train import checkpoint, feeds, records, steps
from lvm_jax.train.state import Objective, TrainConfig, TrainState, may_change_on_resume

# The units of the metrics.csv columns `fit` adds to an objective's metrics.
LOG_UNITS = {"time": "seconds since the run started (over resumed segments)",
             "grad_norm": "global L2 norm of the gradient of the loss, before clipping"}


@dataclasses.dataclass
class FitResult:
    state: TrainState
    test_metrics: dict[str, float]
    summary: dict


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a run's steps are cut: `total_steps` in epochs of `steps_per_epoch`, in compiled
    calls of at most `steps_per_call` that never cross an epoch's end; each host trains on
    `local_batch` examples of its `shard` per step."""

    steps_per_epoch: int
    steps_per_call: int
    total_steps: int
    local_batch: int
    shard: slice

    def call_size(self, step: int) -> int:
        return min(self.steps_per_call, self.steps_per_epoch - step % self.steps_per_epoch)


def plan(config: TrainConfig, num_examples: int, num_test: int, mesh) -> Plan:
    """The Plan of `config` on `num_examples` training examples over `mesh`.

    Raises:
      ConfigError: a batch larger than the data or not divisible by the devices; no test data.
    """
    hosts, devices = jax.process_count(), mesh.devices.size
    shard = batching.host_shard(num_examples, jax.process_index(), hosts)
    num_train = (shard.stop - shard.start) * hosts
    if config.batch_size > num_train:
        over = f" that divide over the {hosts} hosts" if hosts > 1 else ""
        raise ConfigError(f"batch_size {config.batch_size} exceeds the {num_train} training "
                          f"examples{over}: choose a --batch_size of at most {num_train}.")
    if config.batch_size % devices:
        raise ConfigError(f"batch_size {config.batch_size} must be divisible by the {devices} "
                          f"devices of the mesh: choose a multiple of {devices}.")
    if num_test == 0:
        raise ConfigError("the test set is empty.")
    steps_per_epoch = num_train // config.batch_size
    return Plan(steps_per_epoch, max(1, min(config.steps_per_call, steps_per_epoch)),
                config.epochs * steps_per_epoch, config.batch_size // hosts, shard)


@dataclasses.dataclass(frozen=True)
class Run:
    """What stays fixed while a run trains: its settings, parts, compiled functions, files,
    and the wall time of earlier segments (`elapsed_before`, seconds) and of its start."""

    objective: Objective
    config: TrainConfig
    plan: Plan
    config_json: dict
    checkpointer: checkpoint.Checkpointer
    feed: object
    train_chunk: object
    evaluate: object
    keys: tuple
    test_data: jax.Array
    log: records.MetricsLog
    progress: Progress
    elapsed_before: float
    started: float = dataclasses.field(default_factory=time.perf_counter)

    def elapsed(self) -> float:
        """Seconds of training wall time, over resumed segments."""
        return self.elapsed_before + time.perf_counter() - self.started


def fit(objective: Objective, train_data, test_data: np.ndarray, config: TrainConfig,
        workdir: str, run_config: dict | None = None, may_change: Collection[str] = (),
        tx: optax.GradientTransformation | None = None, mesh=None) -> FitResult:
    """Trains `objective` on `train_data`, evaluating on `test_data`, in `workdir`.

    Evaluates before training and after every epoch, logs every step to metrics.csv and
    TensorBoard, checkpoints at the end of an epoch (at most every `config.checkpoint_interval`
    seconds; always the last), resumes from the workdir's newest checkpoint
    bit-identical to an uninterrupted run, and writes summary.json naming the checkpoint it
    describes; a finished run, rerun, changes none of its files. A resumed run's settings
    must match config.json's but those in `may_change`, whose changes config.json records.
    Inside `interrupt.handled()`, SIGINT and SIGTERM stop the run at the next call boundary,
    its step saved (`interrupt.Interrupted`); a compiled call whose loss or state is not
    finite stops it (`NonFiniteLossError`), keeping a finite checkpoint. docs/records.md.

    Args:
      objective: the model's init and loss (the loop knows nothing else of it).
      train_data, test_data: whole arrays (N, ...) as stored, e.g. uint8 images, the same on
        every process; train_data may be a source (`lvm_jax.data.stream`, `--input stream`).
      config: loop hyperparameters.
      workdir: output directory, locked for the whole call.
      run_config: the run's settings (every one that decides what is trained, `config`'s
        included) and facts, saved as config.json; default `config`'s fields.
      may_change: the keys of `run_config` a resumed run may change (default, with no
        `run_config`: TrainConfig's `may_change_on_resume`).
      tx: optimizer, default Adam(config.learning_rate) (see `steps.initial_state`).
      mesh: a Mesh with a "data" axis; default all devices of every host.
    """
    mesh = mesh or batching.data_mesh()
    sizes = plan(config, len(train_data), len(test_data), mesh)
    if run_config is None:
        run_config, may_change = dataclasses.asdict(config), may_change_on_resume(TrainConfig)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(interrupt.handled())
            stack.enter_context(workdir_lock.locked(workdir))
            feed = feeds.feed_for(train_data, mesh, config.seed, sizes)
            stack.callback(feed.close)
            checkpointer = stack.enter_context(checkpoint.Checkpointer(
                workdir, streamed=feed.iterator is not None,
                interval_seconds=config.checkpoint_interval))
            run, state, timing = _restore_or_initialise(
                stack, objective, config, sizes, workdir, run_config, may_change, checkpointer,
                feed, test_data, tx, mesh)
            step = start_step = int(jax.device_get(state.step))
            _stop_if_requested(run, state, timing)  # a signal while loading, or in a stage before
            initial_metrics = run.log.test_metrics(0)
            if start_step == 0 and initial_metrics is None:
                run.progress.note("evaluating the initial model on the test set (compiling the "
                                  "evaluation)")
                initial_metrics = _evaluate(run, state)
                _stop_if_requested(run, state, timing)
            test_metrics = run.log.test_metrics(start_step)
            if step < sizes.total_steps:
                run.progress.note(f"compiling the training step ({sizes.steps_per_call} step(s) "
                                  "per call); the first call waits for it")
            compiled = frozenset()  # the call sizes compiled so far: steps/s leaves their first out
            while step < sizes.total_steps:
                n = sizes.call_size(step)
                state, timing = _call(run, state, step, n, timing, n in compiled)
                step, compiled = step + n, compiled | {n}
                if step % sizes.steps_per_epoch == 0:
                    test_metrics = _end_epoch(run, state, timing,
                                              first=step - start_step <= sizes.steps_per_epoch)
                _stop_if_requested(run, state, timing)
            run.progress.close()
            if test_metrics is None:  # a finished run whose log lost its last evaluation
                test_metrics = _evaluate(run, state)
            return _finish(run, state, start_step, timing, initial_metrics, test_metrics)
    except Exception as err:
        # A full disk or a refused write met anywhere (orbax's threads wrap it): the
        # checkpointer has closed, waiting for the save in flight, so name the cause alone.
        disk_error = files.disk_error(err)
        if disk_error is None:
            raise
        raise disk_error from None


def _restore_or_initialise(stack, objective, config, sizes, workdir, run_config, may_change,
                           checkpointer, feed, test_data, tx, mesh) -> tuple:
    """(Run, state, timing) of the run in `workdir`: restored from its newest checkpoint,
    after checking its config, or initialised; config.json and metrics.csv made current."""
    resume_step = checkpointer.latest_step()
    if resume_step is not None:
        # A different run first: its steps count in other epochs, so "pass --epochs N" would
        # send the user the wrong way.
        run_config = checkpoint.resumed_config(workdir, run_config, resume_step, may_change,
                                               record_changes=resume_step < sizes.total_steps)
        if resume_step > sizes.total_steps:
            raise ConfigError(
                f"the workdir {workdir} holds a model trained for {resume_step} steps, more "
                f"than the {config.epochs} epochs ({sizes.total_steps} steps) asked for: pass "
                f"--epochs {math.ceil(resume_step / sizes.steps_per_epoch)} or more to resume "
                "or evaluate it, or use another --workdir.")
    state = batching.put_replicated(steps.initial_state(objective, feed.example, config, tx),
                                    mesh)
    timing = {"elapsed_seconds": 0.0, "timed_steps": 0, "timed_seconds": 0.0}
    restored = False
    if resume_step is not None:
        state, record, restored = checkpointer.restore(state, feed.iterator)
        timing.update(record["timing"])
    files.write_json(os.path.join(workdir, "config.json"), run_config)
    start_step = int(jax.device_get(state.step))
    feed.start(start_step, restored)
    keys = steps.keys(config.seed)
    train_chunk = steps.checked(steps.make_train_chunk(objective, mesh, config.ema_decay,
                                                      feed.read))
    names = jax.eval_shape(train_chunk, state, feed.data, feed.spec, keys[1])[1].keys()
    log = stack.enter_context(contextlib.closing(
        records.MetricsLog(os.path.join(workdir, "metrics.csv"), names, resume_step)))
    progress = Progress(sizes.total_steps, start_step, os.path.basename(os.path.normpath(
        workdir)), bar=config.progress, enabled=files.is_primary())
    stack.callback(progress.close)
    if 0 < start_step < sizes.total_steps:
        progress.note(f"resuming from step {start_step} of {sizes.total_steps}")
    run = Run(objective, config, sizes, run_config, checkpointer, feed, train_chunk,
              steps.make_evaluate(objective, mesh), keys, batching.put_replicated(test_data, mesh),
              log, progress, timing["elapsed_seconds"])
    return run, state, timing


def _call(run: Run, state: TrainState, step: int, n: int, timing: dict, timed: bool) -> tuple:
    """(state, timing) after the compiled call of steps step+1..step+n, its rows logged.

    Raises:
      NonFiniteLossError: its loss or its resulting state is not finite (`_non_finite`).
    """
    rows = feeds.put(run.feed, run.feed.rows(step, n))
    tic = time.perf_counter()
    new_state, metrics, finite = run.train_chunk(state, run.feed.data, rows, run.keys[1])
    metrics, finite = jax.device_get((metrics, finite))
    if timed:
        timing = {**timing, "timed_seconds": timing["timed_seconds"] + time.perf_counter() - tic,
                  "timed_steps": timing["timed_steps"] + n}
    bad = np.flatnonzero(~np.isfinite(metrics["loss"]))
    bad = int(bad[0]) if bad.size else None
    epoch = step // run.plan.steps_per_epoch + 1
    run.log.append([{"split": "train", "epoch": epoch, "step": step + 1 + i, "time": run.elapsed(),
                     **{k: float(v[i]) for k, v in metrics.items()}} for i in range(bad or n)])
    if bad is not None or not finite:
        raise _non_finite(run, state, new_state, timing, metrics["loss"], bad)
    run.progress.update(n, epoch=epoch, loss=f"{float(np.mean(metrics['loss'])):.4g}")
    return new_state, timing


def _evaluate(run: Run, state: TrainState) -> dict[str, float]:
    """The test-set metrics of `state`, logged."""
    metrics = run.evaluate(state, run.test_data, run.config.eval_batch_size, run.keys[2])
    step = int(jax.device_get(state.step))
    run.log.append([{"split": "test", "epoch": step // run.plan.steps_per_epoch, "step": step,
                     "time": run.elapsed(), **metrics}])
    return metrics


def _end_epoch(run: Run, state: TrainState, timing: dict, first: bool) -> dict[str, float]:
    """Evaluates and checkpoints `state` at the end of an epoch, and prints its line (after
    the units line, on the `first` epoch line of this segment)."""
    metrics = _evaluate(run, state)
    epoch = int(jax.device_get(state.step)) // run.plan.steps_per_epoch
    if not all(math.isfinite(v) for v in metrics.values()):
        raise NonFiniteLossError(f"non-finite test metrics after epoch {epoch}: {metrics}. "
                                 f"{_resume_advice(run, run.checkpointer.latest_step())}")
    _save(run, state, timing, force=epoch == run.config.epochs)
    header = units_line(metrics, run.objective.units) if first else None
    if header:
        run.progress.note(header)
    run.progress.note(metrics_line(f"epoch {epoch}/{run.config.epochs}: test ", metrics))
    return metrics


def _save(run: Run, state: TrainState, timing: dict, force: bool = True) -> None:
    """Starts checkpointing `state` with its record (config.json without its "changes") and
    the feed's iterator state; unless `force`d, only `config.checkpoint_interval` seconds
    after the previous save."""
    config = {k: v for k, v in run.config_json.items() if k != "changes"}
    run.checkpointer.save(state, config, {**timing, "elapsed_seconds": run.elapsed()},
                          feeds.iterator_state(run.feed, int(jax.device_get(state.step))), force)


def _stop_if_requested(run: Run, state: TrainState, timing: dict) -> None:
    """On a signal (`interrupt`), checkpoints `state`, waits until it is committed, and
    raises `interrupt.Interrupted`."""
    signum = interrupt.requested()
    if signum is None:
        return
    _save(run, state, timing)
    run.checkpointer.wait()
    run.progress.close()
    step = int(jax.device_get(state.step))
    raise interrupt.stopped(signum, f"step {step} of {run.plan.total_steps} is saved in "
                                    f"{run.checkpointer.step_directory(step)}; rerun the same "
                                    "command to resume from it")


def _non_finite(run: Run, state: TrainState, new_state: TrainState, timing: dict, losses,
                bad: int | None) -> NonFiniteLossError:
    """The error of the call from `state` to `new_state`, whose loss at index `bad` (None:
    every loss finite) or whose state is not finite. `state` is finite (checked after the
    previous call); it is checkpointed when its own loss (the call's first) was finite and
    it is newer than the newest checkpoint. No call is run again."""
    step = int(jax.device_get(state.step))
    latest = run.checkpointer.latest_step()
    if bad != 0 and (latest is None or step > latest):
        _save(run, state, timing)
        run.checkpointer.wait()
        latest = step
    run.progress.close()
    leaves = steps.non_finite_leaves(new_state)
    shown = ", ".join(leaves[:3]) + (f", ... ({len(leaves)} leaves)" if len(leaves) > 3 else "")
    if bad is None:
        what = (f"non-finite values in {shown} by step {step + len(losses)}, while the training "
                "loss stayed finite")
    else:
        what = (f"non-finite training loss ({losses[bad]}) at step {step + bad + 1} (epoch "
                f"{step // run.plan.steps_per_epoch + 1})"
                + (f", then non-finite values in {shown}" if leaves else ""))
    return NonFiniteLossError(f"{what}. {_resume_advice(run, latest)}")


def _resume_advice(run: Run, step: int | None) -> str:
    """What the user may do after a non-finite call, given the newest checkpoint `step`."""
    if step is None:
        return ("No state was saved: check the data and the model's initialisation, or lower "
                "--learning_rate.")
    return (f"The last good state (step {step}) is saved in {run.checkpointer.directory}: rerun "
            "the same command with a lower --learning_rate to resume from it (config.json "
            "records the change), or check the data.")


def _finish(run: Run, state: TrainState, start_step: int, timing: dict, initial_metrics,
            test_metrics) -> FitResult:
    """The FitResult, after writing summary.json once the final checkpoint is committed; a
    finished run, rerun, keeps the summary that names its checkpoint."""
    step = int(jax.device_get(state.step))
    path = os.path.join(os.path.dirname(run.checkpointer.directory), "summary.json")
    if step == start_step and os.path.exists(path):
        summary = files.read_record(path)
        if summary.get("checkpoint_step", step) == step:
            run.progress.note(f"{os.path.dirname(path)} holds a finished run (step {step} of "
                              f"{run.plan.total_steps}): nothing to train, and its files stay "
                              "as they are")
            return FitResult(state=state, test_metrics=test_metrics, summary=summary)
    run.checkpointer.wait()
    timed = timing["timed_seconds"] or None
    summary = {
        "config": run.config_json, "test_metrics": test_metrics,
        "initial_test_metrics": initial_metrics, "units": {**LOG_UNITS, **run.objective.units},
        "epochs": run.config.epochs, "steps": run.plan.total_steps, "checkpoint_step": step,
        "resumed_from_step": start_step or None, "wall_time_seconds": run.elapsed(),
        "train_steps_per_second": timed and timing["timed_steps"] / timed,
        "train_examples_per_second": timed and timing["timed_steps"] * run.config.batch_size / timed,
        "device": device_description(), "jax_version": jax.__version__,
        "python": platform.python_version(),
    }
    files.write_json(path, summary)
    return FitResult(state=state, test_metrics=test_metrics, summary=summary)


def device_description() -> str:
    devices = jax.devices()
    hosts = f" on {jax.process_count()} hosts" if jax.process_count() > 1 else ""
    return f"{len(devices)} x {devices[0].device_kind} ({devices[0].platform}){hosts}"
