"""Orbax checkpoints of the TrainState, verified on restore, with clear errors for unusable ones.

Beside each step's arrays, <workdir>/checkpoints/<step>/record.json keeps the
SHA-256 of every saved array (computed on the host from the state that was
saved) and the run's timing at that step. A restore recomputes the digests and
refuses a checkpoint whose bytes changed, naming the earlier steps that are
still intact; nothing on disk is changed. A checkpoint written before records
existed restores with a warning that it cannot be verified.
"""

import hashlib
import json
import os
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

from lvm_jax.errors import CheckpointError
from lvm_jax.train import records

RECORD_FILE = "record.json"


def array_digests(state) -> dict[str, str]:
    """{path of each array leaf of `state`: SHA-256 of its dtype, shape and bytes}.

    Fully replicated arrays (the TrainState `fit` keeps) are read on every host.
    """
    digests = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
        array = np.ascontiguousarray(jax.device_get(leaf))
        digest = hashlib.sha256(f"{array.dtype.str}{array.shape}".encode())
        digest.update(array.tobytes())
        digests[jax.tree_util.keystr(path)] = digest.hexdigest()
    return digests


class Checkpointer:
    """Saves the TrainState under `workdir`/checkpoints/<step>, keeping the newest `keep`.

    Orbax writes each step into a temporary directory and renames it when
    complete, so an interrupted save never replaces a good checkpoint. Use it
    as a context manager, or call `close`, so that orbax's background threads
    finish before the interpreter shuts down.
    """

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.config_path = os.path.join(os.path.abspath(workdir), "config.json")
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def step_directory(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    def check_config(self, config: dict, step: int, may_change=()) -> dict:
        """Refuses to resume from `step` a run whose saved config differs from `config`, before
        any compute, and returns the config to save.

        Settings named in `may_change` (dotted paths such as "train.learning_rate") may
        differ: each change is appended to the saved config's "changes" list as
        {"step", "setting", "saved", "now"}, so config.json tells which value held when.
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
        history += [{"step": step, "setting": k, "saved": flat_saved.get(k), "now": flat_now.get(k)}
                    for k in differ]
        return {**config, "changes": history} if history else config

    def save_config(self, config: dict) -> None:
        records.write_json(self.config_path, config)

    def save(self, state, timing: dict) -> None:
        """Saves `state` at its step with its array digests and `timing` (a dict of numbers)."""
        step = int(jax.device_get(state.step))
        if step in self._manager.all_steps():
            return
        self._manager.save(step, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()
        records.write_json(os.path.join(self.step_directory(step), RECORD_FILE),
                           {"sha256": array_digests(state), "timing": timing})

    def close(self) -> None:
        self._manager.close()

    def timing(self, step: int) -> dict:
        """The `timing` saved with `step` ({} for a checkpoint without a record)."""
        record = self._record(step)
        return record["timing"] if record else {}

    def _record(self, step: int) -> dict | None:
        path = os.path.join(self.step_directory(step), RECORD_FILE)
        if not os.path.exists(path):
            return None
        try:
            return records.read_json(path)
        except (OSError, json.JSONDecodeError) as err:
            raise CheckpointError(f"cannot read {path} ({err}): {self._advice(step)}") from err

    def _restore_step(self, step: int, target):
        """Restores `step` into `target` and checks its digests; raises CheckpointError."""
        try:
            state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except (ValueError, TypeError, KeyError, OSError, RuntimeError) as err:
            raise CheckpointError(
                f"cannot restore checkpoint {self.step_directory(step)}: it is corrupted or does "
                f"not match this model ({type(err).__name__}: {err})") from err
        record = self._record(step)
        if record is not None and array_digests(state) != record["sha256"]:
            raise CheckpointError(f"checkpoint {self.step_directory(step)} is corrupted: its "
                                  "arrays differ from the digests saved with them")
        return state, record is not None

    def _intact_steps(self, before: int, target) -> list[int]:
        intact = []
        for step in self.all_steps():
            if step < before:
                try:
                    self._restore_step(step, target)
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
          CheckpointError: the checkpoint does not match `like`, or its arrays are not the
            ones saved (the message lists the earlier steps that are intact).
        """
        step = self.latest_step()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            state, verified = self._restore_step(step, target)
        except CheckpointError as err:
            raise CheckpointError(
                f"{err}. {self._advice(step, self._intact_steps(step, target))}.") from err
        if not verified and records.is_primary():
            print(f"warning: checkpoint {self.step_directory(step)} has no {RECORD_FILE} (it was "
                  "saved by an older lvm_jax), so its arrays cannot be verified", file=sys.stderr)
        return state


def _flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
