"""The runnable experiments (`python -m experiments.<name>`), and `load_run`, which rebuilds a
trained run of any of them from its workdir (`experiments.runs`)."""

from experiments.runs import load_run

__all__ = ["load_run"]
