"""Shared pytest set-up: quiet TF logs, fresh Keras state per test."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # pylint: disable=g-import-not-at-top
import tensorflow as tf  # pylint: disable=g-import-not-at-top


@pytest.fixture(autouse=True)
def _clear_keras_session():
  tf.keras.backend.clear_session()
  yield
