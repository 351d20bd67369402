"""Tests of experiments.data (the data set loaders): real MNIST / Fashion-MNIST, IDX validation, tfds."""

from __future__ import annotations

import gzip
import socket
import tempfile
from pathlib import Path

import numpy as np
import pytest

from experiments import data

# The shared offline copies, located from this file so the tests do not depend
# on the current directory: <checkout>/tests/../../shared/data.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
IDX_NAMES = [
  "train-images-idx3-ubyte.gz",
  "train-labels-idx1-ubyte.gz",
  "t10k-images-idx3-ubyte.gz",
  "t10k-labels-idx1-ubyte.gz",
]


def _write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
  """Writes ``array`` as an IDX file, gzipped when ``path`` ends in .gz."""
  header = bytes([0, 0, type_code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
  payload = header + array.astype(np.uint8).tobytes()
  path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def _write_mnist_like(folder: Path, n: int = 6, seed: int = 0, gz: bool = True):
  """Writes a tiny valid train split; returns its (images, labels)."""
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
  labels = rng.integers(0, 10, (n,), dtype=np.uint8)
  folder.mkdir(parents=True, exist_ok=True)
  ext = ".gz" if gz else ""
  _write_idx(folder / f"train-images-idx3-ubyte{ext}", images)
  _write_idx(folder / f"train-labels-idx1-ubyte{ext}", labels)
  return images, labels


# ----------------------------------------------------------------------------
# Real data sets.

needs_shared_data = pytest.mark.skipif(
  not (SHARED_DATA / "mnist").is_dir() or not (SHARED_DATA / "fashion-mnist").is_dir(),
  reason=f"offline MNIST / Fashion-MNIST copies not found in {SHARED_DATA}",
)


@needs_shared_data
@pytest.mark.parametrize(
  "name, train_counts",
  [("mnist", MNIST_TRAIN_COUNTS), ("fashion-mnist", [6000] * 10)],
)
def test_real_mnist_and_fashion_mnist(name, train_counts):
  for split, n in (("train", 60000), ("test", 10000)):
    ds = data.load_dataset(name, split, source="local", data_dir=SHARED_DATA)
    assert ds.images.shape == (n, 28, 28, 1)
    assert ds.images.dtype == np.uint8
    assert ds.labels.shape == (n,)
    assert ds.labels.dtype == np.int32
    assert ds.num_classes == 10
    assert ds.name == name.replace("-", "_")
    # Real digits / clothes span the whole range, a zero-filled array would not.
    assert ds.images.min() == 0 and ds.images.max() == 255
    if split == "train":
      np.testing.assert_array_equal(np.bincount(ds.labels), train_counts)


@needs_shared_data
def test_auto_source_finds_shared_data_from_env(monkeypatch, tmp_path):
  monkeypatch.setenv(data.DATA_DIR_ENV, str(SHARED_DATA))
  monkeypatch.chdir(tmp_path)  # so the ../shared/data fallback cannot apply
  ds = data.load_dataset("mnist", "test")
  assert ds.images.shape == (10000, 28, 28, 1)


# ----------------------------------------------------------------------------
# Local IDX files: parsing and validation.


def test_shared_data_dir_precedence(monkeypatch, tmp_path):
  monkeypatch.chdir(tmp_path)
  monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
  assert data.shared_data_dir() == (tmp_path / ".." / "shared" / "data").resolve()
  monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
  assert data.shared_data_dir() == tmp_path / "env"
  assert data.shared_data_dir(tmp_path / "arg") == tmp_path / "arg"


@pytest.mark.parametrize("gz", [True, False])
def test_local_idx_roundtrip(tmp_path, gz):
  images, labels = _write_mnist_like(tmp_path / "mnist", gz=gz)
  ds = data.load_dataset("mnist", source="local", data_dir=tmp_path)
  np.testing.assert_array_equal(ds.images, images[..., None])
  np.testing.assert_array_equal(ds.labels, labels)
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32


def test_missing_folder_names_folder_and_files(tmp_path):
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset("fashion_mnist", source="local", data_dir=tmp_path)
  message = str(err.value)
  assert str(tmp_path / "fashion-mnist") in message
  assert "train-images-idx3-ubyte.gz" in message
  assert "train-labels-idx1-ubyte.gz" in message


def test_missing_file_names_folder_and_files(tmp_path):
  _write_mnist_like(tmp_path / "mnist")
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset("mnist", "test", source="local", data_dir=tmp_path)
  message = str(err.value)
  assert str(tmp_path / "mnist") in message
  assert "t10k-images-idx3-ubyte.gz" in message
  assert "t10k-labels-idx1-ubyte.gz" in message


def _truncate_gzip(path: Path) -> None:
  path.write_bytes(path.read_bytes()[:-40])


def _bad_magic(path: Path) -> None:
  _write_idx(path, np.zeros((6, 28, 28), np.uint8), type_code=0x0D)


def _not_gzip(path: Path) -> None:
  path.write_bytes(b"this is not a gzip stream" * 10)


def _missing_pixels(path: Path) -> None:
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw[:-100]))


