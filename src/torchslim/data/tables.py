"""Table-shaped user data: ``csv:``, ``jsonl:``, ``parquet:`` and ``datasets:`` (Hugging Face ``datasets``).

A spec names one file, or a folder holding ``train``/``val`` (or ``validation``)/``test`` files of that kind. The
recipe's column mapping (`torchslim.data.config.DataConfig`) says which columns hold what; the kind of sample
follows from it:

- ``text`` (+ ``text_pair``) with an optional ``label``: sentences (pairs) for text classifiers and encoders;
- ``image`` (file paths, relative to the table's folder) with ``label``: images for image classifiers;
- ``dense`` and/or ``categorical`` with an optional 0/1 ``label``: click-log rows (the ``clicks`` modality a
  DLRM takes). Null dense values are filled with 0 (and reported); categorical strings are hashed to ids
  (hexadecimal strings, as Criteo ships them, are read as numbers); a model's preprocess folds ids into its
  tables' sizes.

Reading uses pandas (and pyarrow for parquet, ``datasets`` for ``datasets:``), imported only here.

Example:
    >>> data = resolve_data(DataConfig(spec="csv:reviews.csv", text="review", label="stars"))
    >>> data.modality, data.num_classes, data.class_names
    ('text', 2, ['bad', 'good'])
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from torchslim.data import DataBundle, assign_splits, register_data_prefix
from torchslim.data.config import DataConfig
from torchslim.errors import InputError

EXTENSIONS = {"csv": (".csv", ".tsv"), "jsonl": (".jsonl", ".json"), "parquet": (".parquet", ".pq")}
SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "dev": "val", "test": "test"}


def _pandas(where: str):
    try:
        import pandas
    except ImportError:
        raise InputError(f"{where}: reading tables needs pandas (pip install 'torchslim[data]')") from None
    return pandas


def _read_file(path: Path, kind: str, where: str):
    pandas = _pandas(where)
    try:
        if kind == "csv":
            return pandas.read_csv(path, sep="\t" if path.suffix == ".tsv" else ",")
        if kind == "jsonl":
            return pandas.read_json(path, lines=path.suffix == ".jsonl")
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise InputError(f"{where}: parquet needs pyarrow (pip install 'torchslim[data]')") from None
        return pandas.read_parquet(path)
    except InputError:
        raise
    except Exception as error:  # a parser's own message names the problem; the file is what the user needs
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise InputError(f"{where}: {path}: cannot read it as {kind}: {first[:200]}") from None


def _split_files(folder: Path, kind: str, where: str) -> dict[str, Path]:
    files = {}
    for path in sorted(folder.iterdir()):
        name = SPLIT_NAMES.get(path.stem.lower())
        if name and path.suffix.lower() in EXTENSIONS[kind] and name not in files:
            files[name] = path
    if not files:
        raise InputError(f"{where}: {folder} holds no train/val/test {kind} files "
                         f"(expected e.g. train{EXTENSIONS[kind][0]}, test{EXTENSIONS[kind][0]})")
    return files


def read_tables(rest: str, kind: str, where: str) -> tuple[dict[str, object], dict[str, Path]]:
    """The source's tables by split (``all`` for a single file) and the file each came from."""
    path = Path(rest)
    if path.is_dir():
        files = _split_files(path, kind, where)
    elif path.is_file():
        files = {"all": path}
    else:
        raise InputError(f"{where}: {path} not found")
    return {name: _read_file(file, kind, where) for name, file in files.items()}, files


