"""Datasets (TFDS builders writing ``array_record``), joint augmentation and the grain pipeline.

``DATASETS`` maps the name used in configs and on the command line to a TFDS builder class.
Adding a dataset is a new file with a builder plus one line here.
"""

from mtl_jax.data.synthetic import MtlSynthetic

DATASETS = {
    "synthetic": MtlSynthetic,
}
