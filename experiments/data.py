"""Image-classification data sets as in-memory numpy arrays.

This is the one place where the experiments read data sets from disk. Every loader
returns images as ``uint8`` arrays in NHWC layout ``(N, H, W, C)`` and labels as
``int32`` arrays of shape ``(N,)``, and validates what it read: a missing,
truncated or inconsistent file raises an error naming the file, never returns
silently wrong data.

Two on-disk sources are supported:

* ``"local"``: the original gzipped (or uncompressed) IDX files of MNIST and
  Fashion-MNIST, in ``<root>/mnist/`` and ``<root>/fashion-mnist/``. The root is
  the ``data_dir`` argument, else the ``CBP_JAX_DATA_DIR`` environment variable,
  else ``../shared/data`` relative to the current directory.
* ``"tfds"``: a data set prepared by ``tensorflow-datasets`` in the
  ``array_record`` file format, in ``<data_dir>/<name>/<version>/`` (e.g.
  ``<data_dir>/imagenet_resized/32x32/0.1.0/``). It is read through
  ``tensorflow_datasets``' random-access data source, which needs neither
  TensorFlow nor a network connection (decoding the stored PNG images needs
  Pillow). Preparing such a data set does need TensorFlow and internet access;
  do it elsewhere with
  ``tfds build NAME --file_format=array_record --data_dir=DIR`` and copy
  ``DIR/NAME`` over.
"""

from __future__ import annotations

import gzip
import math
import os
import re
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

__all__ = ["DATA_DIR_ENV", "DATASETS", "Dataset", "load_dataset", "shared_data_dir"]

# Environment variable naming the root folder of local data sets.
DATA_DIR_ENV = "CBP_JAX_DATA_DIR"
# Fallback root, relative to the current directory: where this project's
# checkouts find the shared offline copies of MNIST and Fashion-MNIST.
_DEFAULT_LOCAL_ROOT = Path("..") / "shared" / "data"
# Number of tfds records decoded per batched read.
_TFDS_CHUNK = 4096


class _Spec(NamedTuple):
  """What is known in advance about a supported data set."""

  tfds_name: str  # name (and config) under a tfds data_dir
  local_folder: str | None  # sub-folder of the local root holding IDX files
  num_classes: int
  image_shape: tuple[int, int, int]  # (H, W, C)


# Canonical name -> spec. The expected shape and class count let the loaders
# reject a folder that holds some other data set.
DATASETS: dict[str, _Spec] = {
  "mnist": _Spec("mnist", "mnist", 10, (28, 28, 1)),
  "fashion_mnist": _Spec("fashion_mnist", "fashion-mnist", 10, (28, 28, 1)),
  "cifar100": _Spec("cifar100", None, 100, (32, 32, 3)),
  "imagenet_resized/32x32": _Spec("imagenet_resized/32x32", None, 1000, (32, 32, 3)),
}
_ALIASES = {"fashion-mnist": "fashion_mnist"}

