"""Orbax checkpoints of the TrainState, verified before restore, with clear errors for unusable ones.

Beside each step's files, <workdir>/checkpoints/<step>/record.json keeps the
step itself, the SHA-256 of every file orbax wrote for that step, the run's
timing at that step and the run's config (config.json without its "changes").
A restore first recomputes the digests and refuses a checkpoint whose bytes
changed, or whose record names another step than its folder (folders swapped
or renamed), naming the earlier steps that are still intact, before orbax
reads any of it (a damaged file read by orbax may restore silently changed
numbers, or fail halfway with its reads still in flight); nothing on disk is
changed. The restored state's own step must match too. A checkpoint without a
record (written before records existed, or by a run stopped between the two
writes) restores with a warning that it cannot be verified. A step folder that
is a symbolic link is refused before orbax, which deletes old steps, touches
anything.

`restore_committed` reads a run that may be training at the same time (for
`experiments.evaluate.load_run`): it never uses orbax's manager (whose start
cleans up the saves in flight), reads the newest step whose record verifies
(a step being written has none yet), and takes the next older one when a step
vanishes under it (the training run deleting an old step).

A streamed run (`lvm_jax.train.feeds.StreamFeed`) saves its grain iterator's
state beside the train state, as the orbax item "data_iterator" (one JSON file
per process, grain's own orbax handler), covered by the same record; the train
state is the item "default", where a checkpoint of one item keeps it.
"""

import contextlib
import hashlib
import logging
import os
import shutil
import sys
import tempfile
import threading
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from lvm_jax.errors import CheckpointError, RecordError
from lvm_jax.train import records

RECORD_FILE = "record.json"
# What record.json holds, and the type of each. "step" and "config" are absent from the
# records of lvm_jax before they were added; a record with any other key is malformed.
RECORD_KEYS = {"sha256": dict, "timing": dict, "step": int, "config": dict}
REQUIRED_RECORD_KEYS = ("sha256", "timing")
# orbax's folder of the TrainState inside a step's folder (the manager's default item).
ITEM = "default"
# orbax's folder of a streamed run's input pipeline state (`lvm_jax.train.feeds`).
DATA_ITEM = "data_iterator"

logging.getLogger("absl").addFilter(records.QuietDiskErrors())


def _quiet_closed_loop_callbacks(previous_hook):
    """A sys.unraisablehook that drops the "Event loop is closed" errors of tensorstore's
    callbacks: when a save or read fails halfway (a full disk), the writes still in flight
    complete into orbax's closed event loop, and tensorstore reports each failed callback as
    unraisable, dozens of tracebacks around the one line that names the failure. Every
    other unraisable error goes to `previous_hook`."""

    def hook(unraisable):
        traceback = unraisable.exc_traceback
        if (unraisable.exc_type is RuntimeError
                and str(unraisable.exc_value) == "Event loop is closed"
                and traceback is not None
                and traceback.tb_frame.f_code.co_name == "call_soon_threadsafe"):
            return
        previous_hook(unraisable)

    return hook


sys.unraisablehook = _quiet_closed_loop_callbacks(sys.unraisablehook)


def file_digests(directory: str) -> dict[str, str]:
    """{path relative to `directory`: SHA-256 of the file} for every file under it but the
    record itself."""
    digests = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory)
            if relative != RECORD_FILE:
                with open(path, "rb") as f:
                    digests[relative] = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(sorted(digests.items()))


def refuse_linked_steps(directory: str) -> None:
    """Refuses a checkpoints/ folder, or a step folder in it, that is a symbolic link, before
    anything there is read or changed: orbax would delete its target's files, or restore
    another run's state under this run's step.

    Raises:
      CheckpointError: naming the link and its target.
    """
    listed = os.path.isdir(directory) and not os.path.islink(directory)
    names = sorted(os.listdir(directory)) if listed else []
    for path in [directory, *(os.path.join(directory, name) for name in names)]:
        if os.path.islink(path):
            raise CheckpointError(f"checkpoint folder {path} is a symbolic link (to "
                                  f"{os.readlink(path)}): refused before anything was changed. "
                                  "Remove the link (a step's folder must be the run's own), or "
                                  "use another --workdir.")


