"""Orbax checkpoints of the TrainState, with clear errors for unusable ones."""

import os

import jax
import orbax.checkpoint as ocp

from lvm_jax.train import records


class CheckpointError(RuntimeError):
    """A workdir's checkpoint cannot be used: corrupted, or from another model or config."""


class Checkpointer:
    """Saves the TrainState under `workdir`/checkpoints/<step>, keeping the newest `keep`.

    Orbax writes each step into a temporary directory and renames it when
    complete, so an interrupted save never replaces a good checkpoint.
    """

    def __init__(self, workdir: str, keep: int = 2):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        self.config_path = os.path.join(os.path.abspath(workdir), "config.json")
        self._manager = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def check_config(self, config: dict) -> None:
        """Refuses to resume a run whose saved config differs from `config`, before any compute."""
        if self.latest_step() is None or not os.path.exists(self.config_path):
            return
        saved = records.read_json(self.config_path)
        differ = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
        if differ:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {config.get(k)!r}" for k in differ)
            raise CheckpointError(
                f"the workdir {os.path.dirname(self.directory)} holds checkpoints of a different "
                f"run ({details}). Use another --workdir, or delete that one to start over.")

    def save_config(self, config: dict) -> None:
        records.write_json(self.config_path, config)

    def save(self, state) -> None:
        step = int(jax.device_get(state.step))
        if step not in self._manager.all_steps():
            self._manager.save(step, args=ocp.args.StandardSave(state))
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def restore(self, like):
        """Restores the latest checkpoint with the structure and sharding of `like`."""
        step = self.latest_step()
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        try:
            return self._manager.restore(step, args=ocp.args.StandardRestore(target))
        except Exception as err:
            raise CheckpointError(
                f"cannot restore checkpoint {os.path.join(self.directory, str(step))}: it is "
                f"corrupted or does not match this model ({type(err).__name__}: {err}). Delete "
                "that step's directory to resume from an earlier one, or use another --workdir."
            ) from err
