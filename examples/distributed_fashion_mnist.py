"""Trains a CDL model on Fashion-MNIST under a tf.distribute strategy.

    # One process, no distribution:
    python examples/distributed_fashion_mnist.py --strategy=default
    # One process, two replicas on two logical CPUs (or the GPUs):
    python examples/distributed_fashion_mnist.py --strategy=mirrored \
        --cpu_devices=2
    # Two worker processes; run once per worker with its own TF_CONFIG:
    TF_CONFIG='{"cluster": {"worker": ["localhost:12345", "localhost:12346"]},
                "task": {"type": "worker", "index": 0}}' \
        python examples/distributed_fashion_mnist.py --strategy=multiworker

The float model and its CDL copy (`keras_cdl.quantize_model`) are created
inside `strategy.scope()`; `--batch_size` is the global batch, split over the
replicas.  Only the chief shows progress and results (`verbose=0` elsewhere).
With `--backup_dir`, `tf.keras.callbacks.BackupAndRestore` lets a restarted
run resume from its last epoch.  The run ends by printing
`keras_cdl.communication_cost` for one per-replica batch: the bytes a step
would send across devices, range coded vs float32.
"""

import time

from absl import app
from absl import flags
import tensorflow as tf

import keras_cdl
from keras_cdl import architectures
from keras_cdl import datasets
from keras_cdl import distribute

FLAGS = flags.FLAGS
flags.DEFINE_enum("strategy", "default", ["default", "mirrored", "multiworker"],
                  "default: no distribution; mirrored: one replica per GPU or "
                  "logical CPU; multiworker: MultiWorkerMirroredStrategy from "
                  "TF_CONFIG.")
flags.DEFINE_integer("cpu_devices", 0,
                     "mirrored without GPUs: split the CPU into this many "
                     "logical devices (0: leave as is).")
flags.DEFINE_enum("arch", "lenet5", ["lenet5", "convnet"],
                  "lenet5: LeNet5-Caffe; convnet: the dataset authors' convnet.")
flags.DEFINE_enum("mode", "rcdl", ["cdl", "rcdl"], "CDL training mode.")
flags.DEFINE_integer("float_epochs", 1, "Float (pre-)training epochs.")
flags.DEFINE_integer("epochs", 2, "CDL training epochs.")
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_float("learning_rate", 1e-3, "Adam learning rate.")
flags.DEFINE_integer("weight_bits", 4, "Bits of the weight indices (2-8).")
flags.DEFINE_integer("activation_bits", 4, "Bits of the ReLU outputs (2-8).")
flags.DEFINE_float("lmbda", 0.02, "Loss units per bit per weight.")
flags.DEFINE_float("gamma", 0.002, "Loss units per bit per activation.")
flags.DEFINE_float("kappa", 2.0, "Hardness alpha*q^2.")
flags.DEFINE_integer("train_examples", 0,
                     "Use only this many training images (0: all 60000).")
flags.DEFINE_integer("test_examples", 0,
                     "Use only this many test images (0: all 10000).")
flags.DEFINE_string("backup_dir", "",
                    "BackupAndRestore directory (empty: no backups).")
flags.DEFINE_integer("seed", 0, "Random seed (the same on every worker).")


def main(argv):
  del argv
  # The strategy first: logical CPU devices must be configured before
  # TensorFlow initialises its devices (importing it does not).
  strategy = distribute.make_strategy(FLAGS.strategy,
                                      cpu_devices=FLAGS.cpu_devices or None)

  tf.get_logger().setLevel("WARNING")  # Quiet tf.distribute's INFO lines.
  chief = distribute.is_chief(strategy)
  verbose = 1 if chief else 0  # A progress bar on the chief only.
  say = print if chief else (lambda *a, **k: None)
  replicas = strategy.num_replicas_in_sync
  say(f"strategy: {type(strategy).__name__}, {replicas} replica(s), global "
      f"batch {FLAGS.batch_size} ({FLAGS.batch_size // replicas} per replica)")

  tf.keras.utils.set_random_seed(FLAGS.seed)
  (x_train, y_train), (x_test, y_test) = datasets.load_fashion_mnist()
  if FLAGS.train_examples:
    x_train, y_train = (x_train[:FLAGS.train_examples],
                        y_train[:FLAGS.train_examples])
  if FLAGS.test_examples:
    x_test, y_test = x_test[:FLAGS.test_examples], y_test[:FLAGS.test_examples]

  options = tf.data.Options()
  # Every worker reads the same arrays and keeps its share of each batch.
  options.experimental_distribute.auto_shard_policy = (
      tf.data.experimental.AutoShardPolicy.DATA)

  def dataset(x, y, shuffle):
    data = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
      data = data.shuffle(len(x), seed=FLAGS.seed)
    return data.batch(FLAGS.batch_size).with_options(options)

  train, test = dataset(x_train, y_train, True), dataset(x_test, y_test, False)

  def compile_model(model):
    model.compile(
        optimizer=tf.keras.optimizers.Adam(FLAGS.learning_rate),
        loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"])
    # Keras 2.14's default ("auto") sums the workers' step logs: progress
    # bars would show metrics times the number of workers.  Metric results
    # are already synchronised: take the first.
    model.distribute_reduction_method = "first"

  started = time.time()
  with strategy.scope():
    float_model = architectures.ARCHITECTURES[FLAGS.arch]()
    compile_model(float_model)
  if FLAGS.float_epochs:
    say(f"float training, {FLAGS.float_epochs} epoch(s)")
    float_model.fit(train, epochs=FLAGS.float_epochs, verbose=verbose)
  with strategy.scope():
    # Same calibration batch on every worker, so the step sizes agree.
    model = keras_cdl.quantize_model(
        float_model, mode=FLAGS.mode, weight_bits=FLAGS.weight_bits,
        activation_bits=FLAGS.activation_bits, lmbda=FLAGS.lmbda,
        gamma=FLAGS.gamma, kappa=FLAGS.kappa, calibration_data=x_train[:512])
    compile_model(model)
  callbacks = []
  if FLAGS.backup_dir:
    callbacks.append(tf.keras.callbacks.BackupAndRestore(FLAGS.backup_dir))
  say(f"CDL ({FLAGS.mode}) training, {FLAGS.epochs} epoch(s)")
  history = model.fit(train, epochs=FLAGS.epochs, callbacks=callbacks,
                      verbose=verbose)
  loss, accuracy = model.evaluate(test, verbose=0)[:2]
  say(f"test accuracy {accuracy:.4f} (loss {loss:.4f}); last epoch: "
      f"{history.history['bits_per_weight'][-1]:.3f} bits/weight, "
      f"{history.history['bits_per_activation'][-1]:.3f} bits/activation; "
      f"{time.time() - started:.0f} s")

  batch = x_test[:max(1, FLAGS.batch_size // replicas)]
  cost = keras_cdl.communication_cost(model, batch)
  say(f"\nCommunication per training step (one per-replica batch of "
      f"{len(batch)}):")
  say(cost.table())
  weights_x = cost.weight_float32_bytes / cost.weight_coded_bytes
  activations_x = (cost.activation_float32_bytes /
                   max(cost.activation_coded_bytes, 1))
  say(f"weights: {cost.weight_coded_bytes:,} coded vs "
      f"{cost.weight_float32_bytes:,} float32 bytes (x{weights_x:.1f}); "
      f"activations: {cost.activation_coded_bytes:,} vs "
      f"{cost.activation_float32_bytes:,} (x{activations_x:.1f})")


if __name__ == "__main__":
  app.run(main)