def read_datasets(rest: str, where: str) -> tuple[dict[str, object], dict[str, Path]]:
    """Tables of a Hugging Face ``datasets`` source: a ``save_to_disk`` folder, or local files or a folder that
    ``load_dataset`` reads (offline)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import datasets
    except ImportError:
        raise InputError(f"{where}: needs the datasets package (pip install 'torchslim[data]')") from None
    path = Path(rest)
    if not path.exists():
        raise InputError(f"{where}: {path} not found")
    try:
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
        elif path.is_file():
            builder = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet",
                       ".txt": "text"}.get(path.suffix.lower())
            if builder is None:
                raise InputError(f"{where}: {path}: load_dataset reads .csv, .json(l), .parquet and .txt files")
            loaded = datasets.load_dataset(builder, data_files=str(path))
        else:
            loaded = datasets.load_dataset(str(path))
    except InputError:
        raise
    except Exception as error:
        raise InputError(f"{where}: {path}: datasets could not load it: {type(error).__name__}: "
                         f"{str(error).strip()[:200]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"all": loaded}
    tables = {}
    for name, split in loaded.items():
        ours = "all" if len(loaded) == 1 else SPLIT_NAMES.get(name)  # one split (load_dataset's "train") is split
        if ours is not None and ours not in tables:
            tables[ours] = split.to_pandas()
    if not tables:
        raise InputError(f"{where}: {path}: no train/validation/test split (found {sorted(loaded)})")
    return tables, {name: path for name in tables}


# --- columns ---------------------------------------------------------------------------------------------------

def _column(frame, name: str, file: Path, where: str, role: str):
    if name not in frame.columns:
        known = ", ".join(map(str, frame.columns[:20]))
        raise InputError(f"{where}: {file}: no column {name!r} for {role} (columns: {known})")
    column = frame[name]
    if len(column) and column.isna().all():
        raise InputError(f"{where}: {file}: column {name!r} ({role}) is all null")
    return column


def _first_null(column) -> int:
    return int(np.flatnonzero(column.isna().to_numpy())[0])


def _text(frame, name: str, file: Path, where: str) -> list[str]:
    column = _column(frame, name, file, where, "text")
    if column.isna().any():
        raise InputError(f"{where}: {file}: column {name!r} (text) has {int(column.isna().sum())} null values "
                         f"(first at row {_first_null(column)})")
    values = column.tolist()
    wrong = next((v for v in values if not isinstance(v, str)), None)
    if wrong is not None:
        raise InputError(f"{where}: {file}: column {name!r} (text) holds {type(wrong).__name__} values such as "
                         f"{wrong!r}, expected strings")
    return values


def _label_values(frame, name: str, file: Path, where: str) -> list:
    column = _column(frame, name, file, where, "label")
    if column.isna().any():
        raise InputError(f"{where}: {file}: column {name!r} (label) has {int(column.isna().sum())} rows without a "
                         f"label (first at row {_first_null(column)})")
    values = column.tolist()
    for value in values:
        if isinstance(value, (bool, np.bool_, str)) or (isinstance(value, (int, np.integer)) and value >= 0):
            continue
        if isinstance(value, (float, np.floating)) and float(value).is_integer() and value >= 0:
            continue
        raise InputError(f"{where}: {file}: column {name!r} (label) holds {value!r}: expected class labels "
                         f"(non-negative integers or strings)")
    return values


def _encode_labels(values: list, where: str, name: str) -> tuple[np.ndarray, list[str] | None, int]:
    """Class indices, class names (for string labels, sorted) and the number of classes."""
    kinds = {isinstance(v, str) for v in values}
    if kinds == {True, False}:
        raise InputError(f"{where}: column {name!r} (label) mixes strings and numbers")
    if kinds == {True}:
        names = sorted(set(values))
        lookup = {n: i for i, n in enumerate(names)}
        return np.asarray([lookup[v] for v in values], dtype=np.int64), names, len(names)
    labels = np.asarray([int(v) for v in values], dtype=np.int64)
    return labels, None, int(labels.max()) + 1 if len(labels) else 0


def _dense(frame, names: list[str], file: Path, where: str, notes: list[str]) -> np.ndarray:
    columns = []
    for name in names:
        column = _column(frame, name, file, where, "dense")
        converted = _pandas(where).to_numeric(column, errors="coerce")
        bad = converted.isna() & ~column.isna()
        if bad.any():
            first = int(np.flatnonzero(bad.to_numpy())[0])
            raise InputError(f"{where}: {file}: column {name!r} (dense) holds {column.iloc[first]!r} at row {first}: "
                             f"expected numbers")
        if column.isna().any():
            notes.append(f"{file.name}: {int(column.isna().sum())} null values of dense column {name!r} filled with 0")
        columns.append(converted.fillna(0).to_numpy(dtype=np.float32))
    return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0), np.float32)


def _category_id(value) -> int:
    if isinstance(value, (int, np.integer)):
        return int(value)
    text = str(value)
    try:
        return int(text, 16)  # Criteo's categorical values are hexadecimal hashes
    except ValueError:
        return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=7).digest(), "little")


def _categorical(frame, names: list[str], file: Path, where: str) -> np.ndarray:
    columns = []
    for name in names:
        column = _column(frame, name, file, where, "categorical")
        if column.dtype.kind == "f":
            if not all(float(v).is_integer() for v in column.dropna()):
                raise InputError(f"{where}: {file}: column {name!r} (categorical) holds non-integer numbers")
            column = column.astype("Int64")
        ids = [0 if v is None or (isinstance(v, float) and np.isnan(v)) else _category_id(v)
               for v in column.astype(object).where(column.notna(), None).tolist()]
        if any(i < 0 for i in ids):
            raise InputError(f"{where}: {file}: column {name!r} (categorical) holds negative ids")
        columns.append(np.asarray(ids, dtype=np.int64))
    return np.stack(columns, axis=1) if columns else np.zeros((len(frame), 0), np.int64)


def _images(frame, name: str, file: Path, where: str) -> list:
    from torchslim.data.imagefolder import check_image

    column = _column(frame, name, file, where, "image")
    if column.isna().any():
        raise InputError(f"{where}: {file}: column {name!r} (image) has {int(column.isna().sum())} null values "
                         f"(first at row {_first_null(column)})")
    items = []
    for value in column.tolist():
        if isinstance(value, dict) and value.get("bytes") is not None:  # a datasets Image feature
            items.append(bytes(value["bytes"]))
            continue
        path = Path(value["path"] if isinstance(value, dict) else str(value))
        path = path if path.is_absolute() else file.parent / path
        check_image(path, f"{where}: {file}: column {name!r}")
        items.append(path)
    return items


# --- bundle ----------------------------------------------------------------------------------------------------

def _modality(config: DataConfig, columns) -> tuple[str, DataConfig]:
    """The kind of sample the mapping asks for, with the conventional defaults (``text``, ``label``) filled in."""
    from dataclasses import replace

    if config.dense or config.categorical:
        modality = "clicks"
    elif config.image:
        modality = "image"
    elif config.text or "text" in columns:
        modality = "text"
        config = config if config.text else replace(config, text="text")
    else:
        raise InputError(f"data: {config.spec}: say which columns hold the samples: text: (and text_pair:), image:, "
                         f"or dense:/categorical: (columns: {', '.join(map(str, list(columns)[:20]))})")
    if config.label is None and "label" in columns:
        config = replace(config, label="label")
    return modality, config


def _samples(frame, modality: str, config: DataConfig, file: Path, where: str, notes: list[str]) -> list:
    if modality == "text":
        first = _text(frame, config.text, file, where)
        if config.text_pair:
            return list(zip(first, _text(frame, config.text_pair, file, where)))
        return first
    if modality == "image":
        return _images(frame, config.image, file, where)
    return _dense(frame, list(config.dense), file, where, notes), _categorical(frame, list(config.categorical), file,
                                                                              where)


def table_bundle(config: DataConfig, tables: dict[str, object], files: dict[str, Path], seed: int) -> DataBundle:
    """A bundle from the source's tables (by split) and the column mapping."""
    where = "data"
    first = next(iter(tables.values()))
    modality, config = _modality(config, first.columns)
    chunks, label_values, given, notes, count = [], [], {}, [], 0
    for name, frame in tables.items():
        if len(frame) == 0:
            raise InputError(f"{where}: {files[name]}: no rows")
        chunks.append(_samples(frame, modality, config, files[name], where, notes))
        if config.label:
            label_values += _label_values(frame, config.label, files[name], where)
        given[name] = np.arange(count, count + len(frame))
        count += len(frame)
    labels, names, classes = (None, None, None)
    if config.label:
        labels, names, classes = _encode_labels(label_values, f"{where}: {config.spec}", config.label)
    parts, split_info = assign_splits(given, config.split, seed, f"{where}: {config.spec}")
    if modality == "clicks":
        from torchslim.data.clicks import ClickRows

        dense, ids = (np.concatenate([c[k] for c in chunks]) for k in (0, 1))
        splits = {n: ClickRows(dense[i], ids[i]) for n, i in parts.items()}
        classes, names = None, None  # click labels are 0/1 targets of one logit
    else:
        samples = [s for chunk in chunks for s in chunk]
        if modality == "image":
            from torchslim.data.imagefolder import ImageFiles

            splits = {n: ImageFiles([samples[j] for j in i]) for n, i in parts.items()}
        else:
            splits = {n: [samples[j] for j in i] for n, i in parts.items()}
    sizes = " / ".join(f"{len(splits[n])} {n}" for n in ("train", "val", "test"))
    source = ", ".join(str(f) for f in dict.fromkeys(files.values()))
    notes.insert(0, f"{config.spec}: {count} rows of {source} ({modality}; {sizes}; {split_info['split']})")
    return DataBundle(spec=config.spec, modality=modality, splits=splits,
                      labels={n: (None if labels is None else labels[i]) for n, i in parts.items()},
                      num_classes=classes, notes=notes, class_names=names,
                      split_info={**split_info, "columns": config.columns, "files": [str(f) for f in files.values()]})


def _register(kind: str) -> None:
    @register_data_prefix(kind)
    def load(rest: str, seed: int = 0, config: DataConfig | None = None) -> DataBundle:
        config = config or DataConfig(spec=f"{kind}:{rest}")
        tables, files = read_tables(rest, kind, f"data: {config.spec}")
        return table_bundle(config, tables, files, seed)

    load.__doc__ = f"``{kind}:PATH``: a {kind} table (a file, or train/val/test files); see the data: mapping."


for _kind in EXTENSIONS:
    _register(_kind)


@register_data_prefix("datasets")
def load_datasets(rest: str, seed: int = 0, config: DataConfig | None = None) -> DataBundle:
    """``datasets:NAME_OR_PATH``: a Hugging Face ``datasets`` data set from the local cache or a saved folder."""
    config = config or DataConfig(spec=f"datasets:{rest}")
    tables, files = read_datasets(rest, f"data: {config.spec}")
    return table_bundle(config, tables, files, seed)
