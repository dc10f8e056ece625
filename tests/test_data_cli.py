"""``mtl-jax data build NAME --manual_dir`` and ``mtl-jax data show NAME`` for every real
dataset builder, on the fake folders of ``tests/fake_datasets`` (the builders' own tests build
the same ones)."""

import numpy as np
import pytest
from fake_datasets import cityscapes as cs
from fake_datasets import nyu, potsdam
from fake_datasets import vkitti2_synthia as vs
from PIL import Image

from mtl_jax.data import DATASETS
from mtl_jax.main import main

# name -> (writer of a fake manual folder, builder config)
CASES = {
    "nyuv2": (nyu.write_nyuv2, None),
    "nyud_mt": (nyu.write_nyud, "60x80"),
    "cityscapes_mtan": (cs.write_mtan, "128x256_7cls"),
    "cityscapes": (cs.write_raw, "128x256_19cls"),
    "cityscapes_seq": (cs.write_seq, "128x256_16cls"),
    "vkitti2": (vs.write_vkitti2, "48x160_clone_random"),
    "synthia": (vs.write_synthia, "38x64"),
    "isprs_potsdam": (potsdam.write_tree, "tile32"),
}


def test_every_real_dataset_has_a_cli_case():
    assert set(CASES) == set(DATASETS) - {"synthetic"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_data_build_and_show(name, tmp_path, capsys):
    writer, config = CASES[name]
    manual = tmp_path / "manual"
    manual.mkdir()
    writer(str(manual))
    data_dir = str(tmp_path / "tfds")
    cfg = [f"--config={config}"] if config else []
    assert main(["data", "build", name, f"--manual_dir={manual}", f"--data_dir={data_dir}",
                 *cfg]) == 0
    assert f"prepared {name}" in capsys.readouterr().out
    out = tmp_path / "grid.png"
    assert main(["data", "show", name, f"--data_dir={data_dir}", f"--out={out}", "--num=2",
                 "--split=val", *cfg]) == 0
    img = np.asarray(Image.open(out))
    assert img.ndim == 3 and img.std() > 5
    # Without --manual_dir the build says what is missing, where to download, and exits 1.
    assert main(["data", "build", name, f"--data_dir={tmp_path / 'other'}", *cfg]) == 1
    err = capsys.readouterr().err
    assert "--manual_dir" in err and DATASETS[name].DOWNLOAD_URL in err
    # An unknown builder config lists the valid ones.
    assert main(["data", "build", name, f"--manual_dir={manual}", f"--data_dir={data_dir}",
                 "--config=nope"]) == 1
    assert "no builder config 'nope'" in capsys.readouterr().err


# configs/densemtl.py names these builder configs; a fake folder built under the same name
# must feed the config's pipeline (labels checked, batches of the config's input size).
DENSEMTL_DATASETS = {"nyud_mt": nyu.write_nyud, "cityscapes": cs.write_raw,
                     "vkitti2": vs.write_vkitti2, "synthia": vs.write_synthia}


@pytest.mark.parametrize("name", sorted(DENSEMTL_DATASETS))
def test_densemtl_config_reads_the_built_dataset(name, tmp_path):
    import importlib.util
    import os

    import jax

    from mtl_jax.data import pipeline, registry
    from mtl_jax.experiment import make_mesh, open_data

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location(
        "densemtl", os.path.join(repo, "configs", "densemtl.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config(f"dataset={name},tasks=sdn")
    config.num_devices = 1
    manual = tmp_path / "manual"
    manual.mkdir()
    DENSEMTL_DATASETS[name](str(manual))
    registry.build(name, config.dataset.config, str(tmp_path / "tfds"), manual_dir=str(manual))
    train, val = open_data(config, data_dir=str(tmp_path / "tfds"))
    it = pipeline.train_iterator(train, global_batch_size=config.batch_size,
                                 mesh=make_mesh(config), seed=0, augment=None)
    batch = jax.device_get(next(it))
    it.close()
    h, w = config.input_size
    assert batch["image"].shape == (config.batch_size, h, w, 3)
    assert batch["semseg"].max() < config.tasks.semseg.num_classes
    assert batch["depth"].shape == (config.batch_size, h, w, 1)
    assert np.abs(np.linalg.norm(batch["normals"], axis=-1) - 1).min() < 1e-3
    assert len(val) >= 1


def test_docs_show_every_expected_tree():
    import os

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "docs", "datasets.md"), encoding="utf-8") as f:
        docs = f.read()
    for name in CASES:
        cls = DATASETS[name]
        assert cls.EXPECTED_TREE in docs, name
        assert cls.DOWNLOAD_URL in docs, name