# The standard IDX file names, by split: (images, labels), without ".gz".
_IDX_FILES = {
  "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
  "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# IDX type code 0x08 is unsigned byte, the only one MNIST-style files use.
_IDX_UBYTE = 0x08


class Dataset(NamedTuple):
  """An image-classification data set held in memory.

  Attributes:
    images: ``uint8`` array of shape ``(N, H, W, C)``.
    labels: ``int32`` array of shape ``(N,)`` with values in
      ``[0, num_classes)``.
    num_classes: number of classes.
    name: canonical data set name, e.g. ``"fashion_mnist"``.
  """

  images: np.ndarray
  labels: np.ndarray
  num_classes: int
  name: str


def shared_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
  """Returns the root folder of the local (IDX) data sets.

  Args:
    data_dir: explicit root folder; wins over everything else.

  Returns:
    ``data_dir`` if given, else ``$CBP_JAX_DATA_DIR`` if set and non-empty, else
    ``../shared/data`` resolved against the current directory. The folder is
    not checked for existence: the loaders report a missing folder together
    with the files they expected in it.
  """
  if data_dir is not None:
    return Path(data_dir).expanduser().resolve()
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return Path(env).expanduser().resolve()
  return _DEFAULT_LOCAL_ROOT.resolve()


def load_dataset(
  name: str,
  split: str = "train",
  *,
  source: str = "auto",
  data_dir: str | os.PathLike | None = None,
) -> Dataset:
  """Loads a whole split of an image-classification data set into memory.

  Args:
    name: one of ``"mnist"``, ``"fashion_mnist"`` (alias ``"fashion-mnist"``),
      ``"cifar100"``, ``"imagenet_resized/32x32"``.
    split: ``"train"`` or ``"test"`` for local files; for tfds any split string
      tfds accepts, e.g. ``"validation"`` or ``"train[:10%]"``.
    source: ``"local"`` (IDX files), ``"tfds"`` (array_record data prepared by
      tensorflow-datasets) or ``"auto"``: local when the local folder of that
      data set holds IDX files, tfds otherwise.
    data_dir: root folder. For local data it holds ``mnist/`` and
      ``fashion-mnist/`` (default: see `shared_data_dir`); for tfds it is the
      tfds ``data_dir`` (default: ``$CBP_JAX_DATA_DIR`` if set, else tfds' own
      default, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Returns:
    A `Dataset` with ``uint8`` NHWC images and ``int32`` labels.

  Raises:
    ValueError: unknown name, source or split, or data that fails validation
      (bad header, wrong length, mismatched counts, labels out of range, wrong
      image shape).
    FileNotFoundError: the folder or a file is missing; the message names the
      folder and the expected files, or how to prepare the tfds data set.
  """
  canonical = _ALIASES.get(name, name)
  if canonical not in DATASETS:
    raise ValueError(f"Unknown data set {name!r}; expected one of {sorted(DATASETS)}.")
  spec = DATASETS[canonical]
  if source == "local":
    return _load_local(canonical, spec, split, data_dir)
  if source == "tfds":
    return _load_tfds(canonical, spec, split, data_dir)
  if source != "auto":
    raise ValueError(f"Unknown source {source!r}; expected 'auto', 'local' or 'tfds'.")
  if spec.local_folder is not None and _has_idx_files(shared_data_dir(data_dir) / spec.local_folder):
    return _load_local(canonical, spec, split, data_dir)
  try:
    return _load_tfds(canonical, spec, split, data_dir)
  except FileNotFoundError as e:
    if spec.local_folder is None:
      raise
    # Both places were tried; say so, or the user only learns about tfds.
    local = shared_data_dir(data_dir) / spec.local_folder
    names = _expected_idx_names(split) if split in _IDX_FILES else []
    raise FileNotFoundError(
      f"{e}\nNo local IDX files for {canonical!r} either: looked in folder "
      f"{local} for {names or 'the standard IDX files'}."
    ) from e


# ----------------------------------------------------------------------------
# Local IDX files.


def _expected_idx_names(split: str) -> list[str]:
  """The accepted file names of one split, gzipped names first."""
  return [f + ext for f in _IDX_FILES[split] for ext in (".gz", "")]


def _has_idx_files(folder: Path) -> bool:
  """Whether ``folder`` holds any standard IDX file of any split."""
  return any((folder / n).is_file() for s in _IDX_FILES for n in _expected_idx_names(s))


def _load_local(name: str, spec: _Spec, split: str, data_dir: str | os.PathLike | None) -> Dataset:
  """Reads one split of MNIST / Fashion-MNIST from its IDX files."""
  if spec.local_folder is None:
    raise ValueError(
      f"{name!r} has no local file format; use source='tfds' with a prepared tensorflow-datasets data_dir."
    )
  if split not in _IDX_FILES:
    raise ValueError(f"Unknown split {split!r} for local {name!r}; expected one of {sorted(_IDX_FILES)}.")
  folder = shared_data_dir(data_dir) / spec.local_folder
  expected = _expected_idx_names(split)
  if not folder.is_dir():
    raise FileNotFoundError(
      f"Data folder {folder} for {name!r} does not exist; it should contain "
      f"{expected} (pass data_dir=, or set ${DATA_DIR_ENV} to the folder "
      f"holding '{spec.local_folder}/')."
    )
  image_path, label_path = (_find_idx_file(folder, base, expected) for base in _IDX_FILES[split])
  images = _read_idx(image_path, ndim=3)
  labels = _read_idx(label_path, ndim=1)
  if images.shape[1:] != spec.image_shape[:2]:
    raise ValueError(
      f"{image_path}: images are {images.shape[1]}x{images.shape[2]}, "
      f"expected {spec.image_shape[0]}x{spec.image_shape[1]} for {name!r}."
    )
  if len(images) != len(labels):
    raise ValueError(f"{image_path} holds {len(images)} images but {label_path} holds {len(labels)} labels.")
  if labels.size and labels.max() >= spec.num_classes:
    raise ValueError(f"{label_path}: label {labels.max()} out of range [0, {spec.num_classes}).")
  return Dataset(
    images=images[..., None],
    labels=labels.astype(np.int32),
    num_classes=spec.num_classes,
    name=name,
  )


def _find_idx_file(folder: Path, base: str, expected: list[str]) -> Path:
  """Returns ``folder/base.gz`` or ``folder/base``, whichever exists."""
  for candidate in (folder / f"{base}.gz", folder / base):
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
    f"Neither {base}.gz nor {base} found in data folder {folder}; it should contain {expected}."
  )


