"""The recipe's ``data:`` entry: a spec string, or a mapping that adds the column mapping and the split.

    data: builtin:digits                                   # the string form
    data: {spec: csv:reviews.csv, text: review, label: stars, split: {fractions: [0.8, 0.1, 0.1], seed: 3}}

Every field is validated like a method config (an unknown key is an error naming it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from torchslim._config import check


@dataclass(frozen=True)
class SplitConfig:
    """How a source without its own train/val/test files is split, and how calibration samples are drawn.

    Args:
        fractions: train, val, test fractions of the rows (they must add up to 1).
        seed: the split's seed (fixed by default, whatever the recipe's seed, so scores stay comparable).
        calibration_samples: samples drawn from train (with the recipe's seed) for the ``calib`` split.
    """

    fractions: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    calibration_samples: int = 256

    def __post_init__(self) -> None:
        check(len(self.fractions) == 3, "fractions", f"expected [train, val, test], got {self.fractions}")
        check(all(0 <= f <= 1 for f in self.fractions) and abs(sum(self.fractions) - 1) < 1e-6, "fractions",
              f"must be three fractions in [0, 1] adding up to 1, got {self.fractions}")
        check(self.fractions[2] > 0, "fractions", "the test fraction must be > 0 (every stage is scored on it)")
        check(self.seed >= 0, "seed", f"must be >= 0, got {self.seed}")
        check(self.calibration_samples >= 1, "calibration_samples", f"must be >= 1, got {self.calibration_samples}")


@dataclass(frozen=True)
class CalibrationConfig:
    """The calibration a method runs: how many samples it reads, in batches of what size, from which split.

    One sub-config, the same in every method that calibrates (``calibration: {samples: 512}`` in a recipe step).
    Each method sets its own default; a recipe's mapping overrides only the keys it names of that default
    (in Python, a new `CalibrationConfig` starts from the defaults below: give every field you mean).

    Args:
        samples: samples read (the first ones of the split, or a seeded draw where the method says so;
            0: the whole split).
        batch_size: samples per calibration batch (a calibration batch, not a training one).
        split: the split read: ``calib`` (drawn from ``train`` unless the source has its own) or ``train``.

    Example:
        >>> ChannelPruningConfig(importance="activation", calibration=CalibrationConfig(samples=512, split="train"))
    """

    samples: int = 256
    batch_size: int = 32
    split: Literal["calib", "train"] = "calib"
    overlays_default: ClassVar[bool] = True

    def __post_init__(self) -> None:
        check(self.samples >= 0, "samples", f"must be >= 0 (0: the whole split), got {self.samples}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


COLUMN_FIELDS = ("text", "text_pair", "label", "image", "dense", "categorical")


@dataclass(frozen=True)
class DataConfig:
    """A data spec with the column mapping of table-shaped sources (csv:, jsonl:, parquet:, datasets:).

    Args:
        spec: the data spec, e.g. ``csv:reviews.csv`` or ``imagefolder:photos``.
        text: the column of sentences (default: a column named ``text``, where there is one).
        text_pair: the column of second sentences, for sentence-pair tasks.
        label: the class-label column, integers or strings (default: a column named ``label``, where there is one).
        image: the column of image file paths (relative to the table's folder), for image classifiers.
        dense: the numeric columns of a click log (the ``clicks`` modality: a DLRM's dense input).
        categorical: the categorical columns of a click log (integers, or strings that are hashed to ids).
        split: how rows are split into train/val/test and calibration (see `SplitConfig`).
        passage_words: ``text:`` files are cut into passages of at most this many words.
    """

    spec: str
    text: str | None = None
    text_pair: str | None = None
    label: str | None = None
    image: str | None = None
    dense: list[str] = field(default_factory=list)
    categorical: list[str] = field(default_factory=list)
    split: SplitConfig = field(default_factory=SplitConfig)
    passage_words: int = 200
    version: int = 1

    def __post_init__(self) -> None:
        check(bool(self.spec), "spec", "required, e.g. csv:path/to/file.csv")
        check(self.passage_words >= 8, "passage_words", f"must be >= 8, got {self.passage_words}")
        check(not (self.text_pair and not self.text), "text_pair", "needs text: (the first sentence's column)")

    def __str__(self) -> str:
        return self.spec

    @property
    def columns(self) -> dict[str, object]:
        """The column mapping given (field -> column name(s)), without the unset ones."""
        return {name: getattr(self, name) for name in COLUMN_FIELDS if getattr(self, name)}

    def to_recipe(self) -> str | dict:
        """The recipe form: the plain spec string when nothing but the spec differs from the defaults."""
        from torchslim._config import to_dict

        plain = to_dict(self)
        defaults = to_dict(DataConfig(spec=self.spec))
        return self.spec if plain == defaults else plain


def as_data_config(value) -> DataConfig:
    """A `DataConfig` from a spec string or a `DataConfig`."""
    return value if isinstance(value, DataConfig) else DataConfig(spec=str(value))
