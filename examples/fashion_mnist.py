"""Trains a CDL model on Fashion-MNIST and reports accuracy and coded size.

    python examples/fashion_mnist.py --arch=lenet5 --mode=rcdl

Modes: `float` (the reference), `cdl` (sampled forward, soft backward) and
`rcdl` (relaxed: soft forward and backward).  In the CDL modes the float model
is first trained for `--float_epochs`, then quantized with
`keras_cdl.quantize_model` and trained for `--epochs` with the rate terms.
"""

import json
import os
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import architectures
from keras_cdl import callbacks
from keras_cdl import datasets
from keras_cdl import export as export_lib
from keras_cdl import summary as summary_lib

FLAGS = flags.FLAGS
flags.DEFINE_enum("arch", "lenet5", list(architectures.ARCHITECTURES),
                  "lenet5: LeNet5-Caffe; convnet: the dataset authors' convnet.")
flags.DEFINE_enum("mode", "rcdl", ["float", "cdl", "rcdl"], "Training mode.")
flags.DEFINE_integer("float_epochs", 2, "Float (pre-)training epochs.")
flags.DEFINE_integer("epochs", 4, "CDL training epochs after quantization.")
flags.DEFINE_integer("batch_size", 128, "Batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("weight_bits", 4, "Bits of the weight indices (2-8).")
flags.DEFINE_integer("activation_bits", 4, "Bits of the ReLU outputs (2-8).")
# quantize_model's defaults, from benchmarks/frontier.py (BENCHMARKS.md):
# LeNet5 R-CDL, 3 float + 5 CDL epochs: lmbda 0.3, gamma 0.005 -> 90.16%
# (float 90.37%) at 0.75 bits/weight; lmbda 1, gamma 0.05 -> 88.60% at 0.23.
flags.DEFINE_float("lmbda", 0.3, "Loss units per bit per weight.")
flags.DEFINE_float("gamma", 0.005, "Loss units per bit per activation.")
flags.DEFINE_enum("hardness", "alpha", ["alpha", "kappa"],
                  "alpha: trainable hardness (quantize_model's default); "
                  "kappa: fixed, annealed from --kappa to --final_kappa.")
flags.DEFINE_float("kappa", 2.0, "Initial hardness alpha*q^2.")
flags.DEFINE_float("final_kappa", 32.0,
                   "With --hardness=kappa: the hardness at the end of CDL "
                   "training (annealed geometrically per epoch); equal to "
                   "--kappa to keep it fixed.")
flags.DEFINE_integer("window", 2, "CPMF levels evaluated per element.")
flags.DEFINE_integer("train_examples", 0,
                     "Use only this many training images (0: all 60000).")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_string("output_dir", "/tmp/keras_cdl_fashion_mnist",
                    "Where the trained model and results.json are written.")


def _compile(model):
  model.compile(
      optimizer=tf.keras.optimizers.Adam(FLAGS.learning_rate),
      loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      metrics=["accuracy"])


def main(argv):
  del argv
  tf.keras.utils.set_random_seed(FLAGS.seed)
  (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
  if FLAGS.train_examples:
    x_train = x_train[:FLAGS.train_examples]
    y_train = y_train[:FLAGS.train_examples]
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  model = architectures.ARCHITECTURES[FLAGS.arch]()
  _compile(model)
  started = time.time()
  if FLAGS.float_epochs:
    model.fit(x_train, y_train, batch_size=FLAGS.batch_size,
              epochs=FLAGS.float_epochs, verbose=2)
  float_loss, float_accuracy = model.evaluate(x_test, y_test, verbose=0)
  results = {"arch": FLAGS.arch, "mode": FLAGS.mode,
             "float_test_accuracy": float_accuracy}
  print(f"float test accuracy: {float_accuracy:.4f} (loss {float_loss:.4f})")
  if FLAGS.mode != "float":
    qmodel = keras_cdl.quantize_model(
        model, mode=FLAGS.mode, weight_bits=FLAGS.weight_bits,
        activation_bits=FLAGS.activation_bits, lmbda=FLAGS.lmbda,
        gamma=FLAGS.gamma, hardness=FLAGS.hardness, kappa=FLAGS.kappa,
        window=FLAGS.window, calibration_data=x_train[:512])
    _compile(qmodel)
    schedule = []
    if FLAGS.hardness == "kappa":
      schedule = [callbacks.KappaSchedule.geometric(
          FLAGS.kappa, FLAGS.final_kappa, FLAGS.epochs)]
    history = qmodel.fit(x_train, y_train, batch_size=FLAGS.batch_size,
                         epochs=FLAGS.epochs, verbose=2, callbacks=schedule)
    # Training is done: put each bias on the int32 grid the TFLite model will
    # store it on, so that this model, the .cdl file and the .tflite file
    # compute one function (see export.snap_biases).
    moves = export_lib.snap_biases(qmodel)
    print("biases moved onto the TFLite int32 grid by at most "
          f"{max(moves.values(), default=0.0):.3f} of a grid step")
    loss, accuracy = qmodel.evaluate(x_test, y_test, verbose=0)
    rep = summary_lib.summary(qmodel)
    results.update({
        "test_accuracy": accuracy,
        "test_loss": loss,
        "bits_per_weight": rep.bits_per_weight,
        "estimated_coded_bytes": rep.estimated_bytes,
        "float32_bytes": rep.float32_bytes,
        "compression_ratio": rep.float32_bytes / rep.estimated_bytes,
        "train_bits_per_weight": history.history["bits_per_weight"][-1],
        "train_bits_per_activation":
            history.history["bits_per_activation"][-1],
    })
    print(f"CDL ({FLAGS.mode}) test accuracy: {accuracy:.4f}; "
          f"{rep.bits_per_weight:.3f} bits/weight; estimated coded size "
          f"{rep.estimated_bytes / 1024:.1f} KiB vs float32 "
          f"{rep.float32_bytes / 1024:.1f} KiB "
          f"(x{results['compression_ratio']:.1f})")
    model = qmodel
    # Storage: the .cdl file (range-coded indices, keras_cdl.compress) and the
    # int8 TFLite model made from the decompressed model.
    cdl_path = os.path.join(FLAGS.output_dir, "model.cdl")
    tflite_path = os.path.join(FLAGS.output_dir, "model.tflite")
    keras_cdl.compress(qmodel, cdl_path)
    sizes = keras_cdl.print_size_report(keras_cdl.size_report(cdl_path))
    restored = keras_cdl.decompress(cdl_path)
    exact = np.array_equal(
        qmodel.predict(x_test, batch_size=1000, verbose=0),
        restored.predict(x_test, batch_size=1000, verbose=0))
    export_lib.to_tflite(restored, tflite_path, x_train[:256])
    tflite_bytes = os.path.getsize(tflite_path)
    cdl_top1 = np.argmax(
        qmodel.predict(x_test, batch_size=1000, verbose=0), -1)
    tflite_top1 = np.argmax(export_lib.run_tflite(tflite_path, x_test), -1)
    tflite_accuracy = float(np.mean(tflite_top1 == y_test))
    agreement = float(np.mean(tflite_top1 == cdl_top1))
    builtin_top1 = np.argmax(export_lib.run_tflite(
        tflite_path, x_test, kernels="builtin"), -1)
    builtin_agreement = float(np.mean(builtin_top1 == cdl_top1))
    results.update({
        "cdl_file_bytes": sizes.file_bytes,
        "cdl_coded_payload_bytes": sizes.coded_payload_bytes,
        "cdl_records_bytes": sizes.records_bytes,
        "int8_bytes": sizes.int8_bytes,
        "gzip_int8_bytes": sizes.gzip_int8_bytes,
        "tflite_int8_bytes": tflite_bytes,
        "tflite_test_accuracy": tflite_accuracy,
        "tflite_top1_agreement": agreement,
        "tflite_top1_agreement_builtin_kernels": builtin_agreement,
        "decompressed_outputs_equal": exact,
    })
    print(f"stored: {cdl_path} {sizes.file_bytes:,d} B "
          f"(coded payload {sizes.coded_payload_bytes:,d} B); "
          f"{tflite_path} (int8) {tflite_bytes:,d} B; float32 "
          f"{sizes.float32_bytes:,d} B: the .cdl file is "
          f"x{sizes.float32_bytes / sizes.file_bytes:.1f} smaller than "
          f"float32 and x{tflite_bytes / sizes.file_bytes:.1f} smaller than "
          f"the int8 TFLite; decompressed outputs bitwise equal: {exact}")
    print(f"TFLite int8 test accuracy: {tflite_accuracy:.4f}; top-1 "
          f"agreement with keras_cdl inference on {len(x_test)} test "
          f"images: {agreement:.4f} (default kernels; TFLite's builtin "
          f"kernels without XNNPACK: {builtin_agreement:.4f})")
  results["seconds"] = time.time() - started
  with keras_cdl.quantize_scope():
    model.save(os.path.join(FLAGS.output_dir, "model"))
  with open(os.path.join(FLAGS.output_dir, "results.json"), "w") as f:
    json.dump(results, f, indent=1, default=float)
  logging.info("results: %s", results)


if __name__ == "__main__":
  app.run(main)
