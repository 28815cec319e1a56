"""Tests of keras_cdl.datasets: Fashion-MNIST from local IDX files.

The real files are read from /usr/share/datasets/fashion-mnist (Debian's
dataset-fashion-mnist package); the search order and error paths are checked
with tiny IDX files written here, following the IDX format: a big-endian
header (two zero bytes, type code 0x08 for unsigned bytes, the rank, one
uint32 per dimension) and then the bytes, gzipped.
"""

import gzip
import os
import struct
import tempfile
from unittest import mock

import numpy as np
import tensorflow as tf

from keras_cdl import datasets

DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
ENV = "KERAS_CDL_FASHION_MNIST"


def write_idx(path, array, header_shape=None):
  """Writes a gzipped IDX file of uint8 `array` (header may lie about shape)."""
  array = np.asarray(array, np.uint8)
  shape = array.shape if header_shape is None else header_shape
  header = struct.pack(">HBB", 0, 0x08, len(shape))
  header += struct.pack(f">{len(shape)}I", *shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.tobytes())


def write_fake_dataset(directory, n_train=5, n_test=3, seed=0):
  """Writes the four files; returns the arrays written."""
  rng = np.random.RandomState(seed)
  arrays = {
      "x_train": rng.randint(0, 256, (n_train, 28, 28)).astype(np.uint8),
      "y_train": rng.randint(0, 10, n_train).astype(np.uint8),
      "x_test": rng.randint(0, 256, (n_test, 28, 28)).astype(np.uint8),
      "y_test": rng.randint(0, 10, n_test).astype(np.uint8),
  }
  os.makedirs(directory, exist_ok=True)
  for key, filename in datasets.FILES.items():
    write_idx(os.path.join(directory, filename), arrays[key])
  return arrays


def without_debian_dir():
  """Makes the Debian directory look empty to the loader."""
  real_exists = os.path.exists

  def exists(path):
    if str(path).startswith(DEBIAN_DIR):
      return False
    return real_exists(path)

  return mock.patch.object(datasets.os.path, "exists", exists)


