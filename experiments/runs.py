"""A trained run, rebuilt from its workdir's own records: `load_run(workdir)`, and the verbs
every run answers.

    from experiments import load_run
    run = load_run("runs/vqvae/patches_embedded")
    images = run.sample(16, jax.random.key(0), prior="gated")   # uint8 (16, 32, 32, 3)

Each experiment module defines `build(config, record) -> Run`: its models and objectives,
one `Stage` per folder it trains in, from its `Config` and a `record` (config.json's
contents: `common.run_record`). Training calls it before `fit`, `load_run` calls it on the
workdir's config.json, so a run is built one way. The verbs:

* `sample(num, key)`: uint8 images (num, H, W, C) through the model's own prior (2D points
  for vae_2d); `prior=` picks one of several trained priors.
* `reconstruct(x)`, `encode(x)`, `decode(z)`: `x` as stored (e.g. `run.dataset.test[:8]`,
  uint8 images); latents or code grids; images back as uint8.
* `evaluate(examples, key)`: the importance-weighted NLL of each example, where the model has
  such a bound.

A verb a run does not have raises a one-line `ConfigError` saying what it does have.
"""

import dataclasses
import functools
import glob
import importlib
import os
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import common
from lvm_jax import data, evaluate, files
from lvm_jax.data import identity
from lvm_jax.errors import CheckpointError, ConfigError, RecordError
from lvm_jax.train import Objective, initial_state
from lvm_jax.train.checkpoint import restore_committed


@dataclasses.dataclass(frozen=True)
class Stage:
    """What `fit` trains in one folder of a run.

    Attributes:
      experiment: the name its config.json gives (e.g. "vqvae_prior").
      model, objective: the Flax module and the objective `fit` trains.
      example: the shape and dtype of one stored example batch (1, ...), as `fit` sees it.
      tx: the optimizer, when not `fit`'s default Adam.
    """

    experiment: str
    model: nn.Module
    objective: Objective
    example: jax.ShapeDtypeStruct
    tx: optax.GradientTransformation | None = None

    def state_shapes(self, config: common.Config):
        """The shapes and dtypes of the TrainState `fit` trains this stage in (a checkpoint's
        restore target), computed without initialising anything."""
        return jax.eval_shape(lambda example: initial_state(
            self.objective, example, common.train_config(config), self.tx), self.example)


@functools.partial(jax.jit, static_argnames=("model", "method", "num", "noise"))
def compiled(model: nn.Module, variables, *args, method: str, **kwargs):
    """`model.apply(variables, *args, method=method, **kwargs)` as one compiled call (op by op,
    each primitive would compile on its own); `num` and `noise` are static."""
    return model.apply(variables, *args, method=method, **kwargs)


def check_count(num) -> int:
    """`num` if it is a positive int; else a one-line ConfigError."""
    if isinstance(num, bool) or not isinstance(num, (int, np.integer)) or num < 1:
        raise ConfigError(f"the number of samples must be a positive integer, not {num!r}.")
    return int(num)


