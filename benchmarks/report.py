"""The results file: JSON with every row and the machine, and the Markdown table built from it.

`benchmarks/results/latest.json` holds one entry per benchmark, each with the
machine, settings and time it was measured; running a subset (`--only`)
replaces those entries and keeps the others, so the table always shows the
latest measurement of every benchmark.
"""

import json
import os
import re

from benchmarks.common import Row

COLUMNS = ("#", "benchmark", "model", "step", "batch", "device", "lvm_jax", "PyTorch (best)",
           "PyTorch eager", "ratio (range)", "unit", "goal", "met")


def load(path: str) -> dict:
    """The results file at `path`, or an empty one."""
    if not os.path.exists(path):
        return {"benchmarks": {}}
    with open(path) as f:
        return json.load(f)


def _write_atomically(path: str, text: str):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def save(results: dict, json_path: str, md_path: str):
    os.makedirs(os.path.dirname(json_path), exist_ok=True)
    _write_atomically(json_path, json.dumps(results, indent=2) + "\n")
    _write_atomically(md_path, markdown(results))


ABSENT = "—"  # a cell with no figure: a row without a PyTorch counterpart


def _number(value: float | None) -> str:
    if value is None:
        return ABSENT
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _ratio(row: dict) -> str:
    """E.g. "1.05x (0.98-1.12)": the (paired) ratio and, where there is one, its range."""
    if row["ratio"] is None:
        return ABSENT
    ratio_range = row.get("ratio_range")
    spread = "" if ratio_range is None else f" ({ratio_range[0]:.2f}-{ratio_range[1]:.2f})"
    return f"{row['ratio']:.2f}x{spread}"


def _pytorch(row: dict) -> str:
    """The best PyTorch figure, with its configuration where one is named."""
    config = row.get("pytorch_config")
    return _number(row["pytorch"]) + (f" ({config})" if config else "")


def table_rows(results: dict) -> list[list[str]]:
    """Table cells, one list per row, in COLUMNS order (rows written before the paired
    statistics, without their fields, render with those cells empty)."""
    cells = []
    for entry in results["benchmarks"].values():
        for row in entry["rows"]:
            met = "" if row["goal_met"] is None else ("yes" if row["goal_met"] else "no")
            cells.append([str(len(cells) + 1), row["benchmark"], row["model"], row["step"],
                          str(row["batch"]), row["device"], _number(row["lvm_jax"]),
                          _pytorch(row), _number(row.get("pytorch_eager")), _ratio(row),
                          row["unit"], "" if row["goal"] is None else f">= {row['goal']:g}x",
                          met])
    return cells


SAMPLING_STEP = re.compile(r"draw (\d+) code grids? of (\d+x\d+) \((\d+) positions\): "
                           r"(cached sampler|lvm_jax raster loop)")


def sampling_table(results: dict) -> str:
    """The `vqvae_sampling` rows as one Markdown line per prior, grid and grids per call:
    milliseconds per grid of the cached sampler, PyTorch's raster loop and lvm_jax's, and the
    cached sampler's speed-up over each raster loop. docs/speed.md holds this table as
    generated from benchmarks/results/latest.json (tests/test_docs.py checks it)."""
    grids = {}  # (prior, grids per call, positions, grid) -> {"cached": ms, "torch": ms, ...}
    for row in results["benchmarks"]["vqvae_sampling"]["rows"]:
        calls, grid, positions, method = SAMPLING_STEP.match(row["step"]).groups()
        prior = row["model"].split(" (")[0]
        ms = grids.setdefault((prior, int(calls), int(positions), grid.replace("x", "×")), {})
        ms["cached" if method == "cached sampler" else "raster"] = row["lvm_jax"]
        if row["pytorch"] is not None:
            ms["torch"] = row["pytorch"]
    priors = list(dict.fromkeys(prior for prior, *_ in grids))
    # Each prior's rows: many grids per call first, then by grid size.
    order = sorted(grids, key=lambda key: (priors.index(key[0]), -key[1], key[2]))
    lines = ["| prior | grid (positions), grids per call | cached | PyTorch raster | "
             "lvm_jax raster | cached vs PyTorch / vs lvm_jax raster |",
             "|---|---|---|---|---|---|"]
    for prior, calls, positions, grid in order:
        ms = grids[prior, calls, positions, grid]
        speedups = ""
        if "raster" in ms:
            speedups = (f"{_number(ms['torch'] / ms['cached'])}× / "
                        f"{_number(ms['raster'] / ms['cached'])}×")
        lines.append(f"| {prior} | {grid} ({positions}), {calls} | {_number(ms['cached'])} | "
                     f"{_number(ms.get('torch'))} | {_number(ms.get('raster'))} | {speedups} |")
    return "\n".join(lines) + "\n"


