"""A run's checkpoints: orbax's CheckpointManager, each step one atomic composite of items.

<workdir>/checkpoints/<step>/ holds "state" (the TrainState), "record" (record.json: the
step, the run's config, its timing and the state's SHA-256 digest) and, for a streamed
run, "data" (its grain iterator state). What a restore checks, and how readers of a run
that is training pick a step: docs/records.md.
"""

import hashlib
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from lvm_jax import files
from lvm_jax.data import identity
from lvm_jax.errors import CheckpointError, DataError, RecordError

STATE, RECORD, DATA = "state", "record", "data"
RECORD_FILE = "record.json"
# What a record holds, and the type of each.
RECORD_KEYS = {"step": int, "config": dict, "timing": dict, "digest": str}


def _handlers(streamed: bool) -> dict:
    """The items' handlers; grain's (0.2 s to import) only for a `streamed` run's iterator."""
    handlers = {STATE: ocp.StandardCheckpointHandler(),
                RECORD: ocp.JsonCheckpointHandler(filename=RECORD_FILE)}
    if streamed:
        import grain

        handlers[DATA] = grain.checkpoint.CheckpointHandler()
    return handlers


def state_digest(state) -> str:
    """SHA-256 of every leaf of `state` (its path, dtype, shape and bytes), in tree order; a
    Python scalar counts as the JAX array it restores as (a new TrainState's step)."""
    digest = hashlib.sha256()
    for path, leaf in jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]:
        leaf = np.asarray(leaf if hasattr(leaf, "dtype") else jnp.asarray(leaf))
        digest.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        digest.update(leaf.tobytes())
    return digest.hexdigest()


def _corrupted(step_directory: str, problem: str) -> CheckpointError:
    return CheckpointError(f"checkpoint {step_directory} is corrupted: {problem}. Delete that "
                           "step's folder to resume from an earlier one, or use another --workdir.")