def _read_idx(path: Path, ndim: int) -> np.ndarray:
  """Parses an unsigned-byte IDX file (optionally gzipped) into an array.

  Args:
    path: the file; a ``.gz`` suffix means gzip-compressed.
    ndim: the number of dimensions the file must declare.

  Returns:
    A writable ``uint8`` array with the dimensions from the header.

  Raises:
    ValueError: unreadable gzip stream, bad magic number, or a data length
      that does not match the header.
  """
  try:
    if path.suffix == ".gz":
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (OSError, EOFError, zlib.error) as e:
    # gzip.BadGzipFile is an OSError; a truncated stream raises EOFError.
    raise ValueError(f"{path}: cannot read or decompress ({e}).") from e
  header_len = 4 + 4 * ndim
  if len(raw) < header_len:
    raise ValueError(f"{path}: only {len(raw)} bytes, shorter than the {header_len}-byte IDX header.")
  # Magic number: two zero bytes, the element type code, the number of dims.
  if raw[0] != 0 or raw[1] != 0 or raw[2] != _IDX_UBYTE or raw[3] != ndim:
    raise ValueError(
      f"{path}: bad IDX magic number 0x{raw[:4].hex()}, expected "
      f"0x0000{_IDX_UBYTE:02x}{ndim:02x} (unsigned bytes, {ndim} dims)."
    )
  dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
  expected = header_len + math.prod(dims)
  if len(raw) != expected:
    raise ValueError(
      f"{path}: {len(raw)} bytes, but the header declares dims {dims}, i.e. "
      f"{expected} bytes; the file is truncated or corrupt."
    )
  # Copy so the caller gets a writable array that does not pin `raw`.
  return np.frombuffer(raw, np.uint8, offset=header_len).reshape(dims).copy()


# ----------------------------------------------------------------------------
# tensorflow-datasets (array_record).

_VERSION_RE = re.compile(r"^(\d+)\.(\d+)\.(\d+)$")


