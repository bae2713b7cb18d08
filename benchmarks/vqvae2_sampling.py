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
      `lax.fori_loop`), one jitted call, which draws the same codes;
  (c) the PyTorch twin (benchmarks/torch_priors.py) sampled by the reference
      implementation's method (rosinality/vq-vae-2-pytorch's `sample_model`): a
      full forward pass per position under `torch.no_grad`, `torch.multinomial`.

Each case gives three rows: (a) against (b), the algorithm comparison (the
speed-up of caching, same framework, same codes: a ratio, higher is better);
(b) against (c), the framework comparison (same algorithm); (a) against (c),
the cached sampler against the reference implementation's method (the
algorithms differ: not a framework ratio). (a), (b) and (c) are timed in
alternating rounds (`common.compare`), a warm-up round first, 1 grid per call
included. The raster loops run only if a warm-up and a timed round, estimated
as positions x one full pass (timed first), fit in RASTER_BUDGET_S per case;
then as many timed rounds as fit, up to the settings' repeats (the rows say
how many). Otherwise their rows say "estimated" and use positions x one full
pass. The whole benchmark is budgeted at 12 minutes on an idle 2-core machine.

Then the cost against positions: the cached sampler alone on one grid of each
side in the prior's scaling sides, in microseconds per position, beside the
raster loop's full pass per position. The convolutions' work per position is
the same on any grid. The attention's grows with the position: at position t
it reads the cached keys and values of the rows filled so far, t slots plus
at most the rest of t's block of rows (`lvm_jax.nn.sampling.row_blocks`: at
most 4 blocks, each a static prefix of the cache), so a grid's attention work
is about (1 + 1/blocks) / 2 of reading all H*W slots at every step, and its
cost per position grows linearly with the grid's positions; a raster step's
whole pass grows with them too, so the raster loop's cost per position grows
with their square.

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
                               SameKeyDraws, timer)
from benchmarks.image_vae import randomised
from benchmarks.twins import assert_close
from lvm_jax.models.vqvae import NUM_CODES
from lvm_jax.nn import ConditionalGatedPixelCNN, PixelSNAIL, sample_codes

NAME = "vqvae2_sampling"
NUM_SAMPLES, QUICK_NUM_SAMPLES = 100, 10
# Per case (prior, grid, grids per call): the raster loops' warm-up and timed rounds. Eight
# cases of at most 60 s, the compilations and the scaling rows keep the whole benchmark under
# about 12 minutes on an idle 2-core machine.
RASTER_BUDGET_S, QUICK_RASTER_BUDGET_S = 60.0, 10.0


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
        self.draws = SameKeyDraws(self.seed)

    @torch.no_grad()
    def _torch_forward(self, *inputs):
        return self.torch_prior(*inputs)

    @property
    def positions(self) -> int:
        return self.side * self.side

    def sampler(self, method: str):
        """A timer of `sample_codes(method)`, compiled ahead of time, drawing with the same
        keys as the other method (`SameKeyDraws`)."""
        sample = jax.jit(lambda params, key, condition: sample_codes(
            self.prior, {"params": params}, key, self.num, self.side, self.side, method,
            condition))
        compiled = sample.lower(self.params, jax.random.key(0), self.condition).compile()

        return self.draws.timer(method, lambda key: compiled(self.params, key, self.condition))

    def torch_sampler(self):
        condition = self.torch_inputs[1:]
        return timer(lambda: self.torch_prior.sample(self.num, self.side, self.side, *condition))


def _what(case: _Case) -> str:
    return (f"{case.num} grid{'s' if case.num > 1 else ''} of {case.side}x{case.side} "
            f"({case.positions} positions)")


