"""VQ-VAE with a PixelCNN or Gated PixelCNN prior (REFERENCE.md §4), trained in two stages.

    python -m experiments.vqvae --prior pixelcnn
    python -m experiments.vqvae --prior gated --dataset mnist_embedded

Stage 1 trains the VQ-VAE (K = 128 codes of 256 dims, an 8x8 code grid for
32x32 images) in <workdir>/vqvae; the whole dataset is then encoded once to
code grids, and stage 2 trains the prior on them in <workdir>/prior. Each
stage resumes from its own checkpoints; a prior trained on the codes of an
earlier VQ-VAE checkpoint is refused rather than silently reused.

The default dataset, patches_embedded, holds RGB 32x32 photo patches: the
architecture and the official numbers are for RGB images (SVHN, CIFAR-10),
and natural-image patches are closer to those than MNIST's mostly black
digits.

Writes into the workdir: samples.png (100 decoded prior samples),
reconstructions.png (50 test images, each beside its reconstruction),
curves_vqvae.png and curves_prior.png (training curves of both stages) and
summary.json (test recon_mse, vq_loss, codebook_usage, perplexity, prior_nll,
the course's total VQ-VAE loss, their units, and the official results).
"""

import dataclasses
import functools
import os
import sys

import jax
import numpy as np

from experiments import common
from lvm_jax import data, viz
from lvm_jax.models import vqvae
from lvm_jax.train import Objective, fit, records

# --quick keeps the layers and shrinks the widths: at full width one training
# step of the VQ-VAE takes seconds on a CPU, and 100 samples of the Gated
# PixelCNN (64 passes over the whole network) more than a minute.
QUICK_CODE_DIM = 32
QUICK_PRIORS = {"pixelcnn": dict(embed_dim=16, num_residual_blocks=2, hidden=64),
                "gated": dict(dim=16, num_layers=4, hidden=64)}
NUM_SAMPLES, NUM_RECONSTRUCTIONS = 100, 50

MSE = "mean squared error per element"
UNITS = {
    "loss": f"{MSE}: recon_mse + vq_loss, the training objective",
    "recon_mse": f"{MSE}, images in [-1, 1]",
    "vq_loss": f"{MSE} of the latents: codebook + beta * commitment (beta * commitment with "
               "--ema_codebook)",
    "codebook_loss": f"{MSE} of the latents: ||sg(z_e) - z_q||^2",
    "commitment_loss": f"{MSE} of the latents: ||z_e - sg(z_q)||^2",
    "reference_loss": "recon_mse + codebook_loss + commitment_loss: the course's total test loss",
    "codebook_usage": "fraction of the K codes used over the whole test set",
    "perplexity": "codes: exp of the entropy of the code frequencies over the whole test set",
    "prior_nll": "nats per code",
}
PRIOR_UNITS = {"loss": UNITS["prior_nll"], "prior_nll": UNITS["prior_nll"]}

# Official CS294-158 test results (REFERENCE.md §4), in the units above.
REFERENCE_RESULTS = {
    "pixelcnn": {"svhn": {"reference_loss": 0.0286, "prior_nll": 1.944},
                 "cifar10": {"reference_loss": 0.0474, "prior_nll": 2.753}},
    "gated": {"cifar10": {"reference_loss": 0.0557, "prior_nll": 2.8675}},
}


def build_models(args, dataset: data.Dataset):
    """The VQ-VAE and the prior the flags name, narrower with --quick."""
    code_dim = QUICK_CODE_DIM if args.quick else vqvae.CODE_DIM
    model = vqvae.conv_vqvae(dataset.event_shape, vqvae.NUM_CODES, code_dim, ema=args.ema_codebook)
    prior_settings = QUICK_PRIORS[args.prior] if args.quick else {}
    prior = vqvae.PRIORS[args.prior](vqvae.NUM_CODES, **prior_settings)
    return model, prior


def vqvae_objective(model: vqvae.VQVAE) -> Objective:
    return Objective(init=model.init, loss=functools.partial(vqvae.loss_fn, model),
                     preprocess=data.scale_images, units=UNITS)


def prior_objective(prior) -> Objective:
    return Objective.stateless(init=prior.init,
                               loss_fn=functools.partial(vqvae.prior_loss_fn, prior),
                               units=PRIOR_UNITS)


def save_figures(workdir: str, title: str, samples, test_images, reconstructions) -> list[str]:
    """samples.png, reconstructions.png and the training curves of both stages."""
    return [
        viz.save_image_grid(samples, os.path.join(workdir, "samples.png"),
                            title=f"{title}: {len(samples)} samples"),
        viz.save_image_grid(viz.interleave_pairs(test_images, reconstructions),
                            os.path.join(workdir, "reconstructions.png"),
                            title=f"{title}: test images | reconstructions"),
        viz.save_curves(os.path.join(workdir, "vqvae", "metrics.csv"),
                        os.path.join(workdir, "curves_vqvae.png"),
                        names=("loss", "recon_mse", "vq_loss"), unit=MSE,
                        title=f"{title}: stage 1, VQ-VAE"),
        viz.save_curves(os.path.join(workdir, "prior", "metrics.csv"),
                        os.path.join(workdir, "curves_prior.png"),
                        names=("prior_nll",), unit=UNITS["prior_nll"],
                        title=f"{title}: stage 2, prior"),
    ]