@dataclasses.dataclass
class Run:
    """A run: its `config`, its `stages` (folder -> Stage, the main stage first; "" is the
    workdir itself), and the trained variables of each stage ({"params": the parameters to
    sample with, the EMA when kept, **other collections}) with their steps."""

    config: Any
    stages: dict[str, Stage]
    workdir: str | None = None
    data_dir: str | None = None
    recorded_data: dict | None = None
    variables: dict[str, dict] = dataclasses.field(default_factory=dict)
    steps: dict[str, int] = dataclasses.field(default_factory=dict)

    def trained(self, folder: str, state) -> "Run":
        """Takes the TrainState `state` (fit's, or restored) as stage `folder`'s; returns self."""
        self.variables[folder] = {"params": state.eval_params, **state.model_state}
        self.steps[folder] = int(state.step)
        return self

    @property
    def main(self) -> str:
        return next(iter(self.stages))

    @property
    def experiment(self) -> str:
        return self.stages[self.main].experiment

    @property
    def step(self) -> int:
        """The main stage's step."""
        return self.steps[self.main]

    @property
    def model(self) -> nn.Module:
        return self.stages[self.main].model

    @property
    def objective(self) -> Objective:
        return self.stages[self.main].objective

    @property
    def params(self):
        return self.variables[self.main]["params"]

    def dataset_name(self) -> str:
        return self.config.dataset

    @property
    def priors(self) -> dict[str, str]:
        """{name: folder} of the trained priors `sample(..., prior=name)` may pick; empty for
        a run whose model has one prior of its own."""
        return {}

    @functools.cached_property
    def dataset(self) -> data.Dataset:
        """The run's dataset (its --quick subset for a --quick run), loaded when first used,
        from `data_dir` where `load_run` was given one."""
        return common.load_dataset(self.config.replace(data_dir=self.data_dir, input="memory"),
                                   self.dataset_name())

    def other_data(self) -> str | None:
        """Why `dataset` holds other data than the run trained on, in one line naming both
        (`lvm_jax.data.identity.mismatch`), or None; None too for a run that recorded no
        data identity."""
        if self.recorded_data is None or self.dataset.identity is None:
            return None
        return identity.mismatch(self.recorded_data, self.dataset.identity)

    def preprocess(self, examples) -> jax.Array:
        """`examples` as stored (e.g. uint8 images) -> the model's input, as the training step
        computed it (`objective.preprocess`)."""
        return self.objective.preprocess(jnp.asarray(examples))

    def sample(self, num: int, key: jax.Array) -> np.ndarray:
        raise self._lacks("sample")

    def reconstruct(self, x) -> np.ndarray:
        raise self._lacks("reconstruct")

    def encode(self, x):
        raise self._lacks("encode")

    def decode(self, z) -> np.ndarray:
        raise self._lacks("decode")

    def evaluate(self, examples, key: jax.Array, num_samples: int = 1000, **kwargs) -> np.ndarray:
        raise self._lacks("evaluate", "no importance-weighted bound")

    # The verbs a subclass defines but cannot answer (the LVAE decodes no latents).
    LACKS: ClassVar[tuple[str, ...]] = ()

    def _lacks(self, verb: str, why: str | None = None) -> ConfigError:
        has = [name for name in VERBS if getattr(type(self), name) is not getattr(Run, name)
               and name not in self.LACKS]
        return ConfigError(f"this {self.experiment} run has {why or f'no {verb}'}: it has "
                           f"{', '.join(has)}.")


VERBS = ("sample", "reconstruct", "encode", "decode", "evaluate")


class BoundRun(Run):
    """A run whose model gives importance weights (`lvm_jax.evaluate.iwae_log_weights`)."""

    def evaluate(self, examples, key: jax.Array, num_samples: int = 1000, chunk: int | None = None,
                 batch_size: int = 10, progress: bool = False) -> np.ndarray:
        """The importance-weighted bound on -log p(x) of each of `examples` (stored), nats,
        with `num_samples` samples each (`lvm_jax.evaluate.iwae_nll`, which see)."""
        return evaluate.iwae_nll(self.model, self.params, examples, key, num_samples, chunk,
                                 batch_size, self.objective.preprocess, progress)


class VAERun(BoundRun):
    """A trained VAE (`lvm_jax.models.vae.VAE`, or a model with its methods): latents are the
    posterior means; what the decoder gives back passes through `outputs` (images by
    default)."""

    def outputs(self, x) -> np.ndarray:
        """The decoder's means as the verbs return them: uint8 images."""
        return to_images(x)

    def sample(self, num: int, key: jax.Array, noise: bool = False) -> np.ndarray:
        """`num` decoder means at z ~ p(z) (draws x ~ p(x|z) with `noise`, same z for the
        same key)."""
        return self.outputs(compiled(self.model, self.variables[self.main], key,
                                     num=check_count(num), noise=noise, method="sample"))

    def reconstruct(self, x, key: jax.Array | None = None) -> np.ndarray:
        """The decoder mean at the encoder mean of each stored example of `x`, or with `key`
        at z ~ q(z|x) (a model whose `reconstruct` takes a key)."""
        keys = () if key is None else (key,)
        return self.outputs(compiled(self.model, self.variables[self.main], self.preprocess(x),
                                     *keys, method="reconstruct"))

    def encode(self, x) -> np.ndarray:
        """The posterior means E[z | x] of stored examples `x`, (N, latent_dim) float32."""
        return np.asarray(compiled(self.model, self.variables[self.main], self.preprocess(x),
                                   method="encode")[0])

    def decode(self, z) -> np.ndarray:
        """The decoder means at latents `z` (N, latent_dim)."""
        return self.outputs(compiled(self.model, self.variables[self.main], jnp.asarray(z),
                                     method=decoder_mean))