def _extra_bytes(path: Path) -> None:
  raw = gzip.decompress(path.read_bytes())
  path.write_bytes(gzip.compress(raw + b"\0"))


def _wrong_image_size(path: Path) -> None:
  _write_idx(path, np.zeros((6, 32, 32), np.uint8))


def _too_few_labels(path: Path) -> None:
  _write_idx(path.with_name("train-labels-idx1-ubyte.gz"), np.zeros(5, np.uint8))


def _label_out_of_range(path: Path) -> None:
  _write_idx(path.with_name("train-labels-idx1-ubyte.gz"), np.full(6, 10, np.uint8))


@pytest.mark.parametrize(
  "corrupt, bad_file, what",
  [
    (_truncate_gzip, "train-images", "cannot read or decompress"),
    (_not_gzip, "train-images", "cannot read or decompress"),
    (_bad_magic, "train-images", "bad IDX magic"),
    (_missing_pixels, "train-images", "truncated"),
    (_extra_bytes, "train-images", "truncated or corrupt"),
    (_wrong_image_size, "train-images", "expected 28x28"),
    (_too_few_labels, "train-labels", "6 images but"),
    (_label_out_of_range, "train-labels", "out of range"),
  ],
)
def test_corrupt_idx_file_is_rejected(tmp_path, corrupt, bad_file, what):
  folder = tmp_path / "mnist"
  _write_mnist_like(folder)
  corrupt(folder / "train-images-idx3-ubyte.gz")
  with pytest.raises(ValueError, match=what) as err:
    data.load_dataset("mnist", source="local", data_dir=tmp_path)
  assert str(folder / bad_file) in str(err.value)


def test_unknown_name_source_split(tmp_path):
  with pytest.raises(ValueError, match="Unknown data set"):
    data.load_dataset("cifar10", data_dir=tmp_path)
  with pytest.raises(ValueError, match="Unknown source"):
    data.load_dataset("mnist", source="web", data_dir=tmp_path)
  _write_mnist_like(tmp_path / "mnist")
  with pytest.raises(ValueError, match="Unknown split"):
    data.load_dataset("mnist", "validation", source="local", data_dir=tmp_path)
  with pytest.raises(ValueError, match="no local file format"):
    data.load_dataset("cifar100", source="local", data_dir=tmp_path)


# ----------------------------------------------------------------------------
# tensorflow-datasets array_record data sets the tests generate themselves.


@pytest.fixture
def offline(monkeypatch, tmp_path):
  """Fails the test at once on any network access; keeps temp files local.

  tfds creates an (empty) temporary folder whenever it instantiates a builder
  whose data is not prepared yet; it goes under tmp_path instead of /tmp.
  """

  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)
  (tmp_path / "tmp").mkdir()
  monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))


def _prepare_tfds(data_dir, tfds_name, version, num_classes, splits, extra=False):
  """Writes a tfds array_record data set as `tfds build` lays it out.

  The builder is a `GeneratorBasedBuilder` under the real data set's name and
  version, so ``data_dir/tfds_name/version/`` looks like a real prepared data
  set. It is not registered, so it cannot shadow tfds' own builder of that
  name. Images are handed over as PIL images because tfds encodes those with
  Pillow, whereas numpy images would need TensorFlow.

  Args:
    data_dir: the tfds data_dir to write into.
    tfds_name: e.g. "cifar100" or "imagenet_resized/32x32" (name/config).
    version: the version folder to write.
    num_classes: number of classes of the "label" feature.
    splits: {split: (images (N, H, W, C) uint8, labels (N,))}.
    extra: add cifar100's other features ("id", "coarse_label"), which the
      loader must ignore.
  """
  tfds = pytest.importorskip("tensorflow_datasets")
  pil_image = pytest.importorskip("PIL.Image")
  builder_name, _, config_name = tfds_name.partition("/")
  image_shape = next(iter(splits.values()))[0].shape[1:]
  features = {
    "image": tfds.features.Image(shape=image_shape),
    "label": tfds.features.ClassLabel(num_classes=num_classes),
  }
  if extra:
    features["id"] = tfds.features.Text()
    features["coarse_label"] = tfds.features.ClassLabel(num_classes=20)

  class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    name = builder_name
    VERSION = tfds.core.Version(version)
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=config_name)] if config_name else []

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(features))

    def _split_generators(self, dl_manager):
      return {s: self._generate_examples(*arrays) for s, arrays in splits.items()}

    def _generate_examples(self, images, labels):
      for i, (image, label) in enumerate(zip(images, labels)):
        if image.shape[-1] == 1:  # PIL stores grayscale without a channel axis
          image = image[..., 0]
        example = {"image": pil_image.fromarray(image), "label": int(label)}
        if extra:
          example["id"] = f"train_{i:05d}"
          example["coarse_label"] = i % 20
        yield i, example

  builder = Builder(
    data_dir=str(data_dir),
    config=config_name or None,
    file_format="array_record",
  )
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))


