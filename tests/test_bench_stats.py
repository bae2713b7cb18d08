"""The benchmarks' statistics and results table: paired ratios, goals, JSON rows, round order.

No PyTorch needed: benchmarks.common imports it only where it times it.
"""

import json

import pytest

from benchmarks import report
from benchmarks.common import EAGER, Row, merge_processes, paired, shuffled_rounds

ROW = dict(benchmark="image_vae", model="image VAE", step="train step", batch=128, lvm_jax=110.0,
           pytorch=100.0, unit="images/s", higher_is_better=True, device="cpu x2", goal=1.0)


def test_paired_ratio_is_the_median_with_its_range():
    assert paired([1.04, 0.87, 0.86, 1.2, 0.9]) == (0.9, (0.86, 1.2))
    assert paired([]) == (None, None)


def test_merge_processes_pairs_each_process():
    def process(jax, eager, compiled):
        by_threads = {EAGER: {"2": eager, "1": eager * 2}, "compiled": {"2": compiled}}
        return {"jax_seconds": jax, "torch_by_threads": by_threads, "also_seconds": {},
                "process_ratios": [min(eager, compiled) / jax], "eager_ratios": [eager / jax],
                "remarks": ["checked"]}

    merged = merge_processes([process(1.0, 1.2, 1.1), process(2.0, 1.0, 1.5),
                              process(1.0, 0.9, 1.3)])
    assert merged.jax_seconds == 1.0
    assert merged.torch_config == EAGER and merged.torch_seconds == 1.0
    assert merged.torch_by_config == {EAGER: 1.0, "compiled": 1.3}
    assert merged.process_ratios == (1.1, 0.5, 0.9)
    assert merged.eager_ratios == (1.2, 0.5, 0.9)
    assert merged.remarks == ("checked",)


def test_ratio_is_the_paired_median_and_goal_needs_the_whole_range():
    crossing = Row(**ROW, paired_ratio=1.05, ratio_range=(0.95, 1.2))
    assert crossing.ratio == 1.05 and crossing.goal_met is False
    above = Row(**ROW, paired_ratio=1.05, ratio_range=(1.0, 1.2))
    assert above.goal_met is True
    assert Row(**ROW).ratio == pytest.approx(1.1) and Row(**ROW).goal_met is True


def test_row_as_dict_is_json():
    row = Row(**ROW, pytorch_eager=90.0, pytorch_config="torch.compile, 2 threads",
              paired_ratio=1.05, ratio_range=(0.95, 1.2))
    back = json.loads(json.dumps(row.as_dict()))
    assert back["ratio_range"] == [0.95, 1.2]
    assert back["ratio"] == 1.05 and back["goal_met"] is False
    assert back["pytorch_eager"] == 90.0 and back["pytorch_config"] == "torch.compile, 2 threads"


def test_report_renders_old_and_new_rows():
    new = Row(**ROW, pytorch_eager=90.0, pytorch_config="torch.compile, 2 threads",
              paired_ratio=1.05, ratio_range=(0.95, 1.2)).as_dict()
    old = {key: value for key, value in Row(**ROW).as_dict().items()
           if key not in ("pytorch_eager", "pytorch_config", "paired_ratio", "ratio_range")}
    machine = {"date": "d", "cpu": "c", "cores": 2, "jax_devices": ["cpu:cpu"], "jax": "j",
               "jaxlib": "j", "flax": "f", "torch": "t", "python": "p"}
    entry = {"machine": machine, "settings": {}, "seconds": 1.0, "load_before": 0.0,
             "load_after": 0.0}
    text = report.markdown({"benchmarks": {"new": {**entry, "rows": [new]},
                                           "old": {**entry, "rows": [old]}}})
    assert "| 100 (torch.compile, 2 threads) | 90 | 1.05x (0.95-1.20) |" in text
    assert f"| 100 | {report.ABSENT} | 1.10x |" in text
    assert "whole range" in text


def test_round_order_changes_and_is_reproducible():
    sides = ["jax:lvm_jax", "jax:raster", "torch:eager", "torch:compiled"]
    rounds = shuffled_rounds(sides, 8, seed=3)
    assert all(sorted(order) == sorted(sides) for order in rounds)
    assert len({tuple(order) for order in rounds}) > 1
    assert shuffled_rounds(sides, 8, seed=3) == rounds
    assert shuffled_rounds(sides, 8, seed=4) != rounds
