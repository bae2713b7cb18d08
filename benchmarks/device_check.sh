#!/usr/bin/env bash
# The accelerator rows, in one command, on a machine with an NVIDIA GPU:
#
#     bash benchmarks/device_check.sh
#
# Installs the bench extra and JAX's CUDA plugin into the current environment (a fresh virtualenv
# is best), then times on the GPU, against the same PyTorch twins (loaded with lvm_jax's
# parameters, loss and every gradient checked, eager and torch.compile, paired ratios over fresh
# processes, as on the CPU):
#   * the training steps of the image VAE, VLAE, VQ-VAE and both priors in float32 (PyTorch
#     float32), then with lvm_jax computing in bfloat16 against PyTorch under bfloat16 autocast
#     (AMP): the fair pair of mixed precision;
#   * the 2D VAE end to end (`vae2d`; its PyTorch side stays on the CPU, as the reference runs it).
# Writes benchmarks/results/device_<GPU>_float32.{json,md} and device_<GPU>_bfloat16.{json,md}.
# Never part of the test suite. PROCESSES (default 5) sets the fresh processes per step row.
set -euo pipefail
cd "$(dirname "$0")/.."

pip install -q -e ".[bench]"
python -c "import jax; assert jax.devices()[0].platform == 'gpu'" 2>/dev/null \
  || pip install -q -U "jax[cuda13]"
python - <<'PY'
import sys, jax, torch
if jax.devices()[0].platform != "gpu" or not torch.cuda.is_available():
    sys.exit(f"device_check.sh needs an NVIDIA GPU seen by both JAX ({jax.devices()[0]}) and "
             f"PyTorch (cuda available: {torch.cuda.is_available()})")
PY
gpu="$(python -c "import jax, re; print(re.sub(r'\W+', '_', jax.devices()[0].device_kind))")"
steps=(image_vae vlae_step vqvae_step)
for dtype in float32 bfloat16; do
  python -m benchmarks.run --only "${steps[@]}" --dtype "$dtype" --torch_device cuda \
    --processes "${PROCESSES:-5}" --torch_threads 1 --results "device_${gpu}_${dtype}" \
    --note "benchmarks/device_check.sh on ${gpu}: lvm_jax ${dtype} against PyTorch on cuda ($([ "$dtype" = bfloat16 ] && echo 'bfloat16 autocast' || echo float32))"
done
python -m benchmarks.run --only vae2d --results "device_${gpu}_float32"
echo "written: benchmarks/results/device_${gpu}_float32.md and device_${gpu}_bfloat16.md"