def _random_split(n, shape, num_classes, seed):
  rng = np.random.default_rng(seed)
  return (
    rng.integers(0, 256, (n, *shape), dtype=np.uint8),
    rng.integers(0, num_classes, (n,), dtype=np.int32),
  )


def _assert_same_examples(ds, images, labels):
  """Exact equality up to order: tfds shuffles records when it writes them."""
  assert ds.images.dtype == np.uint8 and ds.labels.dtype == np.int32
  assert ds.images.shape == images.shape and ds.labels.shape == labels.shape

  def by_image(imgs, labs):
    order = sorted(range(len(imgs)), key=lambda i: imgs[i].tobytes())
    return imgs[order], labs[order]

  got_images, got_labels = by_image(ds.images, ds.labels)
  want_images, want_labels = by_image(images, labels)
  np.testing.assert_array_equal(got_images, want_images)
  np.testing.assert_array_equal(got_labels, want_labels)


def test_tfds_cifar100_roundtrip(tmp_path, offline):
  splits = {
    "train": _random_split(20, (32, 32, 3), 100, seed=1),
    "test": _random_split(8, (32, 32, 3), 100, seed=2),
  }
  _prepare_tfds(tmp_path, "cifar100", "3.0.2", 100, splits, extra=True)
  for split, (images, labels) in splits.items():
    ds = data.load_dataset("cifar100", split, source="tfds", data_dir=tmp_path)
    _assert_same_examples(ds, images, labels)
    assert ds.num_classes == 100 and ds.name == "cifar100"
  # cifar100 has no local format, so "auto" means tfds.
  ds = data.load_dataset("cifar100", "train[:5]", data_dir=tmp_path)
  assert ds.images.shape == (5, 32, 32, 3)


def test_tfds_imagenet_resized_config(tmp_path, offline):
  images, labels = _random_split(12, (32, 32, 3), 1000, seed=3)
  _prepare_tfds(
    tmp_path,
    "imagenet_resized/32x32",
    "0.1.0",
    1000,
    {"validation": (images, labels)},
  )
  ds = data.load_dataset("imagenet_resized/32x32", "validation", source="tfds", data_dir=tmp_path)
  _assert_same_examples(ds, images, labels)
  assert ds.num_classes == 1000


def test_tfds_grayscale_and_auto_fallback(tmp_path, offline):
  images, labels = _random_split(10, (28, 28, 1), 10, seed=4)
  _prepare_tfds(tmp_path, "mnist", "3.0.1", 10, {"test": (images, labels)})
  ds = data.load_dataset("mnist", "test", source="tfds", data_dir=tmp_path)
  _assert_same_examples(ds, images, labels)
  # tmp_path/mnist exists but holds tfds files, not IDX ones: auto uses tfds.
  ds = data.load_dataset("mnist", "test", source="auto", data_dir=tmp_path)
  _assert_same_examples(ds, images, labels)


def test_tfds_wrong_class_count_is_rejected(tmp_path, offline):
  _prepare_tfds(
    tmp_path,
    "cifar100",
    "3.0.2",
    10,
    {"train": _random_split(4, (32, 32, 3), 10, seed=5)},
  )
  with pytest.raises(ValueError, match="10 classes, expected 100"):
    data.load_dataset("cifar100", source="tfds", data_dir=tmp_path)


def test_tfds_missing_data_names_data_dir_and_build_command(tmp_path, offline):
  pytest.importorskip("tensorflow_datasets")
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset("imagenet_resized/32x32", source="tfds", data_dir=tmp_path / "tfds")
  message = str(err.value)
  assert str(tmp_path / "tfds") in message
  assert "tfds build imagenet_resized/32x32 --file_format=array_record" in message
  # With neither tfds data nor IDX files, "auto" names both places.
  with pytest.raises(FileNotFoundError) as err:
    data.load_dataset("fashion_mnist", data_dir=tmp_path)
  message = str(err.value)
  assert "tfds build fashion_mnist" in message
  assert str(tmp_path / "fashion-mnist") in message
  assert "train-images-idx3-ubyte.gz" in message


class _FakeSource:
  """A stand-in for a tfds data source, serving ready-made examples."""

  def __init__(self, examples):
    self.examples = examples

  def __len__(self):
    return len(self.examples)

  def __getitems__(self, keys):
    return [self.examples[k] for k in keys]


def test_read_records_grayscale_layouts_and_bad_shape(tmp_path):
  images, labels = _random_split(3, (28, 28, 1), 10, seed=6)
  # One image decoded as (H, W), the others as (H, W, 1).
  examples = [
    {"image": images[0, ..., 0], "label": labels[0]},
    {"image": images[1], "label": labels[1]},
    {"image": images[2], "label": labels[2]},
  ]
  got_images, got_labels = data._read_records(_FakeSource(examples), (28, 28, 1), tmp_path)
  np.testing.assert_array_equal(got_images, images)
  np.testing.assert_array_equal(got_labels, labels)
  examples[2] = {"image": np.zeros((32, 32, 3), np.uint8), "label": 0}
  with pytest.raises(ValueError, match="record 2 has a uint8 image of shape"):
    data._read_records(_FakeSource(examples), (28, 28, 1), tmp_path)
