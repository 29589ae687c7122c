"""The King James Bible as a TFDS dataset, read from the Debian `bible-kjv` package.

Public-domain English text (4.4 MB) for character-level language models
offline. `KjvBible` is a regular TFDS builder whose "download" runs the
package's `bible` program; after `download_and_prepare`, plain
`tfds.load("kjv_bible", data_dir=D, download=False)` reads it. Every 20th
verse goes to the `test` split, the rest to `train`.
"""

from __future__ import annotations

import shutil
import subprocess

import tensorflow_datasets as tfds

DEBIAN_PACKAGE = "bible-kjv"
_ALL_VERSES = "gen1:1-rev22:21"
TEST_EVERY = 20


def available() -> bool:
    return shutil.which("bible") is not None


def read_verses() -> list[str]:
    """Every verse's text, in order, without its reference."""
    if not available():
        raise FileNotFoundError(
            f"The `bible` program is missing: install the Debian package {DEBIAN_PACKAGE}."
        )
    text = subprocess.run(
        ["bible", "-f", _ALL_VERSES], capture_output=True, text=True, check=True
    ).stdout
    lines = (line.split(" ", 1) for line in text.splitlines() if line.strip())
    return [parts[1].strip() for parts in lines if len(parts) == 2]


class KjvBible(tfds.core.GeneratorBasedBuilder):
    """King James Version verses: `{"text": verse}`; test = every 20th verse."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
            homepage="https://packages.debian.org/bookworm/bible-kjv",
            description=__doc__,
        )

    def _split_generators(self, dl_manager):
        verses = read_verses()
        return {
            "train": self._generate_examples(verses, test=False),
            "test": self._generate_examples(verses, test=True),
        }

    def _generate_examples(self, verses, test: bool):
        for i, verse in enumerate(verses):
            if (i % TEST_EVERY == 0) == test:
                yield i, {"text": verse}


def load(split: str, data_dir: str | None = None, **kwargs):
    """Prepare (once) and load a split as a dataset of verse strings."""
    builder = KjvBible(data_dir=data_dir)
    if not builder.is_prepared():
        builder.download_and_prepare()
    return tfds.load("kjv_bible", split=split, data_dir=data_dir, **kwargs).map(
        lambda ex: ex["text"]
    )
