"""The Colab notebook's code runs: its cells, less shell lines, on CPU with a tiny configuration."""

import json
import os
import pathlib

NOTEBOOK = pathlib.Path(__file__).parent.parent / "notebooks" / "colab_tpu.ipynb"


def notebook_code() -> str:
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    sources = ["".join(cell["source"]) for cell in cells if cell["cell_type"] == "code"]
    lines = "\n".join(sources).splitlines()
    # Shell escapes (`!pip ...`) are Colab's, not Python's.
    return "\n".join(line for line in lines if not line.lstrip().startswith(("!", "%")))


def test_notebook_trains_restores_and_samples(tmp_path, monkeypatch):
    monkeypatch.setenv("LVM_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("LVM_JAX_NOTEBOOK_WORKDIR", str(tmp_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    namespace = {}
    exec(compile(notebook_code(), str(NOTEBOOK), "exec"), namespace)
    assert namespace["run"].step > 0  # restored, trained state
    samples = namespace["samples"]
    assert samples.shape == (16, 32, 32, 1) and samples.dtype == "uint8"
    assert set(namespace["vlae_summary"]["test_metrics"]) >= {"neg_elbo", "bits_per_dim"}
    assert "prior_nll" in namespace["vq_summary"]["test_metrics"]
    assert os.path.exists(tmp_path / "vqvae" / "mnist_embedded" / "samples_pixelcnn.png")
    assert set(namespace["vq2_summary"]["test_metrics"]) >= {"recon_mse", "top_prior_nll",
                                                             "bottom_prior_nll", "bits_per_image"}
    assert os.path.exists(tmp_path / "vqvae2" / "mnist_embedded" / "samples.png")


def test_install_cell_installs_an_uploaded_copy_and_says_what_to_do_on_a_restart():
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    install = next(cell for cell in cells if cell["cell_type"] == "code")
    commands = [line for line in "".join(install["source"]).splitlines() if line.startswith("!")]
    assert commands == ["!unzip -q -o /content/lvm_jax.zip -d /content/lvm_jax",
                        '!pip install -q "/content/lvm_jax[tfds_prepare]"']
    instructions = "".join(cells[cells.index(install) - 1]["source"])
    assert "git archive -o lvm_jax.zip HEAD" in instructions and "Restart session" in instructions