def choose_prior(prior: str | None, trained: dict[str, str], default: str) -> str:
    """The folder of prior `prior` among `trained` ({name: folder}, the priors a run trained
    on its current codes), or of `default` (else the first trained) when `prior` is None.

    Raises:
      ConfigError: `prior` is not among them, or none is.
    """
    if not trained:
        raise ConfigError("this run has no prior trained on its current codes: train one (the "
                          "experiment's --prior) before sampling.")
    if prior is None:
        return trained.get(default, next(iter(trained.values())))
    if prior not in trained:
        raise ConfigError(f"this run has no trained prior {prior!r}: it has "
                          f"{', '.join(trained)}.")
    return trained[prior]


def decoder_mean(model, z: jax.Array) -> jax.Array:
    """The mean of p(x | z) of a VAE at latents `z`."""
    return model.likelihood.mean(model.decode(z))


def to_images(x) -> np.ndarray:
    """Images in [-1, 1] (float) -> uint8, as the figures show them."""
    return data.unscale_images(np.asarray(x))


def load_run(workdir: str, data_dir: str | None = None) -> Run:
    """The run in `workdir`, rebuilt from its config.json files and newest committed
    checkpoints, for every experiment: a VQ-VAE or VQ-VAE-2 workdir (or any of its stages'
    folders) gives the model with every prior trained on its current codes; an mlp_vae
    study's runs are its variants' folders. Nothing is trained or encoded; the dataset is
    loaded when first used (`run.dataset`, from `data_dir` if given).

    Safe while the run trains: it reads the newest checkpoint whose record verifies, never a
    step being written or deleted (`checkpoint.restore_committed`).

    Raises:
      CheckpointError: `workdir` holds no trained step (the message says what it holds), or
        a checkpoint that does not match the rebuilt model.
      RecordError: a config.json is malformed, or disagrees with its checkpoint's record.
    """
    root, record = _locate(workdir)
    experiment = common.STAGE_OF.get(record["experiment"], record["experiment"])
    staged = experiment in common.STAGE_OF.values()  # its main stage in <root>/<experiment>
    main_path = os.path.join(root, experiment) if staged else root
    if staged:
        record = _read(os.path.join(main_path, "config.json"))
    module = _module(record, os.path.join(main_path, "config.json"))
    if "example_shape" not in record:
        raise RecordError(f"{os.path.join(main_path, 'config.json')} names no example_shape: "
                          "the run was written by an lvm_jax older than load_run, which cannot "
                          "rebuild it from its records.")
    run = module.build(_config(module, record, main_path), record)
    run.workdir, run.data_dir, run.recorded_data = root, data_dir, record.get("data")
    if staged:
        run.stages.update(_other_stages(module, root, run))
    for folder, stage in run.stages.items():
        if _restore(run, folder, stage) is None and folder == run.main:
            raise CheckpointError(f"{main_path} holds no trained step: {_contents(main_path)}.")
    run.stages = {folder: stage for folder, stage in run.stages.items() if folder in run.steps}
    return run


def _read(path: str) -> dict:
    record = files.read_record(path)
    if not isinstance(record.get("experiment"), str):
        raise RecordError(f"{path} is malformed: its 'experiment' is "
                          f"{'missing' if 'experiment' not in record else 'no str'}.")
    return record


def _module(record: dict, path: str):
    """The experiment module that builds the run `record` (read from `path`) describes."""
    name = record["experiment"]
    if name not in EXPERIMENTS:
        raise RecordError(f"{path} names the experiment {name!r}, which is none of "
                          f"{', '.join(EXPERIMENTS)}.")
    return importlib.import_module(f"experiments.{name}")


EXPERIMENTS = ("vae_2d", "vae", "vlae", "mlp_vae", "lvae", "vqvae", "vqvae2")


def _config(module, record: dict, folder: str):
    try:
        return module.Config.from_saved(record)
    except ConfigError as err:
        raise RecordError(f"{os.path.join(folder, 'config.json')} does not rebuild the run: "
                          f"{err}") from None


