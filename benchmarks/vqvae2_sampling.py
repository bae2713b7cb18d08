"""VQ-VAE-2's priors: the cached sampler against raster loops, lvm_jax's and PyTorch's.

Both priors over K = 128 codes at the sizes experiments.vqvae2 trains by
default: the top prior a PixelSNAIL (dim 64, 2 blocks of 2 gated layers, 4
heads, key 32, value 64, head 256), the bottom prior a ConditionalGatedPixelCNN
(dim 64, 8 layers, head 256, conditioning stack of 64 channels and 2 blocks)
given top codes of half its grid's size.

For the top prior on 8x8 and 16x16 grids and the bottom prior on 16x16 and
32x32, at 100 grids per call and at 1 (`--quick`: 10 and 1, the smaller grid
of each), three samplers of the same prior and weights:

  (a) lvm_jax's cached sampler (`sample_codes(method="cached")`: per position,
      one position of every layer, the attention over a key/value cache; the
      conditioning stack once), one jitted call;
  (b) lvm_jax's raster loop (`method="raster"`: a full pass per position in a
      `lax.fori_loop`), one jitted call, the reference that draws the same codes;
  (c) the PyTorch twin (benchmarks/torch_priors.py) sampled by the reference
      implementation's method (rosinality/vq-vae-2-pytorch's `sample_model`): a
      full forward pass per position under `torch.no_grad`, `torch.multinomial`.

(a), (b) and (c) are timed in alternating rounds (`common.compare`). A raster
loop whose cost, estimated as positions x one full pass (timed first), exceeds
RASTER_BUDGET_S is not run: its row says "estimated" and gives positions x the
full pass's median time. Then the cost against positions: the cached sampler
alone on one grid of each side in SCALING_SIDES, in microseconds per position,
beside the raster loop's full pass per position. The convolutions' work per
position is the same on any grid; the attention's is not: each step takes the
dot products of its query with the whole key/value cache of H*W slots (static
shapes under jit; the slots not yet drawn are masked), so its cost per position
grows with the grid's size, while a raster step's grows with its square.

Before timing, the PyTorch twins are loaded with lvm_jax's randomised
parameters and must compute the same logits on random codes.
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import numpy as np
import torch

from benchmarks import torch_priors
from benchmarks.common import (NUM_CORES, Row, Settings, compare, device, format_seconds, measure,
                               timer)
from benchmarks.image_vae import randomised
from benchmarks.twins import assert_close
from lvm_jax.models.vqvae import NUM_CODES
from lvm_jax.nn import ConditionalGatedPixelCNN, PixelSNAIL, sample_codes

NAME = "vqvae2_sampling"
NUM_SAMPLES, QUICK_NUM_SAMPLES = 100, 10
RASTER_BUDGET_S, QUICK_RASTER_BUDGET_S = 120.0, 10.0
CHEAP_S = 5.0  # a call estimated under this is timed `repeats` times, else once


class Prior(NamedTuple):
    label: str
    jax: object  # () -> the lvm_jax module
    torch: object  # () -> the PyTorch twin
    copy: object  # (twin, params) -> the twin with lvm_jax's parameters
    grids: tuple  # the grid sides of the comparison
    quick_grids: tuple
    scaling_sides: tuple
    quick_scaling_sides: tuple


TOP = dict(dim=64, num_blocks=2, layers_per_block=2, num_heads=4, key_dim=32, value_dim=64,
           hidden=256)
BOTTOM = dict(dim=64, num_layers=8, hidden=256, condition_dim=64, num_condition_blocks=2)
PRIORS = {
    "top": Prior("top prior: PixelSNAIL (dim 64, 2x2 gated layers, 2 attention blocks of 4 heads, "
                 f"head 256), K={NUM_CODES}",
                 lambda: PixelSNAIL(NUM_CODES, **TOP),
                 lambda: torch_priors.PixelSNAIL(NUM_CODES, **TOP),
                 torch_priors.copy_flax_pixelsnail_params, (8, 16), (8,), (4, 8, 16, 32), (4, 8)),
    "bottom": Prior("bottom prior: ConditionalGatedPixelCNN (dim 64, 8 layers, head 256, "
                    f"conditioning 64x2 blocks), K={NUM_CODES}, given top codes at half size",
                    lambda: ConditionalGatedPixelCNN(NUM_CODES, NUM_CODES, **BOTTOM),
                    lambda: torch_priors.ConditionalGatedPixelCNN(NUM_CODES, NUM_CODES, **BOTTOM),
                    torch_priors.copy_flax_conditional_params, (16, 32), (16,), (8, 16, 32, 64),
                    (8, 16)),
}


@dataclasses.dataclass
class _Case:
    """One prior with random weights on `num` grids of side x side: its samplers and passes."""

    name: str
    num: int
    side: int
    seed: int

    def __post_init__(self):
        spec = PRIORS[self.name]
        self.prior = spec.jax()
        keys = jax.random.split(jax.random.key(self.seed), 3)
        codes = jax.random.randint(keys[0], (self.num, self.side, self.side), 0, NUM_CODES)
        # The bottom prior's condition: random top codes of half the grid's side.
        self.condition = None if self.name == "top" else jax.random.randint(
            keys[1], (self.num, self.side // 2, self.side // 2), 0, NUM_CODES)
        inputs = (codes,) if self.condition is None else (codes, self.condition)
        self.params = randomised(self.prior.init(keys[2], *inputs)["params"], self.seed,
                                 scale=0.1)
        self.torch_prior = spec.copy(spec.torch(), self.params)
        self.torch_inputs = tuple(torch.from_numpy(np.array(x)).long() for x in inputs)
        apply = jax.jit(lambda params, *inputs: self.prior.apply({"params": params}, *inputs))
        with torch.no_grad():
            torch_logits = torch_priors.as_numpy_logits(self.torch_prior(*self.torch_inputs))
        self.logits_error = assert_close(f"{self.name} prior logits",
                                          apply(self.params, *inputs), torch_logits)
        self.jax_pass = timer(lambda: jax.block_until_ready(apply(self.params, *inputs)))
        self.torch_pass = timer(functools.partial(self._torch_forward, *self.torch_inputs))
        self.keys = iter(jax.random.split(jax.random.key(self.seed), 1000))
        self.drawn = {}  # each method's latest codes, drawn with the same key

    @torch.no_grad()
    def _torch_forward(self, *inputs):
        return self.torch_prior(*inputs)

    @property
    def positions(self) -> int:
        return self.side * self.side

    def sampler(self, method: str):
        """A timer of `sample_codes(method)`, compiled ahead of time; the cached sampler
        draws with a fresh key, the raster loop with the cached sampler's latest."""
        sample = jax.jit(lambda params, key, condition: sample_codes(
            self.prior, {"params": params}, key, self.num, self.side, self.side, method,
            condition))
        compiled = sample.lower(self.params, jax.random.key(0), self.condition).compile()

        def run():
            if method == "cached":
                self.drawn["key"] = next(self.keys)
            self.drawn[method] = np.asarray(jax.block_until_ready(
                compiled(self.params, self.drawn["key"], self.condition)))
        return timer(run)

    def torch_sampler(self):
        condition = self.torch_inputs[1:]
        return timer(lambda: self.torch_prior.sample(self.num, self.side, self.side, *condition))


