"""Speed and quality benchmarks of lvm_jax against PyTorch: `python -m benchmarks.run`."""
