"""Reading and validating a user's pre-extracted features (the input layouts of the `features` converter).

`read_split(split, path)` reads one split in any of the three layouts (see the package docstring),
checks it and returns a `SplitInputs` with lazy row access (memory-mapped `.npy`, h5 datasets,
one file per clip), so large feature sets are never loaded whole. `check_splits` checks what
the splits must agree on. Every problem found is collected; one `FeatureInputError` lists them
all, each naming the file (and the example index and id).
"""

from __future__ import annotations

import csv
import dataclasses
import pathlib
import re
import zipfile
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from unialign_jax.data.pipeline import MODALITIES
from unialign_jax.errors import UserError

LABEL, ID, STEP_LABELS = "label", "id", "step_labels"
LABELS_CSV = "labels.csv"
STACKED_SUFFIXES = (".npz", ".h5", ".hdf5")
_CHUNK_BYTES = 64 << 20  # rows read at once when scanning a stacked array for NaN / Inf
_SHOWN_INDICES = 5  # examples listed per problem
_SHOWN_PROBLEMS = 30  # problems listed in one error


class FeatureInputError(UserError, ValueError):
    """The inputs cannot be converted; the message lists every problem with its file and example."""


class Problems:
    """Collects problem descriptions; `raise_if_any` raises one `FeatureInputError` listing them."""

    def __init__(self):
        self.items: list[str] = []

    def add(self, message: str) -> None:
        self.items.append(message)

    def raise_if_any(self, what: str) -> None:
        if not self.items:
            return
        shown = self.items[:_SHOWN_PROBLEMS]
        more = len(self.items) - len(shown)
        raise FeatureInputError(
            f"{what}: {len(self.items)} problem(s):\n  - " + "\n  - ".join(shown)
            + (f"\n  ... and {more} more" if more else "")
        )