def read_record(step_directory: str, step: int) -> dict:
    """The checked record of the checkpoint of `step` in `step_directory`.

    Raises:
      CheckpointError: it is unreadable, malformed, or names another step (folders swapped).
      FileNotFoundError: the step vanished (deleted by the run that wrote it).
    """
    if not os.path.isdir(step_directory):
        raise FileNotFoundError(step_directory)
    try:
        record = files.read_record(os.path.join(step_directory, RECORD, RECORD_FILE),
                                     CheckpointError)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {step_directory} is corrupted: {err}") from None
    problems = [f"it lacks {key!r}" for key in RECORD_KEYS if key not in record]
    problems += [f"{key!r} is no {kind.__name__}" for key, kind in RECORD_KEYS.items()
                 if key in record and type(record[key]) is not kind]
    problems += [f"it holds the unknown key {key!r}" for key in record if key not in RECORD_KEYS]
    if not problems and not all(type(v) in (int, float) for v in record["timing"].values()):
        problems.append("its 'timing' holds a value that is no number")
    if not problems and record["step"] != step:
        problems.append(f"it records step {record['step']} in the folder of step {step} "
                        "(step folders renamed or swapped)")
    if problems:
        raise _corrupted(step_directory, f"its {RECORD_FILE} is malformed ({problems[0]})")
    return record


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"params/Dense_0/kernel": shape} of every leaf of a state, or of orbax's metadata."""
    return {jax.tree_util.keystr(path, simple=True, separator="/"): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def mismatch(saved, target) -> str | None:
    """Why a checkpoint's tree `saved` (orbax's metadata) cannot restore into `target`, naming
    the first differing leaf path, or None when they match."""
    saved, target = _leaf_shapes(saved), _leaf_shapes(target)
    for path in sorted(set(saved) | set(target)):
        if path not in target:
            return f"it holds {path}, which this model lacks"
        if path not in saved:
            return f"it lacks {path}"
        if saved[path] != target[path]:
            return f"{path} has shape {saved[path]} there, {target[path]} here"
    return None


def _restore_target(leaf) -> jax.ShapeDtypeStruct:
    """What orbax restores a leaf of `like` into: its shape, dtype and sharding, or, for a
    shape without one (a reader's `jax.eval_shape`), this process's first device: else orbax
    would take the saving run's sharding, whose devices (a CPU split into 8) this process
    may lack."""
    if not isinstance(leaf, jax.ShapeDtypeStruct):
        # jnp.asarray: a Python scalar (a new TrainState's step) restores as the int32 it was.
        return ocp.utils.to_shape_dtype_struct(jnp.asarray(leaf))
    if leaf.sharding is None:
        return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                    sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    return leaf


def _vanishing(step_directory: str, wait_seconds: float = 1.0) -> bool:
    """Whether a step whose read failed is gone or going: orbax deletes an old step in place,
    file by file, so a read it cuts short may find the folder for a moment more."""
    deadline = time.monotonic() + wait_seconds
    while os.path.isdir(step_directory) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not os.path.isdir(step_directory)


def read_step(step_directory: str, step: int, like, data_iterator=None) -> tuple:
    """(state, record, restored) of the checkpoint of `step`, restored with the structure and sharding
    of `like`, after the checks of docs/records.md, and whether `data_iterator` (a grain
    iterator), when given and the step holds one, was set to the saved iterator state.

    Raises:
      CheckpointError: the checkpoint is malformed, another model's, or changed since saved.
      FileNotFoundError: the step vanished while it was read.
    """
    try:
        record = read_record(step_directory, step)
        target = jax.tree.map(_restore_target, like)
        differs = mismatch(ocp.StandardCheckpointHandler().metadata(
            epath.Path(step_directory) / STATE), target)
        if differs:
            raise CheckpointError(f"checkpoint {step_directory} does not match this model "
                                  f"({differs}): use another --workdir for another model.")
        items = {STATE: ocp.args.StandardRestore(target)}
        streamed = data_iterator is not None and os.path.isdir(os.path.join(step_directory, DATA))
        if streamed:
            import grain

            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        with ocp.Checkpointer(ocp.CompositeCheckpointHandler(**_handlers(streamed))) as reader:
            state = reader.restore(step_directory, args=ocp.args.Composite(**items))[STATE]
    except Exception as err:  # orbax and tensorstore raise bare Exceptions as well
        if _vanishing(step_directory):
            raise FileNotFoundError(step_directory) from err
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"cannot restore checkpoint {step_directory} ({type(err).__name__}"
                              f": {' '.join(str(err).split())[:300]}).") from err
    held = int(jax.device_get(state.step))
    if held != step:
        raise _corrupted(step_directory, f"it holds the state of step {held}, not {step}")
    if state_digest(state) != record["digest"]:
        raise _corrupted(step_directory, "its state differs from the digest saved with it")
    return state, record, streamed


