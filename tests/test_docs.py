"""The README and docs/ stay navigable: every relative link and image points at a file that
exists (and at a heading that exists, for links with an anchor into Markdown), the README
stays a first screen (under 250 lines), and CI runs exactly the README's test command."""

import glob
import os
import re

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DOCS = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
README_MAX_LINES = 250

# Markdown links and images, [text](target) and ![alt](target); an optional "title" is dropped.
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCED_CODE = re.compile(r"^```.*?^```", re.M | re.S)
INLINE_CODE = re.compile(r"`[^`\n]*`")
HTML_COMMENT = re.compile(r"<!--.*?-->", re.S)


def _prose(text: str) -> str:
    """`text` without what Markdown does not render as links: code and HTML comments."""
    for pattern in (HTML_COMMENT, FENCED_CODE, INLINE_CODE):
        text = pattern.sub("", text)
    return text


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


def _anchors(path: str) -> set[str]:
    with open(path, encoding="utf-8") as f:
        text = FENCED_CODE.sub("", f.read())
    return {_anchor(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", text, re.M)}


def broken_links(path: str, text: str) -> list[str]:
    """The relative links of Markdown `text` (read from `path`) whose file, or heading, is
    missing, each as "target: why"."""
    broken = []
    for target in LINK.findall(_prose(text)):
        if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:, ...
            continue
        file_part, _, anchor = target.partition("#")
        resolved = (os.path.normpath(os.path.join(os.path.dirname(path), file_part))
                    if file_part else path)
        if not os.path.exists(resolved):
            broken.append(f"{target}: no file {os.path.relpath(resolved, ROOT)}")
        elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
            broken.append(f"{target}: no heading #{anchor} in {os.path.relpath(resolved, ROOT)}")
    return broken


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: os.path.relpath(p, ROOT))
def test_relative_links_resolve(path):
    with open(path, encoding="utf-8") as f:
        assert broken_links(path, f.read()) == []


def test_broken_links_are_found():
    text = ("[ok](docs/DESIGN.md) [gone](docs/nowhere.md) ![img](missing.png) "
            "[web](https://example.com/x.md) `[code](not/a/link.md)` "
            "[head](docs/DESIGN.md#no-such-heading) [self](#quick-start)\n"
            "<!-- [hidden](hidden.md) -->\n```\n[fenced](fenced.md)\n```\n")
    assert broken_links(README, text) == [
        "docs/nowhere.md: no file docs/nowhere.md",
        "missing.png: no file missing.png",
        "docs/DESIGN.md#no-such-heading: no heading #no-such-heading in docs/DESIGN.md",
    ]


def test_anchor_follows_github():
    assert _anchor("From Python: configs") == "from-python-configs"
    assert _anchor("VQ-VAE") == "vq-vae"
    assert _anchor("Speed against PyTorch, on a CPU") == "speed-against-pytorch-on-a-cpu"


def test_readme_is_a_first_screen():
    with open(README, encoding="utf-8") as f:
        lines = f.read().splitlines()
    assert len(lines) < README_MAX_LINES


def _test_command(text: str) -> str:
    """The one line of `text` that installs the test extras and runs pytest."""
    lines = [line.strip() for line in text.splitlines()
             if "pytest" in line and "pip install" in line and not line.lstrip().startswith("#")]
    assert len(lines) == 1, lines
    return lines[0]


def test_ci_runs_the_readmes_test_command():
    with open(README, encoding="utf-8") as f:
        readme_blocks = "\n".join(re.findall(r"^```bash\n(.*?)^```", f.read(), re.M | re.S))
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    assert _test_command(readme_blocks) == _test_command(ci) == (
        'pip install -e ".[test]" && python -m pytest')


def _results() -> dict:
    from benchmarks import report
    return report.load(os.path.join(ROOT, "benchmarks", "results", "latest.json"))


def test_speed_sampling_table_is_generated_from_the_results():
    from benchmarks import report
    with open(os.path.join(ROOT, "docs", "speed.md"), encoding="utf-8") as f:
        speed = f.read()
    # After a new `benchmarks.run --only vqvae_sampling`, paste the new table into docs/speed.md.
    assert report.sampling_table(_results()) in speed


def test_readme_main_command_figures_are_the_startup_rows():
    main = "python -m experiments.vlae --epochs 5 --batch_size 32"
    rows = {row["step"]: row for row in _results()["benchmarks"]["startup"]["rows"]
            if row["model"] == main}
    cold = rows["whole run, cold compilation cache"]
    warm = rows["whole run, warm compilation cache"]
    neg_elbo = float(re.search(r"test -ELBO ([\d.]+)", cold["note"]).group(1))
    with open(README, encoding="utf-8") as f:
        readme = " ".join(f.read().split())
    assert f"({cold['lvm_jax']:.0f} s on 2 idle CPU cores" in readme
    assert f"{warm['lvm_jax']:.0f} s when run again" in readme
    assert f"test −ELBO ({neg_elbo:.1f} nats per example" in readme


def _readme_python(containing: str) -> str:
    with open(README, encoding="utf-8") as f:
        blocks = [b for b in re.findall(r"^```python\n(.*?)^```", f.read(), re.M | re.S)
                  if containing in b]
    assert len(blocks) == 1, containing
    return blocks[0]


def test_readme_python_examples_run_as_written(tmp_path, monkeypatch, capsys):
    """The README's three Python examples, in a fresh folder: the training one as a --quick
    run (its only change), then the reload and the losses examples unchanged."""
    monkeypatch.chdir(tmp_path)
    train = _readme_python("train_and_evaluate")
    assert "epochs=5)" in train
    train_globals = {}
    exec(train.replace("epochs=5)", "epochs=5, quick=True)"), train_globals)
    again, config = train_globals["again"], train_globals["config"]
    assert again == config
    assert [c.beta for c in train_globals["sweep"]] == [0.5, 1.0, 2.0]

    reload_globals = {}
    exec(_readme_python("load_run"), reload_globals)
    terms, images = reload_globals["terms"], reload_globals["images"]
    assert images.shape == (16, 32, 32, 1) and images.dtype == np.uint8
    assert reload_globals["z"].shape == (8, 16) and reload_globals["nll"].shape == (8,)
    assert terms["log_px_z"].shape == terms["kl"].shape == (8,)
    assert np.all(np.isfinite(terms["log_px_z"])) and np.all(terms["kl"] >= 0)

    losses_globals = {}
    exec(_readme_python("from lvm_jax import losses"), losses_globals)
    np.testing.assert_array_equal(losses_globals["losses"].kl_std_normal(
        losses_globals["mean"], losses_globals["log_var"]), np.zeros(4))
    printed = capsys.readouterr().out
    assert "nats per example" in printed and "[0. 0. 0. 0.]" in printed