class ClipFiles(Sequence):
    """One `.npy` file per example, loaded when indexed."""

    def __init__(self, paths: Sequence[pathlib.Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        return np.load(self.paths[index], allow_pickle=False)


@dataclasses.dataclass
class SplitInputs:
    """A validated split: per-modality row sequences, labels, ids and optional step labels."""

    split: str
    source: pathlib.Path
    modalities: dict[str, Sequence]  # modality -> rows (array-like [N, ...] or ClipFiles)
    shapes: dict[str, tuple[int, ...]]  # modality -> per-example shape (T, ...)
    labels: np.ndarray  # int64[N]
    ids: list[str]
    step_labels: np.ndarray | None  # int64[N, T]

    def __len__(self) -> int:
        return len(self.ids)

    def example(self, index: int) -> dict[str, np.ndarray | int | str]:
        """Example `index` as the tfds features of the `features` dataset."""
        steps = next(iter(self.shapes.values()))[0]
        label = int(self.labels[index])
        example = {m: np.asarray(rows[index], np.float32) for m, rows in self.modalities.items()}
        example["label"] = label
        example["step_labels"] = (
            np.full((steps,), label, np.int32) if self.step_labels is None else self.step_labels[index].astype(np.int32)
        )
        example["id"] = self.ids[index]
        return example


# ---------------------------------------------------------------------------------------------------
# Readers of the three layouts: each returns {key: rows} (key: modality, 'label', 'id', 'step_labels').


def _open_stacked(path: pathlib.Path, problems: Problems) -> dict[str, Sequence] | None:
    """Arrays of an `.npz` / `.h5` file or of a directory of `.npy` files (memory-mapped)."""
    try:
        if path.is_dir():
            return {p.stem: _load_array(lambda p=p: np.load(p, mmap_mode="r", allow_pickle=False), f"{p}", problems)
                    for p in sorted(path.glob("*.npy"))}
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                return {key: _load_array(lambda key=key: archive[key], f"{path} [{key}]", problems)
                        for key in archive.files}
        try:
            import h5py  # pylint: disable=import-outside-toplevel
        except ImportError:
            problems.add(f"{path}: reading .h5 files needs h5py (pip install h5py)")
            return None
        handle = h5py.File(path, "r")
        return {key: handle[key] for key in handle.keys() if isinstance(handle[key], h5py.Dataset)}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        problems.add(f"{path}: unreadable ({type(error).__name__}: {error})")
        return None


def _load_array(load: Callable[[], np.ndarray], where: str, problems: Problems) -> np.ndarray | None:
    """`load()`, or None after reporting a pickled object array (never unpickled: it could run code)."""
    try:
        return load()
    except ValueError as error:
        if "allow_pickle" not in str(error) and "Python objects" not in str(error):
            raise
        problems.add(f"{where}: object array (needs pickle); store ids as fixed-width strings, "
                     "e.g. np.array(ids, dtype=str), and features as float arrays")
        return None


def _read_labels_csv(path: pathlib.Path, problems: Problems) -> tuple[list[str], list[int]] | None:
    ids, labels = [], []
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        problems.add(f"{path}: unreadable ({type(error).__name__}: {error})")
        return None
    if not rows or [cell.strip() for cell in rows[0][:2]] != [ID, LABEL]:
        problems.add(f"{path}: the first row must be the header 'id,label', got {rows[0] if rows else 'nothing'}")
        return None
    if len(rows) == 1:
        problems.add(f"{path}: no examples below the header")
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != 2 or not row[0].strip() or not re.fullmatch(r"\s*-?\d+\s*", row[1]):
            problems.add(f"{path} row {number}: expected '<id>,<integer label>', got {','.join(row)!r}")
            continue
        ids.append(row[0].strip())
        labels.append(int(row[1]))
    return ids, labels


def _open_clips(folder: pathlib.Path, problems: Problems):
    """Per-clip layout: labels.csv + `{modality}/{id}.npy` (and optional `step_labels/{id}.npy`)."""
    table = _read_labels_csv(folder / LABELS_CSV, problems)
    if table is None:
        return None
    ids, labels = table
    columns: dict[str, Sequence] = {ID: np.array(ids), LABEL: np.array(labels, np.int64)}
    subfolders = sorted(p for p in folder.iterdir() if p.is_dir())
    unknown = [p.name for p in subfolders if p.name not in MODALITIES and p.name != STEP_LABELS]
    if unknown:
        problems.add(f"{folder}: unknown folder(s) {unknown}; expected modality names {MODALITIES} or {STEP_LABELS!r}")
    known_ids = set(ids)
    for sub in subfolders:
        if sub.name in unknown:
            continue
        files = {p.stem: p for p in sub.iterdir() if p.suffix == ".npy"}
        missing = [i for i in ids if i not in files]
        orphans = sorted(set(files) - known_ids)
        if missing:
            shown = ", ".join(str(sub / f"{i}.npy") for i in missing[:_SHOWN_INDICES])
            problems.add(f"{sub}: pairing: {len(missing)} example(s) of {LABELS_CSV} have no file, e.g. {shown}")
        if orphans:
            shown = ", ".join(str(files[i]) for i in orphans[:_SHOWN_INDICES])
            problems.add(f"{sub}: pairing: {len(orphans)} file(s) have no row in {LABELS_CSV}, e.g. {shown}")
        if not missing:
            columns[sub.name] = ClipFiles([files[i] for i in ids])
    return columns


# ---------------------------------------------------------------------------------------------------
# Checks.


def _format_indices(indices: Sequence[int], ids: Sequence[str] | None) -> str:
    shown = [f"{i}" + (f" (id {ids[i]!r})" if ids is not None and i < len(ids) else "")
             for i in indices[:_SHOWN_INDICES]]
    return ", ".join(shown) + (f", ... ({len(indices)} in all)" if len(indices) > _SHOWN_INDICES else "")


def _decode_ids(raw, where: str, problems: Problems) -> list[str] | None:
    array = np.asarray(raw[:] if not isinstance(raw, np.ndarray) else raw)
    if array.ndim != 1:
        problems.add(f"{where}: ids must be a 1-D array, got shape {array.shape}")
        return None
    if array.dtype.kind in "iu":
        return [str(int(x)) for x in array]
    if array.dtype.kind in "SUO":
        values = [x.decode("utf-8") if isinstance(x, bytes) else x for x in array.tolist()]
        if all(isinstance(x, str) and x for x in values):
            return values
    problems.add(f"{where}: ids must be non-empty strings or integers, got dtype {array.dtype}")
    return None


def _check_labels(labels, where: str, problems: Problems, count: int) -> np.ndarray | None:
    array = np.asarray(labels[:] if not isinstance(labels, np.ndarray) else labels)
    if array.dtype.kind not in "iu":
        problems.add(f"{where}: labels must be integers, got dtype {array.dtype}")
        return None
    if array.shape != (count,):
        problems.add(f"{where}: pairing: labels have shape {array.shape}, expected ({count},) like the ids")
        return None
    return array.astype(np.int64)


def _scan_rows(rows: Sequence, shape: tuple[int, ...], where: str, ids, problems: Problems) -> None:
    """Finite float32 values in every row; per-clip files are also checked for shape and dtype."""
    bad: list[int] = []
    with np.errstate(over="ignore", invalid="ignore"):
        if isinstance(rows, ClipFiles):
            for index, path in enumerate(rows.paths):
                try:
                    value = np.load(path, allow_pickle=False)
                except (OSError, ValueError, EOFError) as error:
                    problems.add(f"{path}: unreadable ({type(error).__name__}: {error})")
                    continue
                if value.dtype.kind != "f":
                    problems.add(f"{path}: dtype {value.dtype}, expected floating point")
                elif value.shape != shape:
                    problems.add(f"{path}: shape {value.shape}, expected {shape} like the other examples")
                elif not np.isfinite(value.astype(np.float32)).all():
                    bad.append(index)
        else:
            step = max(1, _CHUNK_BYTES // max(1, int(np.prod(shape)) * rows.dtype.itemsize))
            for start in range(0, len(rows), step):
                block = np.asarray(rows[start : start + step]).astype(np.float32)
                finite = np.isfinite(block.reshape(len(block), -1)).all(axis=1)
                bad.extend(start + int(i) for i in np.flatnonzero(~finite))
    if bad:
        problems.add(
            f"{where}: {len(bad)} example(s) contain NaN, Inf or values beyond the float32 range: "
            + _format_indices(bad, ids)
        )


def _clip_shape(rows: ClipFiles, problems: Problems) -> tuple[int, ...] | None:
    try:
        first = np.load(rows.paths[0], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as error:
        problems.add(f"{rows.paths[0]}: unreadable ({type(error).__name__}: {error})")
        return None
    return tuple(first.shape)


def read_split(split: str, path: str | pathlib.Path) -> SplitInputs:
    """Reads and checks one split (layout chosen by `path`, see the package docstring).

    Raises:
        FeatureInputError listing every problem, each with its file and example index / id.
    """
    path = pathlib.Path(path).expanduser().absolute()
    problems = Problems()
    if path.is_dir() and (path / LABELS_CSV).exists():
        columns, clip_layout = _open_clips(path, problems), True
    elif path.is_dir() or (path.is_file() and path.suffix in STACKED_SUFFIXES):
        columns, clip_layout = _open_stacked(path, problems), False
    else:
        problems.add(
            f"{path}: not found, or not an .npz / .h5 file, a folder of .npy files or a folder with {LABELS_CSV}"
        )
        columns, clip_layout = None, False
    problems.raise_if_any(f"features split {split!r}")

    def describe(key: str) -> str:  # where an array is, for messages
        if not clip_layout:
            return f"{path} [{key}]"
        return f"{path / (LABELS_CSV if key in (ID, LABEL) else key)}"

    unknown = sorted(set(columns) - {*MODALITIES, LABEL, ID, STEP_LABELS})
    if unknown:
        problems.add(f"{path}: unknown array(s) {unknown}; expected modality names {MODALITIES}, "
                     f"{LABEL!r}, {ID!r} and optionally {STEP_LABELS!r}")
    for key in (LABEL, ID):
        if key not in columns:
            problems.add(f"{path}: no {key!r} array")
    modalities = {m: columns[m] for m in MODALITIES if m in columns}
    if not modalities and not clip_layout:
        problems.add(f"{path}: no modality array; name them after the modalities {MODALITIES}")
    elif not modalities:
        problems.add(f"{path}: no modality folder ({', '.join(MODALITIES)}) with one .npy file per example")
    problems.raise_if_any(f"features split {split!r}")

    ids = _decode_ids(columns[ID], describe(ID), problems)
    if ids == []:
        problems.add(f"{describe(ID)}: no examples")
        ids = None
    count = len(ids) if ids is not None else None
    labels = _check_labels(columns[LABEL], describe(LABEL), problems, count) if count is not None else None
    if ids is not None:
        seen: dict[str, int] = {}
        duplicates = [index for index, i in enumerate(ids) if seen.setdefault(i, index) != index]
        if duplicates:
            problems.add(f"{describe(ID)}: pairing: {len(duplicates)} duplicate id(s) at "
                         + _format_indices(duplicates, ids))
    if labels is not None and (negative := np.flatnonzero(labels < 0)).size:
        problems.add(f"{describe(LABEL)}: negative labels at " + _format_indices(negative.tolist(), ids))

    shapes = {}
    for modality, rows in modalities.items():
        if isinstance(rows, ClipFiles):
            shape = _clip_shape(rows, problems)
        else:
            if rows.dtype.kind != "f":
                problems.add(f"{describe(modality)}: dtype {rows.dtype}, expected floating point features")
                continue
            if count is not None and len(rows) != count:
                problems.add(f"{describe(modality)}: pairing: {len(rows)} rows, but {count} ids and labels")
                continue
            shape = tuple(rows.shape[1:])
        if shape is None:
            continue
        if len(shape) not in (2, 4) or min(shape, default=0) < 1:
            problems.add(f"{describe(modality)}: per-example shape {shape}, expected (T, D) or (T, H, W, C)")
            continue
        shapes[modality] = shape
        _scan_rows(rows, shape, describe(modality), ids, problems)
    if len({shape[0] for shape in shapes.values()}) > 1:
        problems.add(f"{path}: modalities have different numbers of steps T: "
                     + ", ".join(f"{m} {shape}" for m, shape in shapes.items()))

    step_labels = None
    if STEP_LABELS in columns and shapes and count is not None:
        step_labels = _step_labels(columns[STEP_LABELS], describe(STEP_LABELS), count,
                                   next(iter(shapes.values()))[0], ids, problems)
    problems.raise_if_any(f"features split {split!r}")
    return SplitInputs(split, path, modalities, shapes, labels, ids, step_labels)


def _step_labels(raw, where: str, count: int, steps: int, ids, problems: Problems) -> np.ndarray | None:
    if isinstance(raw, ClipFiles):
        rows = []
        for path in raw.paths:
            value = np.load(path, allow_pickle=False)
            if value.shape != (steps,) or value.dtype.kind not in "iu":
                problems.add(
                    f"{path}: step labels must be integers of shape ({steps},), got {value.dtype} {value.shape}"
                )
                return None
            rows.append(value)
        array = np.stack(rows)
    else:
        array = np.asarray(raw[:] if not isinstance(raw, np.ndarray) else raw)
        if array.dtype.kind not in "iu" or array.shape != (count, steps):
            problems.add(f"{where}: step labels must be integers of shape ({count}, {steps}), "
                         f"got {array.dtype} {array.shape}")
            return None
    if (negative := np.flatnonzero((array < 0).any(axis=1))).size:
        problems.add(f"{where}: negative step labels at " + _format_indices(negative.tolist(), ids))
    return array.astype(np.int64)


def check_splits(splits: Mapping[str, SplitInputs], num_classes: int) -> None:
    """Same modalities and shapes in every split, labels below `num_classes`, no id in two splits."""
    problems = Problems()
    reference_split, reference = next(iter(splits.items()))
    for name, inputs in splits.items():
        if inputs.shapes != reference.shapes:
            problems.add(f"{inputs.source}: modalities/shapes {inputs.shapes} differ from split "
                         f"{reference_split!r} ({reference.source}): {reference.shapes}")
        for what, values in (("labels", inputs.labels), ("step labels", inputs.step_labels)):
            if values is None:
                continue
            too_large = np.flatnonzero((values.reshape(len(values), -1) >= num_classes).any(axis=1))
            if too_large.size:
                problems.add(f"{inputs.source}: {what} >= num_classes ({num_classes}) at "
                             + _format_indices(too_large.tolist(), inputs.ids))
    names = list(splits)
    for i, first in enumerate(names):
        for second in names[i + 1 :]:
            shared = sorted(set(splits[first].ids) & set(splits[second].ids))
            if shared:
                problems.add(f"pairing: {len(shared)} id(s) appear in both split {first!r} and split {second!r}, "
                             f"e.g. {shared[:_SHOWN_INDICES]}")
    problems.raise_if_any("features splits")