def _locate(workdir: str) -> tuple[str, dict]:
    """(the run's root folder, a config.json of it): `workdir` itself, or for a staged run
    given by a stage's folder, its parent."""
    if not os.path.isdir(workdir):
        what = "it is a file" if os.path.exists(workdir) else "it does not exist"
        raise CheckpointError(f"{workdir} is no run's workdir: {what}.")
    own = os.path.join(workdir, "config.json")
    if os.path.exists(own):
        record = _read(own)
        return (os.path.dirname(os.path.abspath(workdir)) if _is_stage(record, workdir)
                else workdir), record
    inner = sorted(glob.glob(os.path.join(glob.escape(workdir), "*", "config.json")))
    for path in inner:
        record = _read(path)
        if _is_stage(record, os.path.dirname(path)):
            return workdir, record
    runs = sorted(os.path.dirname(path) for path in glob.glob(
        os.path.join(glob.escape(workdir), "**", "config.json"), recursive=True))
    if runs:
        raise CheckpointError(f"{workdir} holds no run of its own, but the runs in "
                              f"{', '.join(runs)}: load one of those.")
    raise CheckpointError(f"{workdir} holds no config.json, so no run: {_contents(workdir)}.")


def _is_stage(record: dict, folder: str) -> bool:
    """Whether `folder`, whose config.json holds `record`, is a stage of a staged run: a
    prior's, or the main stage's (named as its experiment, e.g. <workdir>/vqvae)."""
    experiment = record["experiment"]
    return experiment in common.STAGE_OF or (
        experiment in common.STAGE_OF.values()
        and os.path.basename(os.path.normpath(folder)) == experiment)


def _other_stages(module, root: str, run: Run) -> dict[str, Stage]:
    """The stages of `run` trained in other folders of `root` (each prior a run trained), as
    their own config.json files build them."""
    stages = {}
    for path in sorted(glob.glob(os.path.join(glob.escape(root), "*", "config.json"))):
        record = _read(path)
        if common.STAGE_OF.get(record["experiment"]) == run.experiment:
            folder = os.path.basename(os.path.dirname(path))
            built = module.build(_config(module, record, os.path.dirname(path)), record).stages
            stages[folder] = built[folder]
    return stages


def _restore(run: Run, folder: str, stage: Stage) -> int | None:
    """Restores stage `folder` of `run` (`Run.trained`) and returns its step; None when the
    folder holds no checkpoint, or (a prior) one trained on the codes of another step of the
    main stage than the one restored."""
    path = os.path.join(run.workdir, folder)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        return None
    record = _read(config_path)
    codes_step = record.get(f"{run.experiment}_step")
    if folder != run.main and codes_step != run.step:
        return None
    checkpoints = os.path.join(path, "checkpoints")
    if not os.path.isdir(checkpoints) or not any(n.isdigit() for n in os.listdir(checkpoints)):
        return None

    def same_run(saved: dict, step: int) -> None:
        differ = _differences(record, saved.get("config"), run.config.may_change_on_resume())
        if differ:
            raise RecordError(
                f"{config_path} does not match the checkpoint of step {step} ({differ[0]}): "
                "config.json was edited, or the checkpoint is another run's. Restore "
                "config.json, or load the run the checkpoint belongs to.")

    state, step, _ = restore_committed(path, stage.state_shapes(run.config), same_run)
    run.trained(folder, state)
    return step


def _differences(config: dict, saved: dict | None, may_change) -> list[str]:
    """"dataset: config.json 'a', checkpoint 'b'" for every setting that differs between
    config.json and a checkpoint's record (none for a record that keeps no config), but those
    a resumed run may change (`may_change`), the "changes" and the "data" (the same data may
    have moved since the checkpoint: a resume compares its identity)."""
    if saved is None:
        return []
    ignored = {*may_change, "changes", "data"}
    return [f"{key}: config.json {config.get(key)!r}, checkpoint {saved.get(key)!r}"
            for key in sorted((set(config) | set(saved)) - ignored)
            if files.to_json(config.get(key)) != files.to_json(saved.get(key))]


def _contents(folder: str) -> str:
    """What `folder` holds, in words: "it is empty", "it holds config.json, metrics.csv and an
    empty checkpoints/"."""
    names = sorted(os.listdir(folder))
    if not names:
        return "it is empty"
    shown = [f"{'an empty ' if not os.listdir(os.path.join(folder, n)) else ''}{n}/"
             if os.path.isdir(os.path.join(folder, n)) else n for n in names[:8]]
    more = f" and {len(names) - 8} more" if len(names) > 8 else ""
    return "it holds " + (", ".join(shown[:-1]) + " and " + shown[-1] if len(shown) > 1
                          else shown[0]) + more