def restore_committed(workdir: str, like, check=None) -> tuple:
    """(state, step, record) of the newest finalized checkpoint of the run in `workdir`, with
    the structure of `like`: safe while that run trains, saves and deletes old steps (orbax
    renames a step to its number once complete; a step that vanishes gives way to the next
    newest, and a listing whose every step vanished is read again). `check(record, step)`,
    if given, may refuse a step by its record before its state is read.

    Raises:
      CheckpointError: no checkpoint, or the newest is unusable (see `read_step`).
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    for _ in range(3):
        names = os.listdir(directory) if os.path.isdir(directory) else []
        for step in sorted((int(name) for name in names if name.isdigit()), reverse=True):
            step_directory = os.path.join(directory, str(step))
            try:
                if check is not None:
                    check(read_record(step_directory, step), step)
                state, record, _ = read_step(step_directory, step, like)
                return state, step, record
            except FileNotFoundError:
                continue
    raise CheckpointError(f"{directory} holds no checkpoint: train the run first, or retry "
                          "once it has saved one.")


def resumed_config(workdir: str, config: dict, step: int, may_change=(),
                   record_changes: bool = True) -> dict:
    """The config a run resumed from `step` saves in config.json, after refusing one whose
    settings differ from the saved config.json's, whatever keys it holds, before any compute.

    Settings named in `may_change` (keys of `config`, "learning_rate") may differ: each
    change is appended to the config's "changes" list as {"step", "setting", "saved", "now"};
    with `record_changes=False` (a finished run, which trains no more) the saved config is
    returned unchanged.

    Raises:
      CheckpointError: a setting differs; the message names each.
    """
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return config
    saved = files.read_record(path)
    history = saved.pop("changes", [])
    if not isinstance(history, list):
        raise RecordError(f"{path} is malformed: its 'changes' is no list.")
    _refuse_other_data(workdir, saved, config)
    flat_saved, flat_now = (traverse_util.flatten_dict(_without_data(c), sep=".")  # "a.b"
                            for c in (saved, config))
    differ = sorted(k for k in set(flat_saved) | set(flat_now)
                    if files.to_json(flat_saved.get(k)) != files.to_json(flat_now.get(k)))
    fixed = [k for k in differ if k not in may_change]
    if fixed:
        details = ", ".join(f"{k}: saved {flat_saved.get(k)!r}, now {flat_now.get(k)!r}"
                            for k in fixed)
        raise CheckpointError(f"the workdir {workdir} holds checkpoints of a different run "
                              f"({details}). Use another --workdir, or delete that one to start "
                              "over.")
    if not record_changes:
        return {**saved, "changes": history} if history else saved
    history += [{"step": step, "setting": k, "saved": flat_saved.get(k), "now": flat_now.get(k)}
                for k in differ]
    return {**config, "changes": history} if history else config


def _without_data(config: dict) -> dict:
    return {k: v for k, v in config.items() if k != "data"}


def _refuse_other_data(workdir: str, saved: dict, config: dict) -> None:
    """Refuses a resume on data other than the run's: their recorded identities
    (`lvm_jax.data.identity`) must hold the same data, wherever it now lies. A run that
    recorded none (built in Python) is not compared."""
    if "data" not in saved or "data" not in config:
        return
    reason = identity.mismatch(saved["data"], identity.DataIdentity.from_json(config["data"]))
    if reason:
        raise DataError(f"the workdir {workdir} holds a run of other data: {reason} Resume it "
                        "with its own data, or use another --workdir.")


class Checkpointer:
    """Saves a run's TrainState with its record under <workdir>/checkpoints/<step>, keeping the
    newest `keep` steps, and a `streamed` run's data iterator beside each; a save that is not
    forced waits `interval_seconds` (0: none) after the previous one. A save returns once
    the state is copied to host memory; orbax writes it in the background and commits the
    step whole. Use it as a context manager, so that the last save is committed."""

    def __init__(self, workdir: str, keep: int = 2, streamed: bool = False,
                 interval_seconds: float = 0.0):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        for name in ["", *(os.listdir(self.directory) if os.path.isdir(self.directory) else [])]:
            files.refuse_link(os.path.join(self.directory, name).rstrip("/"))  # orbax deletes
        self.manager = ocp.CheckpointManager(
            self.directory, item_handlers=_handlers(streamed),
            # An old step is deleted on orbax's thread: in the foreground, the next save waited
            # for it (40 ms a step, measured).
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_background_delete=True,
                save_decision_policy=ocp.checkpoint_managers.ContinuousCheckpointingPolicy(
                    minimum_interval_secs=interval_seconds) if interval_seconds else None))

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.manager.close()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def save(self, state, config: dict, timing: dict, data_iterator=None,
             force: bool = True) -> None:
        """Starts saving `state` at its step, unless saved or, without `force`, less than
        `interval_seconds` after the previous save began or while it is written (orbax's
        `ContinuousCheckpointingPolicy`), with its record ({"step", "config", "timing",
        "digest"}) and `data_iterator`'s state (grain's protocol) when given."""
        step = int(jax.device_get(state.step))
        if step in self.manager.all_steps() or not (force or self.manager.should_save(step)):
            return
        record = {"step": step, "config": config, "timing": timing,
                  "digest": state_digest(state)}
        items = {STATE: ocp.args.StandardSave(state), RECORD: ocp.args.JsonSave(record)}
        if data_iterator is not None:
            import grain

            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is committed."""
        self.manager.wait_until_finished()

    def restore(self, like, data_iterator=None) -> tuple:
        """(state, record, whether `data_iterator` was restored) of the newest checkpoint
        (see `read_step`)."""
        step = self.latest_step()
        return read_step(self.step_directory(step), step, like, data_iterator)
