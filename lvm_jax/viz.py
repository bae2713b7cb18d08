"""Figures: image grids, 2D scatter plots and training curves, saved as PNG.

Each `save_*` returns the path it wrote, and `write_figures_to_tensorboard` adds the
figures to the run's TensorBoard events; in a multi-host run only process 0
writes (`files.primary_only`), the others return the path alone.
"""

import hashlib
import io
import math
import os
import socket
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image  # noqa: E402

from lvm_jax import files  # noqa: E402
from lvm_jax.data.dataset import unscale_images  # noqa: E402


def image_grid(images: np.ndarray, ncols: int, pad: int = 2) -> np.ndarray:
    """Tiles (N, H, W, C) uint8 images into one (rows*(H+pad)+pad, ...) uint8 image."""
    n, h, w, c = images.shape
    nrows = math.ceil(n / ncols)
    grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), 255, np.uint8)
    for i, image in enumerate(images):
        r, col = divmod(i, ncols)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + col * (w + pad):pad + col * (w + pad) + w] = image
    return grid


@files.primary_only
def save_image_grid(images, path: str, ncols: int = 10, title: str | None = None) -> str:
    """Saves images in [-1, 1] (float) or [0, 255] (uint8), (N, H, W, C), as a PNG grid."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        images = unscale_images(images)
    grid = image_grid(images, ncols)
    scale = max(1.0, 640 / grid.shape[1])
    fig = plt.figure(figsize=(grid.shape[1] * scale / 100, grid.shape[0] * scale / 100 + (0.4 if title else 0)))
    ax = fig.add_axes([0, 0, 1, grid.shape[0] * scale / 100 / fig.get_figheight()])
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=11, y=0.995)
    return _save(fig, path)


def spread_by_contrast(images: np.ndarray, num: int) -> np.ndarray:
    """Indices of `num` images whose contrast (pixel standard deviation) is spread evenly
    from the flattest to the busiest, in that order; deterministic.

    Evenly spaced values, not ranks: a test set that is mostly flat (photo patches of sky)
    would otherwise fill a figure with blank images.
    """
    contrast = np.asarray(images, np.float64).reshape(len(images), -1).std(axis=1)
    targets = np.linspace(contrast.min(), contrast.max(), num)
    chosen = []
    for target in targets:  # the nearest image not shown yet
        distance = np.abs(contrast - target)
        distance[chosen] = np.inf
        chosen.append(int(np.argmin(distance)))
    return np.array(chosen)


def interleave_pairs(originals: np.ndarray, reconstructions: np.ndarray) -> np.ndarray:
    """(N, ...) and (N, ...) -> (2N, ...) ordered original_0, recon_0, original_1, ..."""
    return np.stack([originals, reconstructions], axis=1).reshape(-1, *originals.shape[1:])


@files.primary_only
def save_scatter(path: str, data: np.ndarray, panels: dict[str, np.ndarray], title: str) -> str:
    """One panel per entry of `panels`: its points (N, 2) over the data points (grey)."""
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False,
                             layout="constrained")
    lim = np.percentile(np.abs(data), 99.5) * 1.2
    for ax, (name, points) in zip(axes[0], panels.items()):
        ax.scatter(data[:, 0], data[:, 1], s=2, c="0.75", label="test data")
        ax.scatter(points[:, 0], points[:, 1], s=3, c="C0", label=name)
        ax.set(title=name, xlabel="$x_1$", ylabel="$x_2$", xlim=(-lim, lim), ylim=(-lim, lim),
               aspect="equal")
        ax.legend(loc="upper left", markerscale=3)
    fig.suptitle(title)
    return _save(fig, path)


@files.primary_only
def save_curves(metrics_csv: str, path: str, names=("neg_elbo", "recon", "kl"),
                unit: str | dict[str, str] = "nats per example", title: str = "",
                log_scale: bool = False) -> str:
    """Training curves: each metric per step (train) and per epoch (test), one panel each.

    unit: the y-axis label of every panel, or a dict {metric name: label}.
    log_scale: a logarithmic y axis, for positive metrics that fall by orders of
    magnitude (the VQ-VAE's losses); otherwise a linear axis clipped to the
    bulk of the values, the panel's title saying how many points lie above it.
    """
    rows = files.read_csv(metrics_csv)
    # Constrained layout keeps the figure title clear of the panel titles.
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False,
                             layout="constrained")
    for ax, name in zip(axes[0], names):
        for split, style in (("train", dict(lw=0.6, alpha=0.7)), ("test", dict(marker="o", lw=1.5))):
            points = [(int(r["step"]), float(r[name])) for r in rows if r["split"] == split and r[name]]
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=f"{split} (per {'step' if split == 'train' else 'epoch'})",
                        **style)
        values = [float(r[name]) for r in rows if r[name]]
        clipped = None
        if log_scale and any(v > 0 for v in values):  # FSQ's VQ terms are all zero
            ax.set_yscale("log")
        elif values:  # keep the first steps' large values from flattening the curve
            clipped = clip_to_bulk(ax, values, 97)
        ax.set(title=name + (f"\n({clipped})" if clipped else ""), xlabel="step",
               ylabel=unit[name] if isinstance(unit, dict) else unit)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # no half steps on short runs
        ax.legend()
    fig.suptitle(title)
    return _save(fig, path)


def clip_to_bulk(ax, values, percentile: float) -> str | None:
    """Sets the y axis of `ax` from the least of `values` to their `percentile`, so that the
    first steps' large values do not flatten the curve. Returns what the panel's title must
    add, how many points lie above the axis and the largest ("1 point above the axis, up to
    1000"), or None when none do. A constant metric keeps matplotlib's own margins."""
    low, high = np.percentile(values, [0, percentile])
    if not high > low:
        return None
    top = high + 0.1 * (high - low)
    ax.set_ylim(low - 0.05 * (high - low), top)
    above = [v for v in values if v > top]
    if not above:
        return None
    return f"{len(above)} point{'s' * (len(above) > 1)} above the axis, up to {max(above):.4g}"


@files.primary_only
def save_histogram(values: np.ndarray, path: str, threshold: float, title: str) -> str:
    """Histogram of per-dimension KL values (nats), marking those below `threshold` as collapsed."""
    values = np.asarray(values)
    collapsed = int(np.sum(values < threshold))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(values, bins=30, color="C0")
    ax.axvline(threshold, color="C3", ls="--",
               label=f"{collapsed} of {len(values)} dims below {threshold} nats (collapsed)")
    ax.set(xlabel="average KL per latent dimension (nats)", ylabel="dimensions", title=title)
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # a count of dimensions
    ax.legend()
    return _save(fig, path)


@files.primary_only
def save_curve_comparison(metrics_csvs: dict[str, str], path: str, name: str, unit: str,
                          title: str) -> str:
    """One metric of several runs: train per step (thin) and test per epoch (markers), one
    colour and one legend entry per run, the legend beside the axes."""
    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for i, (label, csv_path) in enumerate(metrics_csvs.items()):
        rows = files.read_csv(csv_path)
        for split, style in (("train", dict(lw=0.5, alpha=0.5)),
                             ("test", dict(marker="o", lw=1.5, label=label))):
            points = [(int(r["step"]), float(r[name])) for r in rows if r["split"] == split and r[name]]
            steps, values = zip(*points)
            ax.plot(steps, values, color=f"C{i}", **style)
    values = [float(r[name]) for p in metrics_csvs.values() for r in files.read_csv(p) if r[name]]
    clipped = clip_to_bulk(ax, values, 95)
    ax.set(xlabel="step", ylabel=unit, title=title + (f"\n({clipped})" if clipped else ""))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(title="thin: train, per step\nmarkers: test, per epoch", loc="upper left",
              bbox_to_anchor=(1.01, 1.0), fontsize="small", title_fontsize="small")
    return _save(fig, path)


@files.primary_only
def save_code_usage(counts: dict[str, np.ndarray], path: str, title: str) -> str:
    """One panel per code grid (e.g. the VQ-VAE-2's levels): the frequency of each of its K
    codes, most used first, with the codes used and the perplexity in the panel's title."""
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3.5), squeeze=False,
                             layout="constrained")
    for ax, (name, level_counts) in zip(axes[0], counts.items()):
        level_counts = np.asarray(level_counts, np.float64)
        frequencies = np.sort(level_counts / level_counts.sum())[::-1]
        used = frequencies[frequencies > 0]
        perplexity = np.exp(-np.sum(used * np.log(used)))
        ax.bar(np.arange(len(frequencies)), frequencies, width=1.0, color="C0")
        ax.set(title=f"{name}: {len(used)} of {len(frequencies)} codes used, perplexity "
                     f"{perplexity:.1f}", xlabel="code, by frequency", ylabel="fraction of codes")
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig, path: str) -> str:
    """Writes `fig` as a PNG, whole or not at all, and leaves a file that already holds
    the same image untouched (`files.write_atomic`). A figure without a layout engine is
    cropped to its contents; a constrained layout already fits them, and cropping would
    draw the figure twice (0.1 s for a 2D run's scatter plot, measured)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100,
                bbox_inches=None if fig.get_layout_engine() else "tight")
    plt.close(fig)
    return files.write_atomic(path, buffer.getvalue())


def write_figures_to_tensorboard(workdir: str, figures, step: int) -> None:
    """Adds each figure file of `figures` to <workdir>/tensorboard/ as an image at training
    step `step`, tagged figures/<file name without extension>, in an event file of their
    own, written whole or not at all. Figures already written under that name (a finished
    run, rerun) are not written again. Primary process only."""
    if not files.is_primary():
        return
    from lvm_jax.train import events

    tags = [f"figures/{os.path.splitext(os.path.basename(path))[0]}" for path in figures]
    digest = hashlib.sha256("\n".join(tags).encode()).hexdigest()[:12]
    # "figures" sorts after the time-stamped files of training, as it is written after them.
    name = f"events.out.tfevents.figures.{step:012d}.{digest}.{socket.gethostname()}"
    path = os.path.join(workdir, files.TENSORBOARD_DIR, name)
    if os.path.exists(path):
        return
    partial = os.path.join(workdir, files.TENSORBOARD_DIR, f".tmp_{name}.{os.getpid()}")
    writer = events.open_event_file(partial)
    try:
        for tag, figure in zip(tags, figures):
            writer.write(_image_event(tag, figure, step))
        writer.close()
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)


def _image_event(tag: str, path: str, step: int) -> bytes:
    """The serialized event of the figure file at `path` (a GIF's first frame) as a PNG image
    tagged `tag` at `step`."""
    from tensorboard.compat.proto import event_pb2, summary_pb2

    with Image.open(path) as image:
        rgb = image.convert("RGB")
    encoded = io.BytesIO()
    rgb.save(encoded, format="PNG")
    height, width = np.asarray(rgb).shape[:2]
    image = summary_pb2.Summary.Image(height=height, width=width, colorspace=3,
                                      encoded_image_string=encoded.getvalue())
    return event_pb2.Event(wall_time=time.time(), step=step, summary=summary_pb2.Summary(
        value=[summary_pb2.Summary.Value(tag=tag, image=image)])).SerializeToString()