def _load_tfds(name: str, spec: _Spec, split: str, data_dir: str | os.PathLike | None) -> Dataset:
  """Reads one split of a tfds-prepared array_record data set."""
  # Imported here: importing tensorflow_datasets is slow, and the local path
  # must work without it.
  try:
    import tensorflow_datasets as tfds
  except ImportError as e:
    raise ImportError(
      f"Loading {name!r} from tfds needs tensorflow-datasets and array_record"
      " (pip install 'cbp_jax[data]'); TensorFlow itself is not needed."
    ) from e

  if data_dir is None:
    data_dir = os.environ.get(DATA_DIR_ENV) or tfds.core.constants.DATA_DIR
  root = Path(data_dir).expanduser().resolve()
  builder_dir = _tfds_builder_dir(root, spec.tfds_name)
  # Build from the prepared directory, not from the registered builder code:
  # it never reaches for the network (no GCS metadata lookup), takes the
  # features and version from the files on disk, and reads a data set the
  # tests generate with their own builder exactly as a real one.
  builder = tfds.builder_from_directory(builder_dir)
  features = builder.info.features
  missing = {"image", "label"} - set(features.keys())
  if missing:
    raise ValueError(
      f"{builder_dir}: data set has features {sorted(features.keys())}, missing {sorted(missing)}."
    )
  num_classes = features["label"].num_classes
  if num_classes != spec.num_classes:
    raise ValueError(
      f"{builder_dir}: label has {num_classes} classes, expected {spec.num_classes} for {name!r}."
    )
  try:
    source = builder.as_data_source(split=split)
  except NotImplementedError as e:
    raise ValueError(
      f"{builder_dir} was prepared as {builder.info.file_format.value}, "
      "which has no random access; rebuild it with "
      f"`tfds build {spec.tfds_name} --file_format=array_record "
      f"--data_dir={root}`."
    ) from e
  images, labels = _read_records(source, spec.image_shape, builder_dir)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"{builder_dir}: labels in [{labels.min()}, {labels.max()}], outside [0, {num_classes})."
    )
  return Dataset(images=images, labels=labels, num_classes=num_classes, name=name)


def _tfds_builder_dir(root: Path, tfds_name: str) -> Path:
  """Returns the newest prepared version folder of ``tfds_name`` in ``root``.

  Args:
    root: the tfds data_dir.
    tfds_name: e.g. ``"cifar100"`` or ``"imagenet_resized/32x32"``.

  Returns:
    ``root/tfds_name/<version>`` holding a ``dataset_info.json``.

  Raises:
    FileNotFoundError: no prepared version; the message names the data_dir and
      how to prepare the data set.
  """
  base = root / tfds_name
  versions = []
  if base.is_dir():
    for child in base.iterdir():
      # Skips tfds' "incomplete.*" folders left by an interrupted build.
      match = _VERSION_RE.match(child.name)
      if match and (child / "dataset_info.json").is_file():
        versions.append((tuple(map(int, match.groups())), child))
  if not versions:
    raise FileNotFoundError(
      f"No prepared tensorflow-datasets data set {tfds_name!r} in data_dir "
      f"{root} (looked for {base}/<version>/dataset_info.json). Prepare it "
      "on a machine with internet access and TensorFlow: `tfds build "
      f"{tfds_name} --file_format=array_record --data_dir={root}`, or build "
      f"it elsewhere and copy the '{tfds_name}' folder into {root}."
    )
  return max(versions)[1]


def _read_records(
  source, image_shape: tuple[int, int, int], builder_dir: Path
) -> tuple[np.ndarray, np.ndarray]:
  """Decodes every record of a tfds data source into preallocated arrays.

  Args:
    source: a tfds random-access data source of dicts with "image", "label".
    image_shape: the (H, W, C) every image must have.
    builder_dir: the data set folder, for error messages.

  Returns:
    ``(images, labels)``: ``uint8`` (N, H, W, C) and ``int32`` (N,).
  """
  n = len(source)
  images = np.empty((n, *image_shape), np.uint8)
  labels = np.empty((n,), np.int32)
  for start in range(0, n, _TFDS_CHUNK):
    keys = list(range(start, min(start + _TFDS_CHUNK, n)))
    # Batched reads let array_record fetch many records per call.
    for i, example in zip(keys, source.__getitems__(keys)):
      image = np.asarray(example["image"])
      # A grayscale PNG decodes to (H, W) unless the decoder restores the
      # channel axis (tfds 4.9.10 with Pillow does, other decoders may not).
      if image.ndim == 2:
        image = image[..., None]
      if image.shape != image_shape or image.dtype != np.uint8:
        raise ValueError(
          f"{builder_dir}: record {i} has a {image.dtype} image of shape "
          f"{image.shape}, expected uint8 {image_shape}."
        )
      images[i] = image
      labels[i] = example["label"]
  return images, labels
