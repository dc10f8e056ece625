"""The Colab notebooks: stored without outputs, calling only the package, and executed here
(nbclient, smoke settings, the session's tiny prepared dataset)."""

import os
import re
import time

import nbformat
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = ("quickstart", "densemtl_attention", "weighting")


def _load(name):
    return nbformat.read(os.path.join(COLAB, f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_stored_clean(name):
    nb = _load(name)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, "clear the outputs"
    source = "\n".join(c.source for c in code)
    assert "from mtl_jax" in source
    # No library code in notebooks: no model, step or training-loop definitions.
    assert not re.search(r"^\s*class\s", source, re.M)
    assert not re.search(r"jax\.(jit|grad|value_and_grad)|nn\.Module|optax\.", source)


def _execute(name, data_dir, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    monkeypatch.setenv("MTL_JAX_NOTEBOOK_SMOKE", "1")
    monkeypatch.setenv("MTL_JAX_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("TFDS_DATA_DIR", data_dir)
    monkeypatch.setenv("XLA_FLAGS", "")  # the kernel runs on one CPU device
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        p for p in (REPO, os.environ.get("PYTHONPATH", "")) if p))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # inline figures
    nb = _load(name)
    start = time.time()
    NotebookClient(nb, timeout=1800, kernel_name="python3",  # per cell; shared CI is slow
                   resources={"metadata": {"path": COLAB}}).execute()
    print(f"{name}: executed in {time.time() - start:.0f} s")
    return nb


def _text(nb):
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            data = o.get("data", {})
            out.append(o.get("text", "") + data.get("text/markdown", "")
                       + data.get("text/plain", ""))
    return "\n".join(out)


def _figures(nb):
    return sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))


def test_quickstart_runs(data_dir, tmp_path, monkeypatch):
    nb = _execute("quickstart", data_dir, tmp_path, monkeypatch)
    text = _text(nb)
    assert "24 training and 10 validation examples" in text
    assert re.search(r"semseg/miou\s+\d\.\d{4}", text)
    assert _figures(nb) >= 4  # examples, predictions, curves, the uploaded image
    out = tmp_path / "work" / "predictions"
    assert {"example_semseg.png", "example_depth.npy", "example_normals.png"} <= set(
        os.listdir(out))


def test_densemtl_attention_runs(data_dir, tmp_path, monkeypatch):
    nb = _execute("densemtl_attention", data_dir, tmp_path, monkeypatch)
    text = _text(nb)
    m = re.search(r"step 4: (\d+) xTAMs", text)
    assert m and int(m.group(1)) == 6  # S-D-N: 3 targets x 2 sources at stage 1
    assert _figures(nb) >= 2  # alpha curves, attention maps


def test_weighting_runs(data_dir, tmp_path, monkeypatch):
    nb = _execute("weighting", data_dir, tmp_path, monkeypatch)
    text = _text(nb)
    assert "| weighting_ew |" in text and "| weighting_uw |" in text
    assert _figures(nb) >= 2
