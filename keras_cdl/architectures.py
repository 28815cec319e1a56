"""The Fashion-MNIST reference architectures used by the examples and benchmarks."""

import tensorflow as tf

__all__ = ["lenet5_caffe", "reference_convnet", "ARCHITECTURES"]


def lenet5_caffe(input_shape=(28, 28, 1), num_classes=10):
  """LeNet5-Caffe: conv 20@5x5, pool, conv 50@5x5, pool, dense 500, dense 10."""
  layers = tf.keras.layers
  return tf.keras.Sequential([
      layers.InputLayer(input_shape),
      layers.Conv2D(20, 5, activation="relu"),
      layers.MaxPooling2D(2),
      layers.Conv2D(50, 5, activation="relu"),
      layers.MaxPooling2D(2),
      layers.Flatten(),
      layers.Dense(500, activation="relu"),
      layers.Dense(num_classes),
  ], name="lenet5_caffe")


def reference_convnet(input_shape=(28, 28, 1), num_classes=10):
  """The Fashion-MNIST authors' convnet (3.27M weights).

  conv 32@5x5 same, pool, conv 64@5x5 same, pool, dense 1024, dropout 0.4,
  dense 10.
  """
  layers = tf.keras.layers
  return tf.keras.Sequential([
      layers.InputLayer(input_shape),
      layers.Conv2D(32, 5, padding="same", activation="relu"),
      layers.MaxPooling2D(2),
      layers.Conv2D(64, 5, padding="same", activation="relu"),
      layers.MaxPooling2D(2),
      layers.Flatten(),
      layers.Dense(1024, activation="relu"),
      layers.Dropout(0.4),
      layers.Dense(num_classes),
  ], name="reference_convnet")


ARCHITECTURES = {"lenet5": lenet5_caffe, "convnet": reference_convnet}
