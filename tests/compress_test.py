"""Tests of keras_cdl.compress: whole models in .cdl files.

Two small quantized models are built once per class; the fuzz test compresses
one of them once and mutates the bytes.  Crafted files (valid CRCs, wrong
content) are made with `seal`/`split`, written from docs/FORMAT.md.
"""

import copy
import gzip
import io
import json
import os
import struct
import tempfile
import zlib

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

import keras_cdl
from keras_cdl import coding
from keras_cdl import compress as compress_lib
from keras_cdl import introspect
from keras_cdl import summary as summary_lib
from keras_cdl.errors import FormatError

PREAMBLE = struct.Struct("<4sHHQII")


def split(data):
  """(json bytes, [record body bytes]) of a container, per docs/FORMAT.md.

  A deflated header (flag bit 0) is returned inflated, so `seal` (which
  writes plain JSON, flags 0) reproduces an equivalent file.
  """
  _, _, flags, _, count, json_len = PREAMBLE.unpack_from(data)
  pos = PREAMBLE.size
  json_bytes = data[pos:pos + json_len]
  if flags & 1:
    json_bytes = zlib.decompress(json_bytes)
  pos += json_len + 4
  bodies = []
  for _ in range(count):
    n, = struct.unpack_from("<Q", data, pos)
    bodies.append(bytes(data[pos + 8:pos + 8 + n]))
    pos += 8 + n + 4
  return bytes(json_bytes), bodies


def seal(json_bytes, bodies):
  """A container with valid lengths and CRCs around any content."""
  frames = []
  for body in bodies:
    framed = struct.pack("<Q", len(body)) + body
    frames.append(framed + struct.pack("<I", zlib.crc32(framed)))
  length = PREAMBLE.size + len(json_bytes) + 4 + sum(map(len, frames)) + 4
  head = PREAMBLE.pack(b"KCDL", 1, 0, length, len(bodies),
                       len(json_bytes)) + json_bytes
  out = head + struct.pack("<I", zlib.crc32(head)) + b"".join(frames)
  return out + struct.pack("<I", zlib.crc32(out))


def small_float_model(batch_norm=True):
  layers = tf.keras.layers
  body = [layers.InputLayer((8, 8, 1)),
          layers.Conv2D(6, 3, activation="relu")]
  if batch_norm:
    body.append(layers.BatchNormalization())
  body += [layers.MaxPooling2D(2), layers.Flatten(), layers.Dense(7)]
  return tf.keras.Sequential(body, name="small")


def perturb(model, seed):
  """Random values for every float variable, as training would leave them."""
  rng = np.random.default_rng(seed)
  for v in model.weights:
    if not v.dtype.is_floating or "rate_weight" in v.name or (
        v.name.startswith(("total", "count"))):
      continue
    shape = v.shape
    if "log_step" in v.name:
      value = v.numpy() + rng.normal(0, 0.3, shape)
    elif "moving_variance" in v.name:
      value = rng.uniform(0.5, 2.0, shape)
    elif "kappa" in v.name or "log_alpha" in v.name:
      continue
    else:
      value = v.numpy() * rng.uniform(0.5, 1.5, shape) + rng.normal(
          0, 0.01, shape)
    v.assign(value.astype(np.float32))


_MODELS = []


def make_models():
  """(inputs, {name: quantized model}), built once per test process."""
  if not _MODELS:
    _MODELS.append(_make_models())
  return _MODELS[0]


def _make_models():
  tf.keras.backend.clear_session()  # Fixed layer names.
  x = np.random.default_rng(0).uniform(0, 1, (32, 8, 8, 1)).astype(
      np.float32)
  a = keras_cdl.quantize_model(small_float_model(), weight_bits=4,
                               activation_bits=4, lmbda=0.01,
                               hardness="kappa", kappa=4.0,
                               calibration_data=x)
  perturb(a, 1)
  b = keras_cdl.quantize_model(small_float_model(), weight_bits=8,
                               activation_bits=None, hardness="alpha",
                               per_channel=True, rate="prior",
                               calibration_data=x)
  perturb(b, 2)
  return x, {"4bit": a, "8bit_per_channel_alpha_prior": b}


