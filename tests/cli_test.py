"""Tests of the `keras-cdl` command (keras_cdl/cli.py).

Most tests call `cli.main(argv)` directly; two run `python -m keras_cdl.cli`
as a subprocess (in parallel: each pays TensorFlow's import).
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import cli
from keras_cdl import datasets


def run(argv):
  """(exit status, stdout, stderr) of `cli.main(argv)`."""
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    try:
      status = cli.main(argv)
    except SystemExit as e:  # argparse
      status = e.code
  return status, out.getvalue(), err.getvalue()


class CliTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    tf.keras.backend.clear_session()
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        layers.InputLayer((8, 8, 1)), layers.Conv2D(4, 3, activation="relu"),
        layers.Flatten(), layers.Dense(3)])
    cls.x = np.random.default_rng(0).uniform(0, 1, (16, 8, 8, 1)).astype(
        np.float32)
    cls.model = keras_cdl.quantize_model(model, weight_bits=4,
                                         activation_bits=4,
                                         calibration_data=cls.x)
    cls.tmp = tempfile.mkdtemp()
    cls.path = os.path.join(cls.tmp, "model.cdl")
    keras_cdl.compress(cls.model, cls.path)
    with open(cls.path, "rb") as f:
      data = f.read()
    cls.truncated = os.path.join(cls.tmp, "truncated.cdl")
    with open(cls.truncated, "wb") as f:
      f.write(data[:-10])

  def test_inspect(self):
    status, out, err = run(["inspect", self.path])
    self.assertEqual((status, err), (0, ""))
    self.assertIn("CDLModel", out)
    for name in ("quant_conv2d/kernel", "quant_dense/kernel",
                 "quant_dense/bias", "(quantizer state:", "coded payload",
                 "payload + tables + headers", "whole file", "float32:",
                 "int8 (+ float32 rest)", "gzip -9"):
      self.assertIn(name, out)
    self.assertNotIn("kernel_log_step", out)
    self.assertIn(f"whole file: {os.path.getsize(self.path):,d} B", out)
    status, out, _ = run(["inspect", "--all", self.path])
    self.assertEqual(status, 0)
    self.assertIn("quant_dense/kernel_log_step", out)

  def test_inspect_json(self):
    status, out, _ = run(["inspect", "--json", self.path])
    self.assertEqual(status, 0)
    report = json.loads(out)
    self.assertEqual(report["model_class"], "CDLModel")
    self.assertEqual(report["totals"]["file_bytes"],
                     os.path.getsize(self.path))
    rows = {r["name"]: r for r in report["tensors"]}
    kernel = rows["quant_dense/kernel"]
    self.assertEqual((kernel["role"], kernel["bits"], kernel["shape"]),
                     ("quantized", 4, [144, 3]))
    self.assertLessEqual(kernel["payload_bytes"],
                         kernel["entropy_bytes"] * 1.005 + 32)

  def test_malformed_and_missing_files(self):
    status, out, err = run(["inspect", self.truncated])
    self.assertEqual((status, out), (1, ""))
    self.assertIn("keras-cdl: error:", err)
    self.assertIn("malformed .cdl file: truncated", err)
    self.assertNotIn("Traceback", err)
    status, _, err = run(["inspect", os.path.join(self.tmp, "nope.cdl")])
    self.assertEqual(status, 1)
    self.assertIn("No such file or directory", err)
    status, _, err = run(["export", self.truncated, "--saved-model",
                          os.path.join(self.tmp, "never")])
    self.assertEqual(status, 1)
    self.assertIn("malformed .cdl file", err)

  def test_bad_arguments(self):
    self.assertEqual(run([])[0], 2)
    self.assertEqual(run(["frobnicate"])[0], 2)
    self.assertEqual(run(["inspect"])[0], 2)
    status, _, err = run(["export", self.path])
    self.assertEqual(status, 2)
    self.assertIn("give --tflite OUT and/or --saved-model DIR", err)
    status, _, err = run(["export", self.path, "--tflite", "x.tflite",
                          "--representative", "imagenet"])
    self.assertEqual(status, 2)
    self.assertIn("--representative must be one of ('fashion_mnist',) or a "
                  "path ending in .npy", err)
    status, _, err = run(["export", self.path, "--tflite", "x.tflite",
                          "--representative-samples", "0"])
    self.assertEqual(status, 2)

  def test_representative_data(self):
    wrong = os.path.join(self.tmp, "wrong.npy")
    np.save(wrong, np.zeros((4, 28, 28, 1), np.float32))
    with self.assertRaisesRegex(cli.UsageError, "do not fit the model's "
                                r"input shape \(8, 8, 1\)"):
      cli.load_representative(wrong, (8, 8, 1), 10)
    good = os.path.join(self.tmp, "good.npy")
    np.save(good, self.x)
    data = cli.load_representative(good, (8, 8, 1), 10)
    self.assertEqual((data.shape, data.dtype), ((10, 8, 8, 1), np.float32))
    try:
      datasets.load_fashion_mnist()
    except FileNotFoundError:
      self.skipTest("Fashion-MNIST is not installed")
    data = cli.load_representative("fashion_mnist", (28, 28, 1), 7)
    self.assertEqual(data.shape, (7, 28, 28, 1))
    with self.assertRaisesRegex(cli.UsageError, "input shape"):
      cli.load_representative("fashion_mnist", (8, 8, 1), 7)

  def test_export(self):
    try:
      from keras_cdl import export  # pylint: disable=g-import-not-at-top,unused-import
    except ImportError:
      self.skipTest("keras_cdl.export is not available")
    calib = os.path.join(self.tmp, "calib.npy")
    np.save(calib, self.x)
    tflite = os.path.join(self.tmp, "model.tflite")
    saved = os.path.join(self.tmp, "saved_model")
    status, out, err = run(["export", self.path, "--tflite", tflite,
                            "--saved-model", saved, "--representative",
                            calib])
    self.assertEqual(status, 0, err)
    self.assertGreater(os.path.getsize(tflite), 0)
    self.assertTrue(os.path.exists(os.path.join(saved, "saved_model.pb")))
    self.assertIn(f"TFLite: {tflite}", out)
    self.assertIn(f"SavedModel: {saved}", out)

  def test_subprocess(self):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    command = [sys.executable, "-m", "keras_cdl.cli", "inspect"]
    good = subprocess.Popen(command + [self.path], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    bad = subprocess.Popen(command + [self.truncated], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True, env=env)
    out, err = good.communicate(timeout=300)
    self.assertEqual(good.returncode, 0, err)
    self.assertIn("quant_dense/kernel", out)
    self.assertIn("whole file", out)
    out, err = bad.communicate(timeout=300)
    self.assertEqual(bad.returncode, 1)
    self.assertIn("keras-cdl: error:", err)
    self.assertIn("truncated", err)
    self.assertNotIn("Traceback", err)


if __name__ == "__main__":
  tf.test.main()