class RealDatasetTest(tf.test.TestCase):

  def test_shapes_dtypes_and_values(self):
    self.assertTrue(os.path.isdir(DEBIAN_DIR), "dataset-fashion-mnist "
                    "is expected in " + DEBIAN_DIR)
    with mock.patch.dict(os.environ):
      os.environ.pop(ENV, None)
      (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
      (r_train, _), (r_test, _) = datasets.load_fashion_mnist(
          normalize=False)
    self.assertEqual(x_train.shape, (60000, 28, 28, 1))
    self.assertEqual(x_test.shape, (10000, 28, 28, 1))
    self.assertEqual(x_train.dtype, np.float32)
    self.assertEqual(y_train.shape, (60000,))
    self.assertEqual(y_test.shape, (10000,))
    self.assertEqual(y_train.dtype, np.int64)
    self.assertEqual(x_train.min(), 0.0)
    self.assertEqual(x_train.max(), 1.0)
    # Balanced classes 0..9: 6000 per class in train, 1000 in test.
    self.assertAllEqual(np.bincount(y_train), [6000] * 10)
    self.assertAllEqual(np.bincount(y_test), [1000] * 10)
    # normalize=False: Keras' uint8 layout, and the same images.
    self.assertEqual(r_train.shape, (60000, 28, 28))
    self.assertEqual(r_train.dtype, np.uint8)
    self.assertAllEqual(x_test[..., 0], r_test.astype(np.float32) / 255.0)

  def test_search_order(self):
    with mock.patch.dict(os.environ, {ENV: "/some/dir",
                                      "KERAS_HOME": "/keras/home"}):
      self.assertEqual(datasets.fashion_mnist_dirs(), [
          "/some/dir", DEBIAN_DIR, "/keras/home/datasets/fashion-mnist"])
    with mock.patch.dict(os.environ, {"HOME": "/home/u"}):
      os.environ.pop(ENV, None)
      os.environ.pop("KERAS_HOME", None)
      self.assertEqual(datasets.fashion_mnist_dirs(), [
          DEBIAN_DIR, "/home/u/.keras/datasets/fashion-mnist"])


class SyntheticFilesTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.tmp = self.enterContext(tempfile.TemporaryDirectory())

  def test_env_directory_comes_first(self):
    arrays = write_fake_dataset(self.tmp)
    with mock.patch.dict(os.environ, {ENV: self.tmp}):
      (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
      (r_train, _), _ = datasets.load_fashion_mnist(normalize=False)
    self.assertEqual(x_train.shape, (5, 28, 28, 1))
    self.assertEqual(x_test.shape, (3, 28, 28, 1))
    self.assertAllEqual(x_train[..., 0],
                        arrays["x_train"].astype(np.float32) / 255.0)
    self.assertAllEqual(y_train, arrays["y_train"])
    self.assertAllEqual(y_test, arrays["y_test"])
    self.assertEqual(y_train.dtype, np.int64)
    self.assertAllEqual(r_train, arrays["x_train"])

  def test_keras_cache_is_used_when_debian_dir_is_missing(self):
    keras_home = os.path.join(self.tmp, "keras")
    arrays = write_fake_dataset(
        os.path.join(keras_home, "datasets", "fashion-mnist"), n_train=2,
        n_test=4)
    with mock.patch.dict(os.environ, {"KERAS_HOME": keras_home}), (
        without_debian_dir()):
      os.environ.pop(ENV, None)
      (_, y_train), (x_test, _) = datasets.load_fashion_mnist()
    self.assertAllEqual(y_train, arrays["y_train"])
    self.assertEqual(x_test.shape, (4, 28, 28, 1))

  def test_not_found_names_every_place(self):
    empty = os.path.join(self.tmp, "empty")
    os.makedirs(empty)
    # Three of the four files only: not enough.
    partial = os.path.join(self.tmp, "home", ".keras", "datasets",
                           "fashion-mnist")
    write_fake_dataset(partial)
    os.remove(os.path.join(partial, datasets.FILES["y_test"]))
    with mock.patch.dict(os.environ, {
        ENV: empty, "HOME": os.path.join(self.tmp, "home")}), (
            without_debian_dir()):
      os.environ.pop("KERAS_HOME", None)
      with self.assertRaises(FileNotFoundError) as caught:
        datasets.load_fashion_mnist()
    message = str(caught.exception)
    self.assertIn(DEBIAN_DIR, message)
    self.assertIn("~/.keras/datasets", message)
    self.assertIn(empty, message)
    self.assertIn(partial, message)

  def test_wrong_size_is_value_error(self):
    write_fake_dataset(self.tmp)
    bad = os.path.join(self.tmp, datasets.FILES["x_test"])
    # The header says 3 images, the body holds 2.
    write_idx(bad, np.zeros((2, 28, 28)), header_shape=(3, 28, 28))
    with mock.patch.dict(os.environ, {ENV: self.tmp}):
      with self.assertRaisesRegex(ValueError, "t10k-images.*shape"):
        datasets.load_fashion_mnist()

  def test_bad_magic_and_truncated_files_are_value_errors(self):
    write_fake_dataset(self.tmp)
    path = os.path.join(self.tmp, datasets.FILES["y_train"])
    for content in (b"\x00\x00\x0d\x01" + b"\x00" * 8,  # float type code.
                    b"\x01\x00\x08\x01\x00\x00\x00\x01\x07",  # Non-zero.
                    b"\x00\x00"):  # Shorter than the magic number.
      with self.subTest(content=content):
        with gzip.open(path, "wb") as f:
          f.write(content)
        with mock.patch.dict(os.environ, {ENV: self.tmp}):
          with self.assertRaisesRegex(ValueError, "train-labels"):
            datasets.load_fashion_mnist()

  def test_truncated_header_and_broken_gzip_are_value_errors(self):
    write_fake_dataset(self.tmp)
    path = os.path.join(self.tmp, datasets.FILES["x_train"])
    with open(path, "rb") as f:
      valid_gzip = f.read()
    cases = {
        # Rank 3 needs 12 bytes of dimensions; 2 are there.
        "header": gzip.compress(b"\x00\x00\x08\x03\x00\x00"),
        "not_gzip": b"IDX but not gzipped",
        "truncated_gzip": valid_gzip[:len(valid_gzip) // 2],
    }
    for name, content in cases.items():
      with self.subTest(name):
        with open(path, "wb") as f:
          f.write(content)
        with mock.patch.dict(os.environ, {ENV: self.tmp}):
          with self.assertRaisesRegex(ValueError, "train-images"):
            datasets.load_fashion_mnist()


if __name__ == "__main__":
  tf.test.main()