def step_folders(directory: str) -> list[int]:
    """The steps of the finished step folders in `directory` (named by a number; orbax writes
    a step into a temporary folder and renames it when complete), oldest first."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(name) for name in os.listdir(directory)
                  if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def read_step_record(step_directory: str, step: int, name: str | None = None) -> dict | None:
    """The record of the checkpoint of `step` in `step_directory`, checked: None when it has
    none.

    Raises:
      CheckpointError: the record is unreadable or malformed (a key missing, unknown or of
        the wrong type), or names another step than `step`.
      FileNotFoundError: the folder vanished while it was read (an old step deleted).
    """
    path = os.path.join(step_directory, RECORD_FILE)
    if not os.path.exists(path):
        if not os.path.isdir(step_directory):
            raise FileNotFoundError(step_directory)
        return None
    name = name or step_directory
    try:
        record = records.read_record(path, CheckpointError)
    except CheckpointError as err:
        raise CheckpointError(f"checkpoint {name} is corrupted: "
                              f"{str(err).rstrip('.').replace(step_directory, name)}") from None
    problems = [f"it lacks {key!r}" for key in REQUIRED_RECORD_KEYS if key not in record]
    problems += [f"{key!r} is no {RECORD_KEYS[key].__name__}" for key in record
                 if key in RECORD_KEYS and (not isinstance(record[key], RECORD_KEYS[key])
                                            or isinstance(record[key], bool))]
    problems += [f"it holds the unknown key {key!r}" for key in record if key not in RECORD_KEYS]
    if not problems and not all(isinstance(v, str) for v in record["sha256"].values()):
        problems.append("'sha256' holds a digest that is no text")
    if not problems and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in record["timing"].values()):
        problems.append("'timing' holds a value that is no number")
    if not problems and record.get("step", step) != step:
        problems.append(f"it records step {record['step']} in the folder of step {step} (step "
                        "folders renamed or swapped)")
    if problems:
        raise CheckpointError(f"checkpoint {name} is corrupted: its {RECORD_FILE} is "
                              f"malformed ({problems[0]})")
    return record


def verify(step_directory: str, step: int, name: str | None = None) -> dict | None:
    """The record of the checkpoint of `step`, after checking its files against it; None
    for a checkpoint without a record. Messages show the folder as `name` (default
    `step_directory`), whose disappearance means that the step vanished.

    Raises:
      CheckpointError: its record is malformed (`read_step_record`), or its files differ
        from the digests it holds.
      FileNotFoundError: the step vanished while it was read (deleted by the run that wrote
        it), rather than corrupted: files missing from a folder that is gone a moment later.
    """
    name = name or step_directory
    record = read_step_record(step_directory, step, name)
    if record is None:
        return None
    digests = file_digests(step_directory)
    if digests != record["sha256"]:
        missing_only = (set(digests) < set(record["sha256"])
                        and all(record["sha256"][k] == v for k, v in digests.items()))
        if missing_only:
            time.sleep(0.2)  # orbax deletes an old step file by file: let it finish
            if not os.path.isdir(name):
                raise FileNotFoundError(name)
        raise CheckpointError(f"checkpoint {name} is corrupted: its files differ "
                              f"from the digests in its {RECORD_FILE}")
    return record


def restored_step(state, step_directory: str, step: int):
    """`state`, after checking that its own step is `step`, that of its folder.

    Raises:
      CheckpointError: it holds another step (step folders renamed or swapped).
    """
    held = int(jax.device_get(state.step))
    if held != step:
        raise CheckpointError(f"checkpoint {step_directory} is corrupted: it holds the state of "
                              f"step {held}, not {step} (step folders renamed or swapped). "
                              "Delete it to resume from an earlier step, or use another "
                              "--workdir.")
    return state


def restore_committed(workdir: str, like, check=None) -> tuple:
    """(state, step, record) of the newest committed checkpoint of the run in `workdir`, with
    the structure of `like`: safe while that run trains and saves (see the module docstring).

    Committed means its record verifies; a run whose steps have no record (an older
    lvm_jax) restores its newest step with a warning. Each step is read from hard links
    to its files (`_pinned`), which outlive the training run's deletion of that step; a
    step that vanishes before it is pinned gives way to the next older one, and a listing
    whose every step vanished is read once more. `check(record, step)`, if given, is
    called before the step's state is read, to refuse it by its record.

    Raises:
      CheckpointError: no checkpoint, a corrupted one, or one that does not match `like`.
    """
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    for _ in range(2):
        refuse_linked_steps(directory)
        steps = step_folders(directory)
        if not steps:
            raise CheckpointError(f"{directory} holds no checkpoint: train the run first.")
        unrecorded = []
        for step in reversed(steps):
            step_directory = os.path.join(directory, str(step))
            try:
                with _pinned(step_directory, workdir) as pinned:
                    record = verify(pinned, step, name=step_directory)
                    if record is None:
                        unrecorded.append(step)
                        continue
                    if check is not None:
                        check(record, step)
                    return _read_item(pinned, step, target, step_directory), step, record
            except FileNotFoundError:
                continue  # deleted by the training run: the next older step is newer than any left
        if unrecorded and len(unrecorded) == len(steps):
            step = unrecorded[0]
            step_directory = os.path.join(directory, str(step))
            print(f"warning: checkpoint {step_directory} has no {RECORD_FILE} (saved by an "
                  "older lvm_jax), so it cannot be verified", file=sys.stderr)
            return _read_item(step_directory, step, target, step_directory), step, {}
    raise CheckpointError(f"{directory} holds no committed checkpoint (every step vanished or "
                          "is still being written): retry once the run has saved one.")


def newest_record(workdir: str) -> tuple[int, dict] | None:
    """(step, record) of the newest step of `workdir` that has a record (read and checked,
    not its files), or None: what a reader compares the run's config with before it builds
    anything from that config."""
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    refuse_linked_steps(directory)
    for step in reversed(step_folders(directory)):
        try:
            record = read_step_record(os.path.join(directory, str(step)), step)
        except FileNotFoundError:
            continue
        if record is not None:
            return step, record
    return None


@contextlib.contextmanager
def _pinned(step_directory: str, workdir: str):
    """A private folder of hard links to the files of `step_directory`, for the `with` block:
    orbax never rewrites a committed step's files, so the links hold that step as it was
    even while the training run deletes it. Where links cannot be made (a read-only
    workdir, a file system without them), the step is read in place.

    Raises:
      FileNotFoundError: the step vanished while it was pinned.
    """
    try:
        # Absolute: orbax refuses a relative path, and a workdir may be given as one.
        pinned = tempfile.mkdtemp(prefix=".reading-", dir=os.path.abspath(workdir))
    except OSError:
        pinned = None
    try:
        source = step_directory
        if pinned is not None:
            try:
                for root, folders, names in os.walk(step_directory):
                    relative = os.path.relpath(root, step_directory)
                    for folder in folders:
                        os.mkdir(os.path.join(pinned, relative, folder))
                    for name in names:
                        os.link(os.path.join(root, name), os.path.join(pinned, relative, name))
                source = pinned
            except FileNotFoundError:
                raise
            except OSError:
                pass  # no hard links here (EXDEV, EPERM): read in place
            if not os.path.isdir(step_directory):
                raise FileNotFoundError(step_directory)
        yield source
    finally:
        if pinned is not None:
            shutil.rmtree(pinned, ignore_errors=True)


def _read_item(step_directory: str, step: int, target, name: str):
    """The state saved in `step_directory` (shown as `name`), read by orbax's handler alone
    (no manager)."""
    item = epath.Path(step_directory) / ITEM
    handler = ocp.StandardCheckpointHandler()
    try:
        mismatch = _first_mismatch(handler.metadata(item), target)
        if mismatch:
            raise CheckpointError(f"checkpoint {name} does not match this model ({mismatch}).")
        state = handler.restore(item, args=ocp.args.StandardRestore(target))
    except CheckpointError:
        raise
    except Exception as err:  # orbax and tensorstore raise bare Exceptions as well
        if not os.path.isdir(step_directory):
            raise FileNotFoundError(step_directory) from err
        raise CheckpointError(f"cannot restore checkpoint {name}: it does not match this "
                              f"model, or is corrupted ({type(err).__name__}: "
                              f"{str(err)[:300]}).") from err
    finally:
        handler.close()
    return restored_step(state, name, step)


class Checkpointer:
    """Saves the TrainState under `workdir`/checkpoints/<step>, keeping the newest `keep`.

    Orbax writes each step into a temporary directory and renames it when
    complete, so an interrupted save never replaces a good checkpoint. A save
    returns once the state is copied to host memory and writes its files in the
    background while training goes on; a background thread writes its record as
    soon as they are complete, so a run killed later leaves a verifiable
    checkpoint. Every other method waits for that thread first (the next save,
    a read of the checkpoints, `wait`, `close`), so the manager is never used by
    two threads at once. Use it as a context manager, or call `close`, so that
    the last save is complete, with its record, before the interpreter shuts down.
    """

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.config_path = os.path.join(os.path.abspath(workdir), "config.json")
        refuse_linked_steps(self.directory)  # before orbax, which cleans up and deletes there
        self._run_config = None  # the config each record keeps, once save_config set it
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            # Named, so that the metadata reads before a save.
            item_handlers={ITEM: ocp.StandardCheckpointHandler(),
                           DATA_ITEM: grain.checkpoint.CheckpointHandler()})
        self._recorder: threading.Thread | None = None  # writes the record of the save in flight
        self._recorder_error: BaseException | None = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        self.wait()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        self.wait()
        return sorted(self._manager.all_steps())

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check_config(self, config: dict, step: int, may_change=(), record_changes: bool = True
                     ) -> dict:
        """Refuses to resume from `step` a run whose saved config differs from `config`, before
        any compute, and returns the config to save.

        Settings named in `may_change` (dotted paths such as "train.learning_rate") may
        differ: each change is appended to the saved config's "changes" list as
        {"step", "setting", "saved", "now"}, so config.json tells which value held when;
        with `record_changes=False` (a finished run, which trains no more) the saved config
        is returned unchanged.
        """
        if not os.path.exists(self.config_path):
            return config
        saved = records.read_record(self.config_path)
        history = saved.pop("changes", [])
        if not isinstance(history, list):
            raise RecordError(f"{self.config_path} is malformed: its 'changes' is no "
                                      "list.")
        flat_saved, flat_now = _flatten(saved), _flatten(config)
        differ = sorted(k for k in set(flat_saved) | set(flat_now)
                        if records.to_json(flat_saved.get(k)) != records.to_json(flat_now.get(k)))
        fixed = [k for k in differ if k not in may_change]
        if fixed:
            details = ", ".join(f"{k}: saved {flat_saved.get(k)!r}, now {flat_now.get(k)!r}"
                                for k in fixed)
            raise CheckpointError(
                f"the workdir {os.path.dirname(self.directory)} holds checkpoints of a different "
                f"run ({details}). Use another --workdir, or delete that one to start over.")
        if not record_changes:
            return {**saved, "changes": history} if history else saved
        history += [{"step": step, "setting": k, "saved": flat_saved.get(k), "now": flat_now.get(k)}
                    for k in differ]
        return {**config, "changes": history} if history else config

    def save_config(self, config: dict) -> None:
        """Writes config.json; each checkpoint's record keeps it too, without its "changes"."""
        self._run_config = {k: v for k, v in config.items() if k != "changes"}
        records.write_json(self.config_path, config)

    def save(self, state, timing: dict | None = None, data_iterator=None) -> None:
        """Starts saving `state` at its step, with the digests of its files and `timing` (a
        dict of numbers that `timing(step)` returns) once they are written; returns when
        `state` is copied to host memory, so training may go on (see the class docstring).
        `data_iterator`: an object whose `get_state()` is the input pipeline's state at
        that step (grain's protocol), saved beside it."""
        step = int(jax.device_get(state.step))
        if step in self.all_steps():
            return
        items = {ITEM: ocp.args.StandardSave(state)}
        if data_iterator is not None:
            items[DATA_ITEM] = grain.checkpoint.CheckpointSave(data_iterator)
        self._manager.save(step, args=ocp.args.Composite(**items))
        self._recorder = threading.Thread(target=self._record_when_saved,
                                          args=(step, timing or {}, self._run_config),
                                          name=f"checkpoint-record-{step}", daemon=True)
        self._recorder.start()

    def _record_when_saved(self, step: int, timing: dict, run_config: dict | None) -> None:
        try:
            self._manager.wait_until_finished()
            directory = self.step_directory(step)
            if records.is_primary():
                record = {"step": step, "sha256": file_digests(directory), "timing": timing}
                if run_config is not None:
                    record["config"] = run_config
                records.write_json(os.path.join(directory, RECORD_FILE), record)
        except BaseException as err:  # re-raised by wait(), in the caller's thread
            self._recorder_error = err

    def wait(self) -> None:
        """Blocks until the save in flight, if any, is complete on disk with its record."""
        if self._recorder is None:
            return
        self._recorder.join()
        self._recorder = None
        error, self._recorder_error = self._recorder_error, None
        if error is not None:
            raise error

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()

    def timing(self, step: int) -> dict:
        """The `timing` saved with `step` ({} for a checkpoint without a record)."""
        self.wait()
        record = self._record(step)
        return record["timing"] if record else {}

    def _record(self, step: int) -> dict | None:
        return read_step_record(self.step_directory(step), step)

    def _verify(self, step: int) -> bool:
        """Whether `step` has a record; raises CheckpointError when it or its files are not
        the ones saved (`verify`)."""
        return verify(self.step_directory(step), step) is not None

    def _intact_steps(self, before: int) -> list[int]:
        intact = []
        for step in self.all_steps():
            if step < before:
                try:
                    if self._verify(step):
                        intact.append(step)
                except CheckpointError:
                    pass
        return intact

    def _advice(self, step: int, intact: list[int] | None = None) -> str:
        if intact:
            return (f"the earlier step(s) {', '.join(map(str, intact))} are intact: delete "
                    f"{self.step_directory(step)} to resume from step {intact[-1]}, or use "
                    "another --workdir")
        return (f"no earlier step is intact: delete {os.path.dirname(self.directory)} to start "
                "over, or use another --workdir")

    def restore(self, like, data_iterator=None):
        """Restores the latest checkpoint with the structure and sharding of `like`; and
        its input pipeline's state into `data_iterator` (grain's `set_state` protocol),
        when given and the checkpoint has one (a checkpoint of the memory path has none).

        Raises:
          CheckpointError: the checkpoint's files are not the ones saved (the message lists
            the earlier steps that are intact), or it does not match `like`.
        """
        step = self.latest_step()
        try:
            verified = self._verify(step)
        except CheckpointError as err:
            raise CheckpointError(f"{err}; {self._advice(step, self._intact_steps(step))}.") from err
        if not verified and records.is_primary():
            print(f"warning: checkpoint {self.step_directory(step)} has no {RECORD_FILE} (saved "
                  "by an older lvm_jax, or stopped before writing it), so it cannot be verified",
                  file=sys.stderr)
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            # Checked first: orbax fails a mismatched restore halfway, with reads still in
            # flight that later call back into its closed event loop.
            mismatch = _first_mismatch(self._manager.item_metadata(step)[ITEM], target)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint {self.step_directory(step)} does not match this model "
                    f"({mismatch}): use another --workdir for a different model; from Python, "
                    "experiments.evaluate.load_run rebuilds a run's own model and state.")
            items = {ITEM: ocp.args.StandardRestore(target)}
            if data_iterator is not None and os.path.isdir(
                    os.path.join(self.step_directory(step), DATA_ITEM)):
                items[DATA_ITEM] = grain.checkpoint.CheckpointRestore(data_iterator)
            state = self._manager.restore(step, args=ocp.args.Composite(**items))[ITEM]
        except (ValueError, TypeError, KeyError, OSError) as err:
            raise CheckpointError(
                f"cannot restore checkpoint {self.step_directory(step)}: it does not match this "
                f"model, or is corrupted ({type(err).__name__}: {err}). Delete that step's "
                "directory to resume from an earlier one, or use another --workdir.") from err
        return restored_step(state, self.step_directory(step), step)


def _flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _leaf_shapes(tree) -> dict[str, tuple]:
    """{"params/Dense_0/kernel": shape} of every leaf, for a state or orbax's metadata of one."""
    def name(entry):
        return str(getattr(entry, "key", getattr(entry, "idx", getattr(entry, "name", entry))))

    return {"/".join(map(name, path)): tuple(getattr(leaf, "shape", ()))
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _first_mismatch(saved, target) -> str | None:
    """The first difference of arrays and shapes between a checkpoint and a target, or None."""
    saved, target = _leaf_shapes(saved), _leaf_shapes(target)
    for path in sorted(set(saved) | set(target)):
        if path not in target:
            return f"it holds {path}, this model has none"
        if path not in saved:
            return f"it lacks {path}"
        if saved[path] != target[path]:
            return f"{path} has shape {saved[path]} there, {target[path]} here"
    return None
