"""Orbax checkpoints of the TrainState, verified before restore, with clear errors for unusable ones.

Beside each step's files, <workdir>/checkpoints/<step>/record.json keeps the
SHA-256 of every file orbax wrote for that step, and the run's timing at that
step. A restore first recomputes the digests and refuses a checkpoint whose
bytes changed, naming the earlier steps that are still intact, before orbax
reads any of it (a damaged file read by orbax may restore silently changed
numbers, or fail halfway with its reads still in flight); nothing on disk is
changed. A checkpoint without a record (written before records existed, or
by a run stopped between the two writes) restores with a warning that it
cannot be verified.
"""

import hashlib
import os
import sys
import threading

import jax
import orbax.checkpoint as ocp

from lvm_jax.errors import CheckpointError
from lvm_jax.train import records

RECORD_FILE = "record.json"


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
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
            item_handlers=ocp.StandardCheckpointHandler())  # so its metadata reads before a save
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
        saved = records.read_json(self.config_path)
        history = saved.pop("changes", [])
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
        records.write_json(self.config_path, config)

    def save(self, state, timing: dict | None = None) -> None:
        """Starts saving `state` at its step, with the digests of its files and `timing` (a
        dict of numbers that `timing(step)` returns) once they are written; returns when
        `state` is copied to host memory, so training may go on (see the class docstring)."""
        step = int(jax.device_get(state.step))
        if step in self.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._recorder = threading.Thread(target=self._record_when_saved, args=(step, timing or {}),
                                          name=f"checkpoint-record-{step}", daemon=True)
        self._recorder.start()

    def _record_when_saved(self, step: int, timing: dict) -> None:
        try:
            self._manager.wait_until_finished()
            directory = self.step_directory(step)
            if records.is_primary():
                records.write_json(os.path.join(directory, RECORD_FILE),
                                   {"sha256": file_digests(directory), "timing": timing})
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
        path = os.path.join(self.step_directory(step), RECORD_FILE)
        if not os.path.exists(path):
            return None
        try:
            return records.read_json(path)
        except (OSError, ValueError) as err:  # unreadable, or not UTF-8 JSON
            raise CheckpointError(f"checkpoint {self.step_directory(step)} is corrupted: cannot "
                                  f"read its {RECORD_FILE} ({err})") from err

    def _verify(self, step: int) -> bool:
        """Whether `step` has a record; raises CheckpointError when its files differ from it."""
        record = self._record(step)
        if record is None:
            return False
        if file_digests(self.step_directory(step)) != record["sha256"]:
            raise CheckpointError(f"checkpoint {self.step_directory(step)} is corrupted: its "
                                  f"files differ from the digests in its {RECORD_FILE}")
        return True

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

    def restore(self, like):
        """Restores the latest checkpoint with the structure and sharding of `like`.

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
            mismatch = _first_mismatch(self._manager.item_metadata(step), target)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint {self.step_directory(step)} does not match this model "
                    f"({mismatch}): use another --workdir for a different model; from Python, "
                    "experiments.evaluate.load_run rebuilds a run's own model and state.")
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, TypeError, KeyError, OSError) as err:
            raise CheckpointError(
                f"cannot restore checkpoint {self.step_directory(step)}: it does not match this "
                f"model, or is corrupted ({type(err).__name__}: {err}). Delete that step's "
                "directory to resume from an earlier one, or use another --workdir.") from err


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