def _what(case: _Case) -> str:
    return (f"{case.num} grid{'s' if case.num > 1 else ''} of {case.side}x{case.side} "
            f"({case.positions} positions)")


def _row(case: _Case, settings: Settings, **fields) -> Row:
    return Row(benchmark=NAME, model=PRIORS[case.name].label, batch=case.num,
               higher_is_better=False, **fields)


def _torch_pass(case: _Case, settings: Settings) -> tuple[float, int]:
    """(seconds, threads): PyTorch's full pass at its fastest of the settings' thread counts
    (on a busy machine two threads can be many times slower than one)."""
    by_threads = {}
    for threads in settings.torch_threads:
        torch.set_num_threads(threads)
        by_threads[threads] = measure(case.torch_pass, settings, warmup=1)
    torch.set_num_threads(NUM_CORES)
    threads = min(by_threads, key=by_threads.get)
    return by_threads[threads], threads


def _comparison_rows(case: _Case, settings: Settings, budget: float) -> list[Row]:
    """(a) cached vs (c) PyTorch's raster loop, and (b) lvm_jax's raster loop vs (c)."""
    once = dataclasses.replace(settings, repeats=1)
    pass_jax = measure(case.jax_pass, once, warmup=1)
    pass_torch, threads = _torch_pass(case, once)
    estimate_jax, estimate_torch = case.positions * pass_jax, case.positions * pass_torch
    cached = case.sampler("cached")
    cached()  # a warm-up call even where the raster loops are too slow for a warm-up round
    quick = " [quick]" if settings.quick else ""
    if max(estimate_jax, estimate_torch) <= budget:
        cheap = max(estimate_jax, estimate_torch) < CHEAP_S
        # PyTorch's loop at the thread count of its fastest full pass only: on a busy machine
        # the slower count can take minutes per call.
        fastest = dataclasses.replace(settings if cheap else once, torch_threads=(threads,))
        torch.manual_seed(settings.seed)
        result = compare(cached, case.torch_sampler(), fastest,
                         warmup=int(cheap), also={"raster": case.sampler("raster")})
        cached_s, raster_s, torch_s = (result.jax_seconds, result.also_seconds["raster"],
                                       result.torch_seconds)
        same = int(np.all(case.drawn["cached"] == case.drawn["raster"], axis=(1, 2)).sum())
        timing = (f"median of {settings.repeats} after a warm-up round" if cheap
                  else "timed once after compiling (the cached sampler after a warm-up call)")
        measured = ""
        torch_note = (f"; {result.torch_note()} (the thread count of its fastest full pass, "
                      f"of {settings.torch_threads})")
        facts = (f"the same codes as lvm_jax's raster loop in {same} of {case.num} grids; "
                 f"{timing}")
    else:
        cached_s = measure(cached, settings, warmup=1)
        raster_s, torch_s = estimate_jax, estimate_torch
        measured = " (raster loops estimated)"
        torch_note = ""
        facts = (f"raster loops not run (over {budget:.0f} s): estimated as {case.positions} "
                 f"positions x one full pass ({format_seconds(pass_jax)} lvm_jax, "
                 f"{format_seconds(pass_torch)} PyTorch at {threads} thread"
                 f"{'s' if threads > 1 else ''}, timed once); cached: median of "
                 f"{settings.repeats}")
    shared = dict(unit="ms per grid", pytorch=1e3 * torch_s / case.num,
                  device=device(threads, jax_devices=1))
    return [
        _row(case, settings, step=f"{_what(case)}: (a) cached sampler vs (c) PyTorch raster "
                                  f"loop{measured}{quick}",
             lvm_jax=1e3 * cached_s / case.num,
             note=f"(a) sample_codes(method='cached'), one jitted call, "
                  f"{raster_s / cached_s:.1f}x faster than (b) lvm_jax's raster loop; (c) the "
                  f"reference implementation's method, a full forward pass per position; "
                  f"logits equal to {case.logits_error:.1g}; {facts}{torch_note}", **shared),
        _row(case, settings, step=f"{_what(case)}: (b) lvm_jax raster loop vs (c) PyTorch raster "
                                  f"loop{measured}{quick}",
             lvm_jax=1e3 * raster_s / case.num,
             note=f"(b) sample_codes(method='raster'), a lax.fori_loop of {case.positions} full "
                  f"passes in one jitted call; (c) the same passes in a Python loop; {facts}"
                  f"{torch_note}", **shared),
    ]