def _row(case: _Case, settings: Settings, higher_is_better: bool = False, **fields) -> Row:
    return Row(benchmark=NAME, model=PRIORS[case.name].label, batch=case.num,
               higher_is_better=higher_is_better, **fields)


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
    """Three rows: (a) cached vs (b) lvm_jax's raster loop, the algorithm comparison (same
    framework, same codes); (b) vs (c) PyTorch's raster loop, the framework comparison (same
    algorithm); (a) vs (c), the cached sampler against the reference implementation's method.

    The raster loops run only if a warm-up round and one timed round of both, estimated as
    positions x one full pass each, fit in `budget`; then as many timed rounds as fit, up to
    settings.repeats. Otherwise both are "estimated" (positions x one full pass).
    """
    once = dataclasses.replace(settings, repeats=1)
    pass_jax = measure(case.jax_pass, once, warmup=1)
    pass_torch, threads = _torch_pass(case, once)
    estimate_jax, estimate_torch = case.positions * pass_jax, case.positions * pass_torch
    cached = case.sampler("cached")
    quick = " [quick]" if settings.quick else ""
    rounds = int(budget // (estimate_jax + estimate_torch))  # the warm-up round included
    if rounds >= 2:
        repeats = min(settings.repeats, rounds - 1)
        torch.manual_seed(settings.seed)
        # PyTorch's loop at the thread count of its fastest full pass only: on a busy machine
        # the slower count can take minutes per call.
        result = compare(cached, case.torch_sampler(),
                         dataclasses.replace(settings, repeats=repeats, torch_threads=(threads,)),
                         warmup=1, also={"raster": case.sampler("raster")})
        cached_s, raster_s, torch_s = (result.jax_seconds, result.also_seconds["raster"],
                                       result.torch_seconds)
        latest = case.draws.latest
        same = int(np.all(latest["cached"] == latest["raster"], axis=(1, 2)).sum())
        measured = ""
        facts = (f"each median of {repeats} after a warm-up round, the three in alternation; "
                 f"PyTorch {result.torch_note()} (the thread count of its fastest full pass, "
                 f"of {settings.torch_threads})")
        codes = f"the same codes in {same} of {case.num} grids"
    else:
        cached_s = measure(cached, settings, warmup=1)
        raster_s, torch_s = estimate_jax, estimate_torch
        measured = " (raster loops estimated)"
        facts = (f"raster loops not run (a warm-up and a timed round over {budget:.0f} s): "
                 f"estimated as {case.positions} positions x one full pass "
                 f"({format_seconds(pass_jax)} lvm_jax, {format_seconds(pass_torch)} PyTorch at "
                 f"{threads} thread{'s' if threads > 1 else ''}, timed once); cached: median of "
                 f"{settings.repeats} after a warm-up call")
        codes = "the same codes by construction (tests/test_sampling.py), not checked here"
    per_grid = dict(unit="ms per grid", device=device(threads, jax_devices=1))
    cached_text = "(a) cached sampler, sample_codes(method='cached'), one jitted call"
    raster_text = (f"(b) lvm_jax's raster loop, sample_codes(method='raster'): a lax.fori_loop "
                   f"of {case.positions} full passes in one jitted call")
    torch_text = ("(c) the reference implementation's method: the PyTorch twin's full forward "
                  "pass per position in a Python loop (rosinality's sample_model)")
    return [
        _row(case, settings, step=f"{_what(case)}: (a) cached sampler vs (b) lvm_jax raster loop, "
                                  f"algorithm comparison{measured}{quick}",
             unit="x speed-up (time of (b) / time of (a))", lvm_jax=raster_s / cached_s,
             higher_is_better=True, device=device(jax_devices=1),
             note=f"algorithm comparison, same framework and distribution: {cached_text} "
                  f"({format_seconds(cached_s)} per call) vs {raster_text} "
                  f"({format_seconds(raster_s)}); {codes}; {facts}"),
        _row(case, settings, step=f"{_what(case)}: (b) lvm_jax raster loop vs (c) PyTorch raster "
                                  f"loop, framework comparison{measured}{quick}",
             lvm_jax=1e3 * raster_s / case.num, pytorch=1e3 * torch_s / case.num,
             note=f"framework comparison, same algorithm: {raster_text}; {torch_text}; logits "
                  f"equal to {case.logits_error:.1g}; {facts}", **per_grid),
        _row(case, settings, step=f"{_what(case)}: (a) cached sampler vs (c) the reference "
                                  f"implementation's method (PyTorch raster loop){measured}"
                                  f"{quick}",
             lvm_jax=1e3 * cached_s / case.num, pytorch=1e3 * torch_s / case.num,
             note=f"not a framework comparison (the algorithms differ): {cached_text}; "
                  f"{torch_text}; {facts}", **per_grid),
    ]


def _scaling_row(case: _Case, settings: Settings) -> Row:
    """The cached sampler's cost per position on one grid, beside one full pass's."""
    seconds = measure(case.sampler("cached"), settings, warmup=1)
    full_pass = measure(case.jax_pass, settings, warmup=1)
    quick = " [quick]" if settings.quick else ""
    return _row(case, settings, step=f"cost per position, {_what(case)}: cached sampler{quick}",
                unit="us per position", lvm_jax=1e6 * seconds / case.positions,
                device=device(jax_devices=1),
                note=f"(a) alone, median of {settings.repeats} after a warm-up call: "
                     f"{format_seconds(seconds)} per grid; a raster loop's step (one full pass) "
                     f"takes {1e6 * full_pass:.0f} us, {full_pass * case.positions / seconds:.0f}x "
                     f"the cached sampler's per position; the cached sampler's attention at a "
                     f"position reads the cache's filled rows only (up to the end of its block "
                     f"of rows), a full pass's attention every position at every position")


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