@tf.keras.utils.register_keras_serializable(package="compress_test")
class _SignFlip(tf.keras.layers.Layer):
  """A layer with Python control flow on a tensor: needs autograph in graphs."""

  def call(self, x):
    if tf.reduce_sum(x) > 0:
      return -x
    return x


class RoundTripTest(tf.test.TestCase, parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x, cls.models = make_models()
    cls.tmp = tempfile.mkdtemp()

  def path(self, name):
    return os.path.join(self.tmp, name)

  @parameterized.parameters("4bit", "8bit_per_channel_alpha_prior")
  def test_decompressed_outputs_are_bitwise_equal(self, key):
    model = self.models[key]
    path = self.path(f"{key}.cdl")
    written = keras_cdl.compress(model, path)
    self.assertEqual(written, os.path.getsize(path))
    restored = keras_cdl.decompress(path)
    self.assertIsInstance(restored, keras_cdl.CDLModel)
    expected = model(self.x, training=False).numpy()
    actual = restored(self.x, training=False).numpy()
    self.assertEqual(expected.tobytes(), actual.tobytes())
    # Same indices, same steps, same floats.
    for old, new in zip(introspect.quantized_tensors(model),
                        introspect.quantized_tensors(restored)):
      self.assertEqual(old.name, new.name)
      np.testing.assert_array_equal(old.step, new.step)
      if old.weight is not None:
        np.testing.assert_array_equal(old.indices(), new.indices())
        # The kernel comes back as i * q.
        step = old.step.reshape([1] * (old.weight.shape.rank - 1) + [-1]) if (
            old.quantizer.per_channel) else old.step
        np.testing.assert_array_equal(
            new.weight.numpy(),
            (old.indices().astype(np.float32) * step).astype(np.float32))
    slots_old = compress_lib._model_slots(model)  # pylint: disable=protected-access
    slots_new = compress_lib._model_slots(restored)  # pylint: disable=protected-access
    self.assertEqual([s.name for s in slots_old], [s.name for s in slots_new])
    for old, new in zip(slots_old, slots_new):
      if old.role != "quantized":
        self.assertEqual(old.variable.numpy().tobytes(),
                         new.variable.numpy().tobytes(), old.name)

  @parameterized.parameters("4bit", "8bit_per_channel_alpha_prior")
  def test_compressing_the_restored_model_gives_the_same_bytes(self, key):
    data = compress_lib.encode_model(self.models[key])[0]
    again = compress_lib.encode_model(keras_cdl.decompress(data))[0]
    self.assertEqual(data, again)

  def test_early_decode_budget(self):
    """Tensors decoded during the rebuild, after it, or a mix: same model."""
    model = self.models["4bit"]
    data = compress_lib.encode_model(model)[0]
    expected = model(self.x, training=False).numpy().tobytes()
    default = compress_lib._EARLY_DECODE_ELEMENTS  # pylint: disable=protected-access
    try:
      for budget in (0, 100, default):
        compress_lib._EARLY_DECODE_ELEMENTS = budget  # pylint: disable=protected-access
        restored = keras_cdl.decompress(data)
        self.assertEqual(restored(self.x, training=False).numpy().tobytes(),
                         expected, budget)
    finally:
      compress_lib._EARLY_DECODE_ELEMENTS = default  # pylint: disable=protected-access

  def test_variables_created_as_zeros_are_all_restored(self):
    """decompress skips the initializers of variables it overwrites; with
    the threshold at 2 elements every non-scalar variable starts at zeros
    (the test models' are all below the default), and the outputs are
    still bitwise the original's."""
    default = compress_lib._ZERO_INIT_ELEMENTS  # pylint: disable=protected-access
    try:
      compress_lib._ZERO_INIT_ELEMENTS = 2  # pylint: disable=protected-access
      for key, model in self.models.items():
        restored = keras_cdl.decompress(compress_lib.encode_model(model)[0])
        self.assertEqual(restored(self.x, training=False).numpy().tobytes(),
                         model(self.x, training=False).numpy().tobytes(), key)
    finally:
      compress_lib._ZERO_INIT_ELEMENTS = default  # pylint: disable=protected-access

  def test_decompress_into_a_rebuilt_model(self):
    # What benchmarks/coding.py times as decompress without the rebuild.
    model = self.models["4bit"]
    data = compress_lib.encode_model(model)[0]
    rebuilt = compress_lib._build_model(  # pylint: disable=protected-access
        coding.decode_container(data)[0]["model"])
    self.assertIs(compress_lib._decompress(data, rebuilt), rebuilt)  # pylint: disable=protected-access
    self.assertEqual(rebuilt(self.x, training=False).numpy().tobytes(),
                     model(self.x, training=False).numpy().tobytes())

  def test_decompress_into_a_model(self):
    model = self.models["4bit"]
    data = compress_lib.encode_model(model)[0]
    target = keras_cdl.decompress(data)
    for variable in target.weights:
      variable.assign(tf.zeros_like(variable))
    self.assertIs(keras_cdl.decompress(data, model=target), target)
    self.assertEqual(target(self.x, training=False).numpy().tobytes(),
                     model(self.x, training=False).numpy().tobytes())

  def test_decompress_into_another_architecture(self):
    data = compress_lib.encode_model(self.models["4bit"])[0]
    other = keras_cdl.decompress(data)
    # Same variables, another activation: the config check catches it.
    config = other.get_config()
    for layer in config["layers"]:
      inner = layer["config"].get("layer", {}).get("config", {})
      if inner.get("activation") == "relu":
        inner["activation"] = "elu"
        break
    else:
      self.fail("no ReLU layer to change")
    with keras_cdl.quantize_scope():
      changed = type(other).from_config(config)
    before = [w.numpy() for w in changed.weights]
    with self.assertRaisesRegex(ValueError, "`model` must have the "
                                "architecture stored in the file"):
      keras_cdl.decompress(data, model=changed)
    for value, variable in zip(before, changed.weights):
      self.assertAllEqual(value, variable.numpy())
    with self.assertRaisesRegex(ValueError, "`model` must be a "
                                "tf.keras.Model or None, but got str"):
      keras_cdl.decompress(data, model="model.h5")

  def test_file_objects(self):
    buffer = io.BytesIO()
    keras_cdl.compress(self.models["4bit"], buffer)
    restored = keras_cdl.decompress(io.BytesIO(buffer.getvalue()))
    self.assertEqual(self.models["4bit"](self.x, training=False).numpy(
    ).tobytes(), restored(self.x, training=False).numpy().tobytes())

  def test_roles_names_and_header(self):
    data, header, records, indices = compress_lib.encode_model(
        self.models["4bit"])
    self.assertEqual(header["content"], "keras_cdl.model")
    self.assertEqual(header["model_format"], 1)
    self.assertEqual(header["model"]["class_name"], "CDLModel")
    self.assertNotIn("build_config", json.dumps(header))
    roles = {e["name"]: e["role"] for e in header["variables"]}
    self.assertEqual(roles["quant_conv2d/kernel"], "quantized")
    self.assertEqual(roles["quant_dense/kernel"], "quantized")
    self.assertEqual(roles["quant_conv2d/bias"], "float")
    self.assertEqual(roles["batch_normalization/moving_mean"], "float")
    self.assertEqual(roles["quant_conv2d/kernel_log_step"], "quantizer")
    self.assertEqual(roles["quant_conv2d/output_kappa"], "quantizer")
    self.assertEqual(roles["quantize_layer/quantize_layer_log_step"],
                     "quantizer")
    self.assertEqual(roles["quant_dense/optimizer_step"], "integer")
    self.assertEqual([r.name for r in records],
                     [e["name"] for e in header["variables"]
                      if e["role"] != "integer"])
    self.assertEqual(sorted(indices), ["quant_conv2d/kernel",
                                       "quant_dense/kernel"])
    self.assertEqual(coding.decode_container(data),
                     (json.loads(json.dumps(header)), records))
    kernel = records[[r.name for r in records].index("quant_dense/kernel")]
    self.assertEqual((kernel.kind, kernel.bits, kernel.signed), ("quantized",
                                                                 4, True))

  def test_plain_float_model_and_sequential(self):
    model = small_float_model()
    restored = keras_cdl.decompress(compress_lib.encode_model(model)[0])
    self.assertIsInstance(restored, tf.keras.Sequential)
    self.assertEqual(model(self.x).numpy().tobytes(),
                     restored(self.x).numpy().tobytes())

  def test_layer_that_needs_autograph(self):
    inputs = tf.keras.Input((3,))
    outputs = _SignFlip()(tf.keras.layers.Dense(2)(inputs))
    model = tf.keras.Model(inputs, outputs)
    x = np.array([[1, 2, 3], [-4, 5, -6]], np.float32)
    restored = keras_cdl.decompress(compress_lib.encode_model(model)[0])
    self.assertEqual(model(x).numpy().tobytes(),
                     restored(x).numpy().tobytes())

  def test_subclassed_model_is_rejected(self):

    class Net(tf.keras.Model):

      def __init__(self):
        super().__init__()
        self.dense = tf.keras.layers.Dense(2)

      def call(self, x):
        return self.dense(x)

    net = Net()
    net(np.zeros((1, 3), np.float32))
    with self.assertRaisesRegex(ValueError, "subclassed model Net"):
      keras_cdl.compress(net, self.path("net.cdl"))
    with self.assertRaisesRegex(ValueError, "must be a tf.keras.Model"):
      keras_cdl.compress("model", self.path("net.cdl"))


class SizeTest(tf.test.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x, models = make_models()
    cls.model = models["4bit"]
    cls.path = os.path.join(tempfile.mkdtemp(), "model.cdl")
    keras_cdl.compress(cls.model, cls.path)
    cls.report = keras_cdl.size_report(cls.path)

  def test_whole_file_is_the_file_size(self):
    self.assertEqual(self.report.file_bytes, os.path.getsize(self.path))
    self.assertEqual(self.report.container_bytes + self.report.records_bytes,
                     self.report.file_bytes)
    self.assertEqual(self.report.container_bytes,
                     32 + self.report.json_bytes)

  def test_payload_within_entropy_bound(self):
    rows = [t for t in self.report.tensors if t.role == "quantized"]
    self.assertLen(rows, 2)
    for row, tensor in zip(rows, [t for t in introspect.quantized_tensors(
        self.model) if t.kind == "weight"]):
      entropy = coding.empirical_entropy(tensor.indices())
      self.assertEqual(row.entropy, entropy)
      self.assertLessEqual(row.payload_bytes,
                           row.count * entropy * 1.005 / 8 + 32, row.name)

  def test_three_sizes_and_baselines(self):
    rep = self.report
    self.assertLess(rep.coded_payload_bytes, rep.records_bytes)
    self.assertLess(rep.records_bytes, rep.file_bytes)
    self.assertEqual(rep.records_bytes,
                     rep.coded_payload_bytes + rep.float_payload_bytes +
                     rep.table_bytes + rep.record_header_bytes)
    # The baselines count the model's parameters as summary.report does.
    summary = summary_lib.report(self.model)
    self.assertEqual(rep.float32_bytes, summary.float32_bytes)
    self.assertEqual(rep.quantized_parameters, summary.quantized_parameters)
    self.assertEqual(rep.int8_bytes,
                     rep.quantized_parameters + 4 * rep.float_parameters)
    indices = b"".join(t.indices().astype(np.int8).tobytes()
                       for t in introspect.quantized_tensors(self.model)
                       if t.kind == "weight")
    self.assertEqual(rep.gzip_indices_bytes,
                     len(gzip.compress(indices, compresslevel=9, mtime=0)))
    self.assertEqual(rep.gzip_int8_bytes,
                     rep.gzip_indices_bytes + 4 * rep.float_parameters)
    self.assertLess(rep.coded_payload_bytes, rep.gzip_indices_bytes)

  def test_model_and_file_give_the_same_report(self):
    self.assertEqual(keras_cdl.size_report(self.model), self.report)
    with open(self.path, "rb") as f:
      self.assertEqual(keras_cdl.size_report(f.read()), self.report)

  def test_printer(self):
    lines = []
    keras_cdl.print_size_report(self.report, print_fn=lines.append)
    text = "\n".join(lines)
    self.assertIn("quant_dense/kernel", text)
    self.assertNotIn("quant_dense/kernel_log_step", text)
    self.assertIn("(quantizer state:", text)
    self.assertIn(f"whole file: {self.report.file_bytes:,d} B", text)
    self.assertIn("coded payload", text)
    self.assertIn("gzip -9", text)
    everything = compress_lib.format_size_report(self.report, all_tensors=True)
    self.assertIn("quant_dense/kernel_log_step", everything)


class CorruptionTest(tf.test.TestCase, parameterized.TestCase):
  """Malformed files raise FormatError naming what is wrong."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x, models = make_models()
    cls.model = models["4bit"]
    (cls.data, cls.header, cls.records,
     cls.indices) = compress_lib.encode_model(cls.model)
    cls.original = compress_lib.read_model_file(cls.data)

  def record_index(self, name):
    return [r.name for r in self.records].index(name)

  def check(self, data, message, rebuild=True):
    """Both decompress and (unless the architecture is needed) the
    Keras-free reader raise FormatError matching `message`."""
    if not rebuild:
      with self.assertRaisesRegex(FormatError, message):
        compress_lib.read_model_file(data)
    with self.assertRaisesRegex(FormatError, message):
      keras_cdl.decompress(data)

  def container(self, header=None, records=None):
    return coding.encode_container(
        self.header if header is None else header,
        self.records if records is None else records)

  def test_truncated_flipped_magic_version(self):
    self.check(self.data[:-1], "truncated", rebuild=False)
    self.check(self.data[:3], "truncated", rebuild=False)
    flipped = bytearray(self.data)
    flipped[len(flipped) // 2] ^= 0x10
    self.check(bytes(flipped), "CRC32 mismatch", rebuild=False)
    self.check(b"PK\x03\x04" + self.data[4:], "not a .cdl file: magic",
               rebuild=False)
    bumped = bytearray(self.data)
    struct.pack_into("<H", bumped, 4, 2)
    self.check(bytes(bumped), "unsupported format version 2", rebuild=False)

  def test_table_that_does_not_sum(self):
    json_bytes, bodies = split(self.data)
    k = self.record_index("quant_dense/kernel")
    record = self.records[k]
    body = bytearray(bodies[k])
    payload = len(record.payload)
    # The table's last varint ends right before the payload length.
    end = len(body) - payload - 8 - 1
    start = end
    while body[start - 1] & 0x80:
      start -= 1
    assert body[start] & 0x7F >= 1
    body[start] -= 1
    bodies[k] = bytes(body)
    p = record.table.precision
    self.check(seal(json_bytes, bodies),
               f"quant_dense/kernel.*frequencies sum to {2**p - 1}",
               rebuild=False)

  def test_header_that_is_not_a_model(self):
    header = dict(self.header, content="something.else")
    self.check(self.container(header), "content: expected 'keras_cdl.model'",
               rebuild=False)
    header = dict(self.header, model_format=2)
    self.check(self.container(header), "unsupported model_format 2",
               rebuild=False)
    header = dict(self.header, model={"class_name": "Evil", "config": {}})
    self.check(self.container(header), "class_name: expected one of",
               rebuild=False)
    header = {k: v for k, v in self.header.items() if k != "variables"}
    self.check(self.container(header), "variables: expected a list",
               rebuild=False)
    # JSON that does not parse, with valid CRCs.
    json_bytes, bodies = split(self.data)
    self.check(seal(json_bytes[:-1], bodies), "header: JSON", rebuild=False)

  def test_variable_list_errors(self):
    variables = self.header["variables"]

    def with_entry(i, drop=(), **changes):
      entries = copy.deepcopy(variables)
      entries[i].update(changes)
      for key in drop:
        del entries[i][key]
      return self.container(dict(self.header, variables=entries))

    k = [e["name"] for e in variables].index("quant_dense/kernel")
    self.check(with_entry(k, shape=[54, 8]),
               r"shape: the header says \(54, 8\), the record \(54, 7\)",
               rebuild=False)
    self.check(with_entry(k, role="float", drop=["log_step"]),
               "kind: variable 'quant_dense/kernel' has role 'float'",
               rebuild=False)
    self.check(with_entry(k, role="float"), r"unknown keys \['log_step'\]",
               rebuild=False)
    self.check(with_entry(k, role="banana"), "role: expected one of",
               rebuild=False)
    self.check(with_entry(k, log_step="quant_dense/bias"),
               "log_step: 'quant_dense/bias' is not a quantizer variable",
               rebuild=False)
    self.check(with_entry(k, name="other"), "expected the record of variable "
               "'other'", rebuild=False)
    i = [e["name"] for e in variables].index("quant_dense/optimizer_step")
    self.check(with_entry(i, value=["x"]), "value: expected a list of 1 "
               "integers", rebuild=False)
    self.check(with_entry(i, value=[2**40]), "outside the range of int32",
               rebuild=False)
    self.check(with_entry(i, extra=1), "unknown keys", rebuild=False)
    # One record fewer than the header lists.
    self.check(self.container(records=self.records[:-1]),
               "the header lists .* stored variables", rebuild=False)

  def test_architecture_must_match_the_tensors(self):
    # Drop a variable from both the list and the records: only rebuilding
    # the architecture shows that it is missing.
    name = "batch_normalization/beta"
    header = dict(self.header, variables=[
        e for e in self.header["variables"] if e["name"] != name])
    records = [r for r in self.records if r.name != name]
    data = self.container(header, records)
    compress_lib.read_model_file(data)  # Consistent by itself.
    self.check(data, "architecture and tensors differ")
    # A Dense layer with more units than its stored kernel.
    header = copy.deepcopy(self.header)
    for layer in header["model"]["config"]["layers"]:
      if layer["class_name"] == "QuantizeWrapperV2" and (
          layer["config"]["layer"]["class_name"] == "Dense"):
        layer["config"]["layer"]["config"]["units"] = 8
    self.check(self.container(header),
               r"quant_dense/kernel.*shape: the architecture says \(54, 8\)")
    # A quantizer with other bits than the stored indices.
    header = copy.deepcopy(self.header)
    text = json.dumps(header["model"]).replace('"bits": 4', '"bits": 5')
    header["model"] = json.loads(text)
    self.check(self.container(header), r"\(bits, signed, channel_axis\) = "
               r"\(4, True, None\), but the architecture's quantizer has "
               r"\(5, True, None\)")

  def test_config_keras_cannot_rebuild(self):
    header = copy.deepcopy(self.header)
    layer = header["model"]["config"]["layers"][2]
    layer.update(class_name="NoSuchLayer", registered_name="NoSuchLayer",
                 module="keras.layers")
    self.check(self.container(header), "Keras cannot rebuild the "
               "architecture")
    header = copy.deepcopy(self.header)
    header["model"]["config"]["layers"] = "nope"
    self.check(self.container(header), "config: expected a Keras model "
               "config", rebuild=False)

  def test_lambda_layers_are_refused(self):
    header = copy.deepcopy(self.header)
    header["model"]["config"]["layers"].append(
        {"class_name": "Lambda", "config": {"function": "print"}})
    self.check(self.container(header), "Lambda layers are not supported")

  def test_steps_must_match_log_step(self):
    k = self.record_index("quant_dense/kernel")
    records = list(self.records)
    records[k] = coding.quantized_record(
        records[k].name, self.indices["quant_dense/kernel"], bits=4,
        signed=True, step=float(records[k].step) * 1.5)
    self.check(self.container(records=records), "not exp\\(log_step\\)",
               rebuild=False)

  def _with_huge_step(self, indices):
    """The container with quant_dense/kernel holding `indices` at a step so
    large that `2 * step` overflows float32 (and its log_step to match)."""
    name = "quant_dense/kernel"
    k = self.record_index(name)
    j = self.record_index(name + "_log_step")
    records = list(self.records)
    log_step = np.full(records[j].shape, np.log(2.5e38), np.float32)
    step = np.exp(log_step.astype(np.float64)).astype(np.float32)
    records[j] = coding.float_record(records[j].name, log_step)
    records[k] = coding.quantized_record(
        name, indices, bits=4, signed=True,
        step=step if records[k].channel_axis is not None else float(step),
        channel_axis=records[k].channel_axis)
    return self.container(records=records)

  def test_requantization_on_the_level_grid_falls_back_to_the_kernel(self):
    # Indices 0 and 7 re-quantize to themselves (7 * step is inf, which
    # clips to 7), but 2 * step is inf too: the (level, channel) grid
    # fails at level 2, which the kernel does not hold, so the whole
    # kernel is checked instead, and passes.
    shape = self.indices["quant_dense/kernel"].shape
    ok = np.where(np.arange(np.prod(shape)) % 3 == 0, 7, 0).reshape(shape)
    data = self._with_huge_step(ok)
    record = [r for r in coding.decode_container(data)[1]
              if r.name == "quant_dense/kernel"][0]
    grid_indices, grid_values = compress_lib._level_grid(record, 2)  # pylint: disable=protected-access
    step = (record.step if record.channel_axis is None else
            record.step.reshape(1, -1))
    self.assertFalse(compress_lib._requantizes(  # pylint: disable=protected-access
        grid_indices, step, grid_values, -7, 7))
    file = compress_lib.read_model_file(data)
    stored = {v.name: v for v in file.variables}["quant_dense/kernel"]
    np.testing.assert_array_equal(stored.value, ok)
    model = keras_cdl.decompress(data)
    kernel = [t for t in introspect.quantized_tensors(model)
              if t.name == "quant_dense/kernel"][0]
    np.testing.assert_array_equal(kernel.indices(), ok)
    # With a 2 in the kernel, the kernel check itself fails and says where.
    bad = ok.copy()
    bad.reshape(-1)[4] = 2
    self.check(self._with_huge_step(bad),
               "re-quantizes to .*7.* at flat position 4|index 2 at flat "
               "position 4 re-quantizes to 7", rebuild=False)

  def test_level_grid_covers_every_index_and_channel(self):
    rng = np.random.default_rng(3)
    for shape, axis in (((3, 4, 5), None), ((3, 4, 5), 2), ((3, 4, 5), 0),
                        ((6, 2), 1), ((7,), None)):
      indices = rng.integers(-5, 6, shape).astype(np.int32)
      step = (rng.uniform(0.01, 1.0, shape[axis]).astype(np.float32)
              if axis is not None else np.float32(0.3))
      record = coding.quantized_record("t", indices, bits=4, signed=True,
                                       step=step, channel_axis=axis)
      grid = compress_lib._level_grid(record, len(shape))  # pylint: disable=protected-access
      grid_indices, grid_values = grid
      self.assertEqual(grid_indices.ndim, len(shape))
      variable = compress_lib.StoredVariable("t", "quantized", "float32",
                                             shape, record, indices)
      restored = variable.restored()
      # Every element's (index, channel, restored value) is on the grid.
      channel = (np.zeros(shape, int) if axis is None else
                 np.indices(shape)[axis])
      grid_channel = (np.zeros(grid_indices.shape, int) if axis is None else
                      np.indices(grid_indices.shape)[axis])
      on_grid = {(int(i), int(c), float(v)) for i, c, v in zip(
          grid_indices.ravel(), grid_channel.ravel(), grid_values.ravel())}
      for i, c, v in zip(indices.ravel(), channel.ravel(), restored.ravel()):
        self.assertIn((int(i), int(c), float(v)), on_grid)
    # No room for a grid: a per-channel vector.
    record = coding.quantized_record("v", np.arange(4), bits=4, signed=True,
                                     step=np.ones(4), channel_axis=0)
    self.assertIsNone(compress_lib._level_grid(record, 1))  # pylint: disable=protected-access

  def test_decoded_sizes_are_capped(self):
    with self.assertRaisesRegex(FormatError, "more than max_elements=100"):
      compress_lib.read_model_file(self.data, max_elements=100)


class FuzzTest(tf.test.TestCase):
  """Random mutations of a real file: FormatError or the original model."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.x, models = make_models()
    cls.model = models["4bit"]
    cls.data = compress_lib.encode_model(cls.model)[0]
    cls.original = compress_lib.read_model_file(cls.data)
    cls.outputs = cls.model(cls.x, training=False).numpy().tobytes()

  def same_as_original(self, model_file):
    if model_file.header != self.original.header:
      return False
    return all(a.name == b.name and a.value.dtype == b.value.dtype and
               a.value.tobytes() == b.value.tobytes()
               for a, b in zip(model_file.variables,
                               self.original.variables))

  def mutate(self, rng, data):
    data = bytearray(data)
    op = rng.integers(8)
    n = len(data)
    if op == 0:  # Flip one bit.
      k = int(rng.integers(n))
      data[k] ^= 1 << int(rng.integers(8))
    elif op == 1:  # Overwrite one byte (sometimes with itself).
      data[int(rng.integers(n))] = int(rng.integers(256))
    elif op == 2:  # Truncate.
      del data[int(rng.integers(n)):]
    elif op == 3:  # Append.
      data += rng.bytes(int(rng.integers(1, 16)))
    elif op == 4:  # Insert.
      k = int(rng.integers(n))
      data[k:k] = rng.bytes(int(rng.integers(1, 8)))
    elif op == 5:  # Delete a range.
      k = int(rng.integers(n))
      del data[k:k + int(rng.integers(1, 64))]
    elif op == 6:  # Overwrite a range with random bytes.
      k = int(rng.integers(n))
      m = int(rng.integers(1, 16))
      data[k:k + m] = rng.bytes(len(data[k:k + m]))
    else:  # Copy a chunk from elsewhere.
      k, j = (int(v) for v in rng.integers(n, size=2))
      m = int(rng.integers(1, 64))
      chunk = bytes(data[j:j + m])
      data[k:k + len(chunk)] = chunk
    return bytes(data)

  def test_random_mutations(self):
    rng = np.random.default_rng(20240601)
    outcomes = {"FormatError": 0, "identical": 0}
    passed = []
    for _ in range(2500):
      data = self.mutate(rng, self.data)
      try:
        model_file = compress_lib.read_model_file(data)
      except FormatError:
        outcomes["FormatError"] += 1
        continue
      # Passing every check means the very same file.
      self.assertEqual(data, self.data)
      self.assertTrue(self.same_as_original(model_file))
      outcomes["identical"] += 1
      passed.append(data)
    self.assertEqual(sum(outcomes.values()), 2500)
    self.assertGreater(outcomes["FormatError"], 2400)
    # Mutations that passed the checks rebuild the original model exactly.
    for data in passed[:20]:
      restored = keras_cdl.decompress(data)
      self.assertEqual(restored(self.x, training=False).numpy().tobytes(),
                       self.outputs)

  def test_resealed_mutations(self):
    """Mutations behind valid CRCs (a crafted file) still only raise
    FormatError; those that pass are decoded and 20 are fully rebuilt."""
    rng = np.random.default_rng(7)
    json_bytes, bodies = split(self.data)
    passed, errors = [], 0
    for _ in range(400):
      parts = [json_bytes] + bodies
      # Half in the JSON header (architecture, variable list), half in the
      # records.
      k = 0 if rng.random() < 0.5 else int(rng.integers(1, len(parts)))
      mutated = self.mutate(rng, parts[k])
      parts = parts[:k] + [mutated] + parts[k + 1:]
      data = seal(parts[0], parts[1:])
      try:
        model_file = compress_lib.read_model_file(data)
      except FormatError:
        errors += 1
        continue
      if not self.same_as_original(model_file):
        passed.append(data)
    self.assertGreater(errors, 200)
    rebuilt = failed = 0
    for data in passed[:20]:
      try:
        keras_cdl.decompress(data)
        rebuilt += 1
      except FormatError:
        failed += 1
    self.assertEqual(rebuilt + failed, min(20, len(passed)))


if __name__ == "__main__":
  tf.test.main()