def _timing(summary: dict) -> dict:
    return {k: summary[k] for k in ("epochs", "steps", "wall_time_seconds",
                                    "train_steps_per_second", "train_examples_per_second")}


def train_and_evaluate(args) -> dict:
    workdir = common.workdir(args, "vqvae")
    dataset = common.load_dataset(args)
    if dataset.kind != "image":
        raise data.DataError(f"vqvae trains on images; {dataset.name} is not an image dataset.")
    model, prior = build_models(args, dataset)
    model_settings = dict(num_codes=model.quantizer.num_codes, code_dim=model.quantizer.code_dim,
                          ema_codebook=args.ema_codebook)

    config = common.train_config(args, convolutional=True)
    stage1 = fit(vqvae_objective(model), dataset.train, dataset.test, config,
                 os.path.join(workdir, "vqvae"), common.run_config(args, "vqvae", **model_settings))
    variables = {"params": stage1.state.eval_params, **stage1.state.model_state}
    train_codes, test_codes = (
        vqvae.encode_dataset(model, variables, images, config.eval_batch_size, data.scale_images)
        for images in (dataset.train, dataset.test))

    prior_config = dataclasses.replace(config,
                                       epochs=config.epochs if args.quick else args.prior_epochs)
    # The codes depend on the VQ-VAE's step: a prior must not resume on another's codes.
    stage2 = fit(prior_objective(prior), train_codes, test_codes, prior_config,
                 os.path.join(workdir, "prior"),
                 common.run_config(args, "vqvae_prior", prior=args.prior, **model_settings,
                                   vqvae_step=int(stage1.state.step)))

    _, samples = vqvae.sample(model, variables, prior, stage2.state.eval_params,
                              jax.random.key(args.seed + 1), NUM_SAMPLES, test_codes.shape[1:])
    # Evenly spaced test images: a test set cut from photos in order starts with 50 of sky.
    shown = np.linspace(0, len(dataset.test) - 1, NUM_RECONSTRUCTIONS).astype(int)
    reconstructions = vqvae.decode(model, variables, test_codes[shown])
    vq = stage1.test_metrics
    # Usage and perplexity over the whole test set replace the batch means of `fit`.
    metrics = {**vq, **vqvae.code_statistics(test_codes, model.quantizer.num_codes),
               "reference_loss": vq["recon_mse"] + vq["codebook_loss"] + vq["commitment_loss"],
               "prior_nll": stage2.test_metrics["prior_nll"]}

    title = f"VQ-VAE + {args.prior} on {dataset.name}"
    test_images = data.scale_images(dataset.test[shown])
    figures = save_figures(workdir, title, samples, test_images, np.asarray(reconstructions))
    summary = records.update_json(os.path.join(workdir, "summary.json"), {
        "config": {"vqvae": stage1.summary["config"], "prior": stage2.summary["config"]},
        "test_metrics": metrics, "units": UNITS, "dataset": dataset.describe(),
        "reference_results": {"source": "CS294-158 official solutions, REFERENCE.md §4",
                              **REFERENCE_RESULTS[args.prior]},
        "stages": {"vqvae": _timing(stage1.summary), "prior": _timing(stage2.summary)},
        "device": stage1.summary["device"],
        "figures": [os.path.basename(f) for f in figures]})
    print(f"{title}: test recon_mse {metrics['recon_mse']:.4f}, vq_loss {metrics['vq_loss']:.4f}, "
          f"course total {metrics['reference_loss']:.4f} ({MSE}); codebook usage "
          f"{metrics['codebook_usage']:.2f}, perplexity {metrics['perplexity']:.1f} codes; "
          f"prior {metrics['prior_nll']:.3f} nats per code")
    print(f"figures and summary.json in {workdir}")
    return summary


def parser():
    p = common.parser("vqvae", __doc__, data.IMAGE_DATASETS, "patches_embedded", epochs=20)
    p.add_argument("--prior", default="pixelcnn", choices=sorted(vqvae.PRIORS),
                   help="the autoregressive prior over the code grid (stage 2)")
    p.add_argument("--prior_epochs", type=int, default=20,
                   help="epochs of stage 2 (--epochs sets stage 1); --quick runs 2")
    p.add_argument("--ema_codebook", action="store_true",
                   help="learn the codebook by exponential moving averages of the encoder outputs "
                        "(beta = 0.25) instead of by gradient (beta = 1, the course's VQ-VAE)")
    return p


def main(argv=None):
    return common.run(parser(), train_and_evaluate, argv)


if __name__ == "__main__":
    main(sys.argv[1:])