def text_table(rows: list[Row]) -> str:
    """A fixed-width table of `rows` for the terminal."""
    cells = table_rows({"benchmarks": {"": {"rows": [r.as_dict() for r in rows]}}})
    widths = [max(len(c) for c in column) for column in zip(COLUMNS, *cells)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in [COLUMNS, *cells]]
    return "\n".join(lines)


def _counted(names: list[str]) -> str:
    """["cpu:cpu"] * 8 -> "8 x cpu:cpu", keeping the order of first appearance."""
    counts = {name: names.count(name) for name in names}
    return ", ".join(f"{n} x {name}" if n > 1 else name for name, n in counts.items())


def markdown(results: dict) -> str:
    cells = table_rows(results)
    notes = [row["note"] for entry in results["benchmarks"].values() for row in entry["rows"]]
    lines = [
        "# lvm_jax benchmarks against PyTorch",
        "",
        "Written by `python -m benchmarks.run`; do not edit by hand.",
        "",
        "`ratio` is lvm_jax's advantage: PyTorch time / lvm_jax time, lvm_jax throughput / "
        "PyTorch throughput, or PyTorch loss / lvm_jax loss, so > 1 means lvm_jax is better. "
        "`goal` is the least ratio the project's issues ask for. Timings are medians of "
        "repeats after warm-up, every side once per round in an order shuffled every round. "
        "XLA uses all cores; PyTorch is timed at each of the settings' thread counts "
        "(`torch.set_num_threads`; default the core count, then 1) and the fastest is "
        "reported: `device` names it, the notes give each. The training steps time PyTorch "
        "eager (NCHW, `torch.optim.Adam`'s defaults) and compiled (`torch.compile`, "
        "channels_last, fused Adam), both trained from lvm_jax's initial parameters: "
        "`PyTorch (best)` is the faster configuration, named, the one the ratio is against; "
        "`PyTorch eager` stands beside it. Their ratio is the median of the paired ratios "
        "(best PyTorch / lvm_jax, timed in the same rounds) over N fresh processes (N in each "
        "row's note and the settings' `processes`), with the range (min-max) over those "
        "processes in brackets; a goal is met only when the whole range is at or above it. "
        f"Rows with {ABSENT} as PyTorch figure and ratio measure lvm_jax alone.",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
        *("| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in cells),
        "",
        "## Notes",
        "",
        *(f"{i}. {note}" for i, note in enumerate(notes, 1)),
        "",
        "## Where and when",
        "",
    ]
    for name, entry in results["benchmarks"].items():
        m = entry["machine"]
        lines.append(
            f"- `{name}`: {m['date']}, {m['cpu']}, {m['cores']} cores, JAX devices "
            f"{_counted(m['jax_devices'])}; jax {m['jax']}, jaxlib {m['jaxlib']}, flax "
            f"{m['flax']}, torch {m['torch']}, Python {m['python']}; 1-min load average "
            f"{entry['load_before']:.1f} before, {entry['load_after']:.1f} after; "
            f"{entry['seconds']:.0f} s; settings {json.dumps(entry['settings'])}.")
    busy = [name for name, entry in results["benchmarks"].items()
            if max(entry["load_before"], entry["load_after"]) > entry["machine"]["cores"]]
    if busy:
        lines += ["", f"The 1-min load average exceeded the core count during {', '.join(busy)}: "
                      "other work ran, or the benchmark's own threads (JAX's CPU devices, "
                      "PyTorch's threads, the subprocesses it times) queued for the cores. Where "
                      "other work ran, those timings are slower and noisier than on an idle "
                      "machine, for both sides."]
    if results.get("note"):
        lines += ["", results["note"]]
    return "\n".join(lines) + "\n"
