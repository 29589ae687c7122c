"""Fashion-MNIST through TFDS, prepared offline from the Debian package.

Online, `tfds.load("fashion_mnist")` downloads as usual. Offline, the
Debian package `dataset-fashion-mnist` ships the same idx files; its gzip
headers differ from upstream, so the stock checksums fail. `LocalFashionMNIST`
is the official TFDS builder with downloads replaced by those local files;
once it has prepared a `data_dir`, plain
`tfds.load("fashion_mnist", data_dir=D, download=False)` reads it.
"""

from __future__ import annotations

import os

import tensorflow_datasets as tfds
from tensorflow_datasets.image_classification.mnist import FashionMNIST

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
DEBIAN_PACKAGE = "dataset-fashion-mnist"


class _LocalFiles:
    """Stands in for the download manager: URL → file of the same name in a folder."""

    def __init__(self, dl_manager, source_dir: str):
        self._dl_manager = dl_manager
        self._source_dir = source_dir

    def download_and_extract(self, urls: dict) -> dict:
        local = {}
        for key, url in urls.items():
            path = os.path.join(self._source_dir, os.path.basename(url))
            if not os.path.exists(path):
                raise FileNotFoundError(
                    f"{path} is missing: install the Debian package {DEBIAN_PACKAGE} "
                    "or pass `source_dir` pointing at the Fashion-MNIST idx files."
                )
            local[key] = path
        return self._dl_manager.extract(local)


class LocalFashionMNIST(FashionMNIST, skip_registration=True):
    """The TFDS `fashion_mnist` builder, reading idx files from `source_dir`.

    Example (preparing needs the Debian package and takes a while):

    >>> import tempfile
    >>> builder = LocalFashionMNIST(data_dir=tempfile.mkdtemp())
    >>> builder.is_prepared()
    False
    >>> builder.download_and_prepare()  # doctest: +SKIP
    >>> builder.is_prepared()  # doctest: +SKIP
    True
    """

    name = "fashion_mnist"

    def __init__(self, *, source_dir: str = DEBIAN_DIR, **kwargs):
        self._source_dir = source_dir
        super().__init__(**kwargs)

    def _split_generators(self, dl_manager):
        return super()._split_generators(_LocalFiles(dl_manager, self._source_dir))


def local_source_available(source_dir: str = DEBIAN_DIR) -> bool:
    return os.path.exists(os.path.join(source_dir, "train-images-idx3-ubyte.gz"))


def prepare_offline(data_dir: str | None = None, source_dir: str = DEBIAN_DIR) -> bool:
    """Prepare `fashion_mnist` into `data_dir` from local files if needed.

    Returns True when the dataset is ready to read from `data_dir` without a
    download (already prepared, or just prepared from `source_dir`); False when
    no local copy exists, in which case `tfds.load` downloads as usual.
    """
    builder = LocalFashionMNIST(data_dir=data_dir, source_dir=source_dir)
    if builder.is_prepared():
        return True
    if not local_source_available(source_dir):
        return False
    builder.download_and_prepare()
    return True


def load(split: str, data_dir: str | None = None, **kwargs):
    """`tfds.load("fashion_mnist", split, as_supervised=True)`, offline when possible."""
    offline = prepare_offline(data_dir)
    return tfds.load(
        "fashion_mnist",
        split=split,
        data_dir=data_dir,
        as_supervised=True,
        download=not offline,
        **kwargs,
    )