def _scaling_row(case: _Case, settings: Settings) -> Row:
    """The cached sampler's cost per position on one grid, beside one full pass's."""
    seconds = measure(case.sampler("cached"), settings, warmup=1)
    full_pass = measure(case.jax_pass, settings, warmup=1)
    quick = " [quick]" if settings.quick else ""
    return _row(case, settings, step=f"cost per position, {_what(case)}: cached sampler{quick}",
                unit="us per position", lvm_jax=1e6 * seconds / case.positions,
                device=device(jax_devices=1),
                note=f"(a) alone, median of {settings.repeats} after compiling: "
                     f"{format_seconds(seconds)} per grid; a raster loop's step (one full pass) "
                     f"takes {1e6 * full_pass:.0f} us, {full_pass * case.positions / seconds:.0f}x "
                     f"the cached sampler's per position")


def run(settings: Settings) -> list[Row]:
    """The three samplers of each prior at 100 grids per call and at 1; then the cached
    sampler's cost per position against the grid's size."""
    num = QUICK_NUM_SAMPLES if settings.quick else NUM_SAMPLES
    budget = QUICK_RASTER_BUDGET_S if settings.quick else RASTER_BUDGET_S
    rows = []
    for name, spec in PRIORS.items():
        for side in spec.quick_grids if settings.quick else spec.grids:
            for n in (num, 1):
                rows += _comparison_rows(_Case(name, n, side, settings.seed), settings, budget)
        for side in spec.quick_scaling_sides if settings.quick else spec.scaling_sides:
            rows.append(_scaling_row(_Case(name, 1, side, settings.seed), settings))
    return rows
