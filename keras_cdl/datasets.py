"""Fashion-MNIST from local files: Debian's package or Keras' cache.

No download is attempted.  The four IDX files are looked up in, in order:
`$KERAS_CDL_FASHION_MNIST` (if set), `/usr/share/datasets/fashion-mnist`
(Debian: `apt-get install dataset-fashion-mnist`) and
`~/.keras/datasets/fashion-mnist` (where `tf.keras.datasets.fashion_mnist.
load_data()` caches them).
"""

import gzip
import os
import struct
import zlib

import numpy as np

__all__ = ["load_fashion_mnist", "fashion_mnist_dirs", "FILES"]

FILES = {
    "x_train": "train-images-idx3-ubyte.gz",
    "y_train": "train-labels-idx1-ubyte.gz",
    "x_test": "t10k-images-idx3-ubyte.gz",
    "y_test": "t10k-labels-idx1-ubyte.gz",
}
_IDX_TYPES = {0x08: np.uint8}


def fashion_mnist_dirs():
  """The directories searched, in order."""
  dirs = []
  if os.environ.get("KERAS_CDL_FASHION_MNIST"):
    dirs.append(os.environ["KERAS_CDL_FASHION_MNIST"])
  dirs.append("/usr/share/datasets/fashion-mnist")
  keras_home = os.environ.get("KERAS_HOME",
                              os.path.join(os.path.expanduser("~"), ".keras"))
  dirs.append(os.path.join(keras_home, "datasets", "fashion-mnist"))
  return dirs


def _read_idx(path):
  """Reads one gzipped IDX file, checking its header against its size."""
  try:
    with gzip.open(path, "rb") as f:
      data = f.read()
  except (gzip.BadGzipFile, EOFError, zlib.error) as e:
    raise ValueError(f"{path}: not a complete gzip file ({e}).") from e
  if len(data) < 4:
    raise ValueError(f"{path}: not an IDX file (only {len(data)} bytes).")
  zero, dtype_code, rank = struct.unpack(">HBB", data[:4])
  if zero != 0 or dtype_code not in _IDX_TYPES:
    raise ValueError(f"{path}: not an IDX file of unsigned bytes "
                     f"(magic {data[:4].hex()}).")
  if len(data) < 4 + 4 * rank:
    raise ValueError(f"{path}: IDX header of rank {rank} needs "
                     f"{4 + 4 * rank} bytes but the file has {len(data)}.")
  shape = struct.unpack(f">{rank}I", data[4:4 + 4 * rank])
  body = data[4 + 4 * rank:]
  if len(body) != int(np.prod(shape)):
    raise ValueError(f"{path}: header says shape {shape} "
                     f"({int(np.prod(shape))} bytes) but has {len(body)}.")
  return np.frombuffer(body, dtype=np.uint8).reshape(shape)


def load_fashion_mnist(normalize=True):
  """Returns `(x_train, y_train), (x_test, y_test)` like Keras' loader.

  Args:
    normalize: scale images to float32 in [0, 1] with a channel axis
      (`[N, 28, 28, 1]`); otherwise uint8 `[N, 28, 28]` as Keras returns.

  Raises:
    FileNotFoundError: naming every directory searched when none has the
      four files.
  """
  for directory in fashion_mnist_dirs():
    paths = {k: os.path.join(directory, f) for k, f in FILES.items()}
    if all(os.path.exists(p) for p in paths.values()):
      arrays = {k: _read_idx(p) for k, p in paths.items()}
      break
  else:
    raise FileNotFoundError(
        "Fashion-MNIST not found. Searched: " +
        ", ".join(fashion_mnist_dirs()) + ". Install Debian's package "
        "(apt-get install dataset-fashion-mnist, files in "
        "/usr/share/datasets/fashion-mnist) or let "
        "tf.keras.datasets.fashion_mnist.load_data() fill Keras' cache "
        "(~/.keras/datasets/fashion-mnist).")
  x_train, x_test = arrays["x_train"], arrays["x_test"]
  if normalize:
    x_train = (x_train.astype(np.float32) / 255.0)[..., None]
    x_test = (x_test.astype(np.float32) / 255.0)[..., None]
  return ((x_train, arrays["y_train"].astype(np.int64)),
          (x_test, arrays["y_test"].astype(np.int64)))
