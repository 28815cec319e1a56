"""Tests of keras_cdl.coding: range coding of indices and the .cdl container.

The container helpers below (`split`, `seal`) are written from docs/FORMAT.md,
not from the code under test, so they also check the document.  Everything is
seeded and small; the whole file runs in well under a minute on 2 cores.
"""

import io
import json
import os
import struct
import tempfile
import zlib

from absl.testing import parameterized
import numpy as np
import tensorflow as tf

from keras_cdl import coding
from keras_cdl.errors import FormatError

# ----------------------------------------------------------------------------
# Helpers.
# ----------------------------------------------------------------------------
PREAMBLE = struct.Struct("<4sHHQII")


def entropy_bits(x):
  _, counts = np.unique(np.asarray(x), return_counts=True)
  p = counts / counts.sum()
  return float(-(p * np.log2(p)).sum())


def laplacian(rng, scale, shape, lo, hi):
  return np.clip(np.rint(rng.laplace(0.0, scale, shape)), lo, hi).astype(
      np.int32)


def split(data):
  """(json bytes, [record body bytes]) of a valid container, per FORMAT.md."""
  magic, version, flags, length, count, json_len = PREAMBLE.unpack_from(data)
  assert (magic, version, flags, length) == (b"KCDL", 1, 0, len(data))
  pos = PREAMBLE.size
  json_bytes = data[pos:pos + json_len]
  pos += json_len + 4
  bodies = []
  for _ in range(count):
    n, = struct.unpack_from("<Q", data, pos)
    bodies.append(data[pos + 8:pos + 8 + n])
    pos += 8 + n + 4
  assert pos == len(data) - 4
  return json_bytes, bodies


def seal(json_bytes, bodies, version=1, flags=0):
  """Frames bodies with lengths and CRC32s and seals the file, per FORMAT.md."""
  frames = []
  for body in bodies:
    framed = struct.pack("<Q", len(body)) + body
    frames.append(framed + struct.pack("<I", zlib.crc32(framed)))
  length = PREAMBLE.size + len(json_bytes) + 4 + sum(map(len, frames)) + 4
  head = PREAMBLE.pack(b"KCDL", version, flags, length, len(bodies),
                       len(json_bytes)) + json_bytes
  out = head + struct.pack("<I", zlib.crc32(head)) + b"".join(frames)
  return out + struct.pack("<I", zlib.crc32(out))


def reseal_file_crc(data):
  return data[:-4] + struct.pack("<I", zlib.crc32(data[:-4]))


def small_container():
  """A small real container: per-channel, scalar, constant and float records."""
  rng = np.random.default_rng(7)
  kernel = laplacian(rng, 1.2, (12, 8), -7, 7)
  acts = laplacian(rng, 3.0, (40,), 0, 15)
  records = [
      coding.quantized_record("dense/kernel", kernel, bits=4, signed=True,
                              step=np.linspace(0.01, 0.08, 8), channel_axis=1,
                              kappa=1.0),
      coding.float_record("dense/bias", rng.normal(size=8).astype(np.float32)),
      coding.quantized_record("relu/act", acts, bits=4, signed=False,
                              step=0.25, alpha=20.0),
      coding.quantized_record("zeros", np.zeros((2, 3), np.int8), bits=2,
                              signed=True, step=0.5),
  ]
  header = {"format": "test", "keras": {"layers": ["Dense", "ReLU"]}}
  return header, records


def expect_same(test, got, header, records):
  got_header, got_records = got
  test.assertEqual(got_header, header)
  test.assertEqual(got_records, records)
  for a, b in zip(got_records, records):
    np.testing.assert_array_equal(coding.decode_record(a),
                                  coding.decode_record(b))


# ----------------------------------------------------------------------------
# Range coding of indices.
# ----------------------------------------------------------------------------
class EncodeDecodeTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("laplacian_signed", "laplacian", True),
      ("laplacian_unsigned", "laplacian", False),
      ("uniform_signed", "uniform", True),
      ("uniform_unsigned", "uniform", False),
      ("constant_signed", "constant", True),
      ("constant_unsigned", "constant", False),
      ("single_signed", "single", True),
      ("single_unsigned", "single", False),
      ("sparse_signed", "sparse", True),
      ("sparse_unsigned", "sparse", False),
  )
  def test_round_trip_is_exact_for_bits_2_to_8(self, kind, signed):
    rng = np.random.default_rng(zlib.crc32(f"{kind}/{signed}".encode()))
    for bits in range(2, 9):
      lo, hi = coding.index_range(bits, signed)
      shape = (37, 23)
      if kind == "laplacian":
        x = laplacian(rng, 0.3 * 2**(bits - 2), shape, lo, hi)
      elif kind == "uniform":
        x = rng.integers(lo, hi + 1, shape)
      elif kind == "constant":
        x = np.full(shape, rng.integers(lo, hi + 1))
      elif kind == "single":
        x = np.array([[rng.integers(lo, hi + 1)]])
      else:  # Mostly 0, a few extremes: unused levels inside the span.
        x = np.where(rng.random(shape) < 0.98, 0, rng.choice([lo, hi], shape))
      with self.subTest(bits=bits):
        payload, table = coding.encode_indices(x)
        y = coding.decode_indices(payload, table, x.shape)
        self.assertEqual(y.dtype, np.int32)
        np.testing.assert_array_equal(y, x)
        record = coding.quantized_record("t", x, bits=bits, signed=signed,
                                         step=0.1)
        np.testing.assert_array_equal(coding.decode_record(record), x)

  def test_constant_tensor_has_empty_payload_and_one_level(self):
    payload, table = coding.encode_indices(np.full((100, 7), -3, np.int8))
    self.assertEqual(payload, b"")
    self.assertEqual(table, coding.CodingTable(
        -3, 8, [256], coding.indices_crc32(np.full(700, -3))))
    np.testing.assert_array_equal(
        coding.decode_indices(payload, table, (100, 7)), -3)
    # The CRC32 also pins the element count of a constant tensor.
    with self.assertRaisesRegex(FormatError, "CRC32.*shape \(100, 8\)"):
      coding.decode_indices(payload, table, (100, 8))

  def test_single_element_and_scalar(self):
    for x in (np.array([5]), np.array(5), np.array([[[-1]]])):
      payload, table = coding.encode_indices(x)
      self.assertEqual(payload, b"")
      np.testing.assert_array_equal(
          coding.decode_indices(payload, table, x.shape), x)

  def test_integer_dtypes_and_precisions(self):
    rng = np.random.default_rng(1)
    x = laplacian(rng, 2.0, (500,), -100, 100)
    for dtype in (np.int8, np.int16, np.int32, np.int64):
      for precision in (8, 12, 16):
        payload, table = coding.encode_indices(x.astype(dtype), precision)
        self.assertEqual(table.precision, precision)
        self.assertEqual(int(table.freqs.sum()), 2**precision)
        np.testing.assert_array_equal(
            coding.decode_indices(payload, table, x.shape), x)
    u = rng.integers(0, 256, 1000).astype(np.uint8)
    payload, table = coding.encode_indices(u)
    np.testing.assert_array_equal(coding.decode_indices(payload, table, 1000),
                                  u)

  def test_tensors_longer_than_a_chunk(self):
    # The histogram and CRC32 run over chunks of coding._CHUNK indices.
    rng = np.random.default_rng(2)
    n = 2 * coding._CHUNK + 17  # pylint: disable=protected-access
    x = laplacian(rng, 3.0, (n,), -127, 127)
    for dtype in (np.int8, np.int32, np.int64):
      payload, table = coding.encode_indices(x.astype(dtype).reshape(-1, 1))
      self.assertEqual(table.crc32, coding.indices_crc32(x))
      counts = np.bincount(x - x.min())
      np.testing.assert_array_equal(table.freqs > 0, counts > 0)
      self.assertEqual(table, coding.build_table(x.astype(dtype)))
      np.testing.assert_array_equal(
          coding.decode_indices(payload, table, (n, 1)), x.reshape(-1, 1))

  def test_unused_levels_get_zero_frequency(self):
    x = np.array([-5] * 3 + [0] * 1000 + [5] * 2)
    table = coding.build_table(x)
    self.assertEqual(table.offset, -5)
    self.assertEqual(table.num_levels, 11)
    self.assertTrue((table.freqs[[1, 2, 3, 4, 6, 7, 8, 9]] == 0).all())
    self.assertTrue((table.freqs[[0, 5, 10]] > 0).all())

  @parameterized.named_parameters(
      ("h_7bits", 30.0, 8), ("h_4bits", 3.0, 8), ("h_1bit", 0.3, 8),
      ("h_0.07bits", 0.1, 8), ("h_0.001bits", 0.05, 8), ("h_2bits_4b", 1.0, 4))
  def test_payload_within_entropy_bound(self, scale, bits):
    rng = np.random.default_rng(int(scale * 100) + bits)
    n = 200_000
    lo, hi = coding.index_range(bits, True)
    x = laplacian(rng, scale, (n,), lo, hi)
    payload, table = coding.encode_indices(x)
    ideal = n * entropy_bits(x) / 8
    self.assertLessEqual(len(payload), ideal * 1.005 + 32)
    # The automatic precision never costs more than 16 bits, tables included.
    payload16, table16 = coding.encode_indices(x, precision=16)
    self.assertLessEqual(len(payload16), ideal * 1.001 + 4)
    self.assertLessEqual(
        len(payload) + coding.tensor_size(coding.quantized_record(
            "t", x, bits=bits, signed=True, step=1.0), x).table_bytes,
        len(payload16) + coding.tensor_size(coding.quantized_record(
            "t", x, bits=bits, signed=True, step=1.0, precision=16),
                                            x).table_bytes + 2)
    self.assertAllClose(coding.empirical_entropy(x), entropy_bits(x),
                        rtol=1e-12, atol=1e-12)

  def test_automatic_precision_shrinks_small_tables(self):
    rng = np.random.default_rng(5)
    x = laplacian(rng, 30.0, (1000,), -127, 127)
    auto = coding.quantized_record("t", x, bits=8, signed=True, step=1.0)
    p16 = coding.quantized_record("t", x, bits=8, signed=True, step=1.0,
                                  precision=16)
    size, size16 = coding.tensor_size(auto, x), coding.tensor_size(p16, x)
    self.assertLess(auto.table.precision, 16)
    self.assertLess(size.record_bytes, size16.record_bytes - 100)
    self.assertLessEqual(size.payload_bytes, size16.payload_bytes + 2)
    np.testing.assert_array_equal(coding.decode_record(auto), x)

  def test_payload_within_entropy_bound_with_unused_levels(self):
    rng = np.random.default_rng(3)
    n = 200_000
    x = np.where(rng.random(n) < 0.999, 0, rng.choice([-127, 127], n))
    payload, _ = coding.encode_indices(x)
    self.assertLessEqual(len(payload), n * entropy_bits(x) * 1.005 / 8 + 32)

  def test_range_coder_alone_cannot_detect_corruption(self):
    """Why tables carry a CRC32: tfc's coder has no redundancy to check."""
    rng = np.random.default_rng(4)
    x = laplacian(rng, 2.0, (40, 25), -127, 127)
    payload, table = coding.encode_indices(x)
    unchecked = coding.CodingTable(table.offset, table.precision, table.freqs)
    corrupt = bytearray(payload)
    corrupt[7] ^= 0x10
    y = coding.decode_indices(bytes(corrupt), unchecked, x.shape)
    self.assertGreater(np.sum(y != x), 0)  # Silently wrong without the CRC.
    z = coding.decode_indices(payload, unchecked, (x.size + 1,))
    np.testing.assert_array_equal(z[:-1], x.ravel())  # One symbol too many.
    with self.assertRaisesRegex(FormatError, "CRC32"):
      coding.decode_indices(bytes(corrupt), table, x.shape)

  def test_wrong_shape_or_corrupt_payload_is_detected(self):
    rng = np.random.default_rng(4)
    x = laplacian(rng, 2.0, (40, 25), -127, 127)
    payload, table = coding.encode_indices(x)
    for shape in ((40, 24), (40, 26), (1000 - 1,), (1000 + 1,), (10,),
                  (100_000,)):
      with self.subTest(shape=shape):
        with self.assertRaisesRegex(FormatError, "shape"):
          coding.decode_indices(payload, table, shape)
    corrupt = bytearray(payload)
    for i in range(0, len(payload), 7):
      corrupt[i] ^= 0x10
      with self.subTest(byte=i):
        with self.assertRaises(FormatError):
          coding.decode_indices(bytes(corrupt), table, x.shape)
      corrupt[i] ^= 0x10
    with self.assertRaisesRegex(FormatError, "0 bytes"):
      coding.decode_indices(b"\x00", coding.CodingTable(0, 16, [65536]), 3)
    with self.assertRaisesRegex(ValueError, "max_elements"):
      coding.decode_indices(payload, table, x.shape, max_elements=999)


class TableTest(tf.test.TestCase, parameterized.TestCase):

  @parameterized.named_parameters(
      ("sum_too_small", 16, [30000, 30000], "sum to 60000, expected 2\\*\\*16"),
      ("sum_too_large", 12, [4000, 97], "sum to 4097"),
      ("not_monotone", 16, [40000, -100, 25636], "not monotone"),
      ("first_zero", 16, [0, 65536], "positive frequency"),
      ("last_zero", 16, [65536, 0], "positive frequency"),
      ("precision_17", 17, [2**17], "precision: expected 1 to 16, found 17"),
      ("precision_0", 0, [1], "precision"),
  )
  def test_invalid_table_is_rejected(self, precision, freqs, message):
    table = coding.CodingTable(0, precision, np.array(freqs))
    with self.assertRaisesRegex(FormatError, message):
      coding.decode_indices(b"\x12\x34", table, (4,))

  def test_float_frequencies_are_rejected(self):
    with self.assertRaisesRegex(FormatError, "integers"):
      coding.CodingTable(0, 16, np.array([0.5, 0.5]))


# ----------------------------------------------------------------------------
# API errors name the argument, the rule and the value.
# ----------------------------------------------------------------------------
class ApiErrorTest(tf.test.TestCase):

  def test_encode_indices_arguments(self):
    with self.assertRaisesRegex(TypeError,
                                "`indices` must have an integer dtype.*float"):
      coding.encode_indices(np.zeros(3, np.float32))
    with self.assertRaisesRegex(ValueError,
                                "`indices` must not be empty.*\\(0, 4\\)"):
      coding.encode_indices(np.zeros((0, 4), np.int32))
    with self.assertRaisesRegex(ValueError, "`precision`.*1 to 16.*17"):
      coding.encode_indices(np.arange(3), precision=17)
    with self.assertRaisesRegex(ValueError, "span 300 levels.*`precision`=8"):
      coding.encode_indices(np.arange(300), precision=8)
    with self.assertRaisesRegex(ValueError, "int16.*40000"):
      coding.encode_indices(np.array([40000, 40001]))

  def test_quantized_record_arguments(self):
    x = np.array([[0, 1], [-1, 0]])
    with self.assertRaisesRegex(ValueError, "`bits`.*2 to 8.*9"):
      coding.quantized_record("k", x, bits=9, signed=True, step=0.1)
    with self.assertRaisesRegex(ValueError, "`bits`.*2 to 8.*1"):
      coding.quantized_record("k", x, bits=1, signed=True, step=0.1)
    with self.assertRaisesRegex(
        ValueError, "\\[-1, 1\\] for bits=2, signed=True.*found 2.*3"):
      coding.quantized_record("k", np.array([0, 1, -1, 2]), bits=2,
                              signed=True, step=0.1)
    with self.assertRaisesRegex(ValueError, "\\[0, 3\\].*found -1"):
      coding.quantized_record("k", x, bits=2, signed=False, step=0.1)
    with self.assertRaisesRegex(TypeError, "`signed` must be a bool.*1"):
      coding.quantized_record("k", x, bits=4, signed=1, step=0.1)
    with self.assertRaisesRegex(ValueError, "`step` must be a scalar"):
      coding.quantized_record("k", x, bits=4, signed=True, step=[0.1, 0.2])
    with self.assertRaisesRegex(ValueError, "`step` must have shape \\(2,\\)"):
      coding.quantized_record("k", x, bits=4, signed=True, step=[0.1],
                              channel_axis=0)
    with self.assertRaisesRegex(ValueError, "`step`.*positive.*-0.1"):
      coding.quantized_record("k", x, bits=4, signed=True, step=-0.1)
    with self.assertRaisesRegex(ValueError, "`channel_axis`.*2"):
      coding.quantized_record("k", x, bits=4, signed=True, step=0.1,
                              channel_axis=2)
    with self.assertRaisesRegex(ValueError, "`kappa`.*positive.*-1"):
      coding.quantized_record("k", x, bits=4, signed=True, step=0.1, kappa=-1)
    with self.assertRaisesRegex(ValueError, "`dtype`.*int32"):
      coding.quantized_record("k", x, bits=4, signed=True, step=0.1,
                              dtype="int32")
    with self.assertRaisesRegex(FormatError, "name: expected a non-empty"):
      coding.quantized_record("", x, bits=4, signed=True, step=0.1)

  def test_float_record_and_container_arguments(self):
    with self.assertRaisesRegex(TypeError, "`values` must be a float.*int64"):
      coding.float_record("b", np.arange(3))
    record = coding.float_record("b", np.zeros(3, np.float16))
    self.assertEqual(record.dtype, "float16")
    with self.assertRaisesRegex(TypeError, "`header` must be a dict.*list"):
      coding.encode_container([], [record])
    with self.assertRaisesRegex(FormatError, "name 'b' repeats"):
      coding.encode_container({}, [record, record])
    with self.assertRaisesRegex(ValueError, "`shape` must have at least one"):
      coding.decode_indices(b"", coding.CodingTable(0, 16, [65536]), (0, 3))


# ----------------------------------------------------------------------------
# The container.
# ----------------------------------------------------------------------------
class ContainerTest(tf.test.TestCase):

  def test_round_trip_bytes_file_object_and_path(self):
    header, records = small_container()
    data = coding.encode_container(header, records)
    expect_same(self, coding.decode_container(data), header, records)
    expect_same(self, coding.read_container(bytearray(data)), header, records)
    buffer = io.BytesIO()
    self.assertEqual(coding.write_container(buffer, header, records),
                     len(data))
    self.assertEqual(buffer.getvalue(), data)
    buffer.seek(0)
    expect_same(self, coding.read_container(buffer), header, records)
    with tempfile.TemporaryDirectory() as tmp:
      path = os.path.join(tmp, "model.cdl")
      coding.write_container(path, header, records)
      self.assertEqual(os.listdir(tmp), ["model.cdl"])
      expect_same(self, coding.read_container(path), header, records)

  def test_encoding_is_deterministic_and_matches_format_md(self):
    header, records = small_container()
    data = coding.encode_container(header, records)
    self.assertEqual(coding.encode_container(header, records), data)
    json_bytes, bodies = split(data)
    self.assertEqual(seal(json_bytes, bodies), data)
    self.assertEqual(len(bodies), len(records))

  def test_empty_container(self):
    data = coding.encode_container({}, [])
    self.assertLen(data, 24 + 2 + 4 + 4)
    self.assertEqual(coding.decode_container(data), ({}, []))

  def test_values_and_fields_survive(self):
    header, records = small_container()
    _, got = coding.decode_container(coding.encode_container(header, records))
    kernel = got[0]
    self.assertEqual((kernel.bits, kernel.signed, kernel.channel_axis),
                     (4, True, 1))
    self.assertEqual((kernel.alpha, kernel.kappa), (None, 1.0))
    self.assertEqual(got[2].alpha, 20.0)
    indices = coding.decode_record(kernel)
    np.testing.assert_allclose(
        coding.dequantize_record(kernel),
        indices * np.linspace(0.01, 0.08, 8).astype(np.float32), rtol=1e-6)
    self.assertEqual(coding.dequantize_record(got[3]).tolist(), [[0.0] * 3] * 2)
    np.testing.assert_array_equal(coding.decode_record(got[1]),
                                  coding.decode_record(records[1]))

  def test_unicode_names_and_json(self):
    record = coding.float_record("Schicht/Gewicht:0 ✓", np.ones(2, np.float32))
    header = {"config": "ü", "n": [1, 2.5, None, True]}
    got = coding.decode_container(coding.encode_container(header, [record]))
    self.assertEqual(got, (header, [record]))

  def test_sizes_add_up_three_ways(self):
    header, records = small_container()
    data = coding.encode_container(header, records)
    report = coding.container_sizes(header, records)
    self.assertEqual(report.file_bytes, len(data))
    self.assertEqual(
        report.file_bytes,
        report.quantized_payload_bytes + report.float_bytes +
        report.table_bytes + report.header_bytes + report.container_bytes)
    kernel = report.tensors[0]
    self.assertEqual(kernel.payload_bytes, len(records[0].payload))
    x = coding.decode_record(records[0])
    self.assertAllClose(kernel.entropy_bytes, x.size * entropy_bits(x) / 8)
    self.assertEqual(report.tensors[3].entropy_bytes, 0.0)
    self.assertIsNone(report.tensors[1].entropy_bytes)
    self.assertEqual(report.tensors[1].payload_bytes, 4 * 8)
    # Passing the indices skips decoding and gives the same report.
    self.assertEqual(
        coding.container_sizes(header, records, {"dense/kernel": x}), report)


# ----------------------------------------------------------------------------
# Corruption.
# ----------------------------------------------------------------------------
class CorruptionTest(tf.test.TestCase):

  def setUp(self):
    super().setUp()
    self.header, self.records = small_container()
    self.data = coding.encode_container(self.header, self.records)

  def resealed(self, index, mutate):
    """The container with record `index`'s body mutated, all CRCs valid."""
    json_bytes, bodies = split(self.data)
    bodies[index] = mutate(bytearray(bodies[index]))
    return seal(json_bytes, [bytes(b) for b in bodies])

  def test_wrong_magic(self):
    with self.assertRaisesRegex(FormatError, "not a .cdl file.*b'PK"):
      coding.decode_container(b"PK\x03\x04" + self.data[4:])

  def test_unknown_version(self):
    json_bytes, bodies = split(self.data)
    with self.assertRaisesRegex(FormatError,
                                "unsupported format version 2.*reads version 1"):
      coding.decode_container(seal(json_bytes, bodies, version=2))

  def test_every_truncation(self):
    for n in range(len(self.data)):
      with self.assertRaisesRegex(FormatError, "truncated"):
        coding.decode_container(self.data[:n])

  def test_trailing_bytes(self):
    with self.assertRaisesRegex(FormatError, "trailing bytes"):
      coding.decode_container(self.data + b"\x00")

  def test_every_bit_flip(self):
    data = bytearray(self.data)
    for i in range(len(data)):
      for bit in range(8):
        data[i] ^= 1 << bit
        with self.assertRaises(FormatError):
          coding.decode_container(data)
        data[i] ^= 1 << bit

  def test_record_crc_is_checked(self):
    # Flip a payload bit and fix only the file CRC: the record CRC catches it.
    data = bytearray(self.data)
    data[-20] ^= 0x01
    with self.assertRaisesRegex(FormatError, "record 3.*CRC32 mismatch"):
      coding.decode_container(reseal_file_crc(bytes(data)))

  def test_record_length_running_past_the_end(self):
    json_len, = struct.unpack_from("<I", self.data, 20)
    first = 24 + json_len + 4
    data = bytearray(self.data)
    struct.pack_into("<Q", data, first, 2**62)
    with self.assertRaisesRegex(FormatError,
                                "record 0: record length .* runs past"):
      coding.decode_container(reseal_file_crc(bytes(data)))

  def test_table_not_summing_is_rejected(self):
    # The kernel's table ends with its last frequency, just before the u64
    # payload length: make that varint one smaller.
    payload = len(self.records[0].payload)

    def mutate(body):
      k = len(body) - payload - 8 - 1  # The last varint's last byte.
      while body[k - 1] & 0x80:  # Walk back to its first (lowest) byte.
        k -= 1
      assert self.records[0].table.freqs[-1] > 1 and body[k] & 0x7F >= 1
      body[k] -= 1
      return body

    p = self.records[0].table.precision
    with self.assertRaisesRegex(
        FormatError, f"record 0 \\('dense/kernel'\\): table: frequencies sum "
        f"to {2**p - 1}, expected 2\\*\\*{p} = {2**p}"):
      coding.decode_container(self.resealed(0, mutate))

  def test_index_outside_the_bit_width_is_rejected(self):
    name = len("dense/kernel")
    ndim = 2

    def mutate(body):  # bits 4 -> 2: levels [-7, 7] fall outside [-1, 1].
      k = 2 + name + 2 + len("float32") + 1 + 4 * ndim
      assert body[k] == 4
      body[k] = 2
      return body

    with self.assertRaisesRegex(
        FormatError, "outside the index range \\[-1, 1\\] of bits=2"):
      coding.decode_container(self.resealed(0, mutate))

  def test_shape_not_matching_the_payload_is_rejected(self):
    k = 2 + len("dense/kernel") + 2 + len("float32") + 1
    for rows in (11, 13, 6, 200):

      def mutate(body, rows=rows):
        assert struct.unpack_from("<I", body, k)[0] == 12
        struct.pack_into("<I", body, k, rows)
        return body

      with self.subTest(rows=rows):
        with self.assertRaisesRegex(FormatError, "dense/kernel.*shape"):
          _, records = coding.decode_container(self.resealed(0, mutate))
          coding.decode_record(records[0])

  def test_float_data_length_is_checked(self):
    k = 2 + len("dense/bias") + 2 + len("float32") + 1

    def mutate(body):
      struct.pack_into("<I", body, k, 9)
      return body

    with self.assertRaisesRegex(FormatError,
                                "dense/bias.*expected 4 \\* 9 = 36 bytes"):
      coding.decode_container(self.resealed(1, mutate))

  def test_fuzz_random_mutations(self):
    """Flips, truncations, insertions and overwrites: FormatError or original."""
    rng = np.random.default_rng(2024)
    original = self.data
    identical = 0
    for trial in range(3000):
      data = bytearray(original)
      for _ in range(rng.integers(1, 4)):
        op = rng.integers(4)
        if op == 0:  # Flip bits.
          for _ in range(rng.integers(1, 9)):
            i = rng.integers(len(data))
            data[i] ^= 1 << int(rng.integers(8))
        elif op == 1:  # Truncate.
          del data[rng.integers(len(data)):]
        elif op == 2:  # Insert random bytes.
          i = rng.integers(len(data) + 1)
          data[i:i] = rng.bytes(int(rng.integers(1, 9)))
        else:  # Overwrite a run (possibly with the same bytes).
          i = rng.integers(len(data))
          n = int(rng.integers(1, 9))
          run = rng.bytes(n) if rng.random() < 0.8 else bytes(data[i:i + n])
          data[i:i + n] = run
        if not data:
          data = bytearray(original[:1])
      data = bytes(data)
      try:
        got = coding.decode_container(data)
      except FormatError:
        continue
      self.assertEqual(data, original, f"trial {trial} decoded a mutation")
      identical += 1
      expect_same(self, got, self.header, self.records)
    self.assertGreater(identical, 0)

  def test_fuzz_resealed_bodies(self):
    """Mutated record bodies with valid CRCs (a crafted file): the parser and
    decoder raise FormatError or return self-consistent values, nothing else."""
    rng = np.random.default_rng(99)
    json_bytes, bodies = split(self.data)
    parsed = 0
    for trial in range(1500):
      index = int(rng.integers(len(bodies)))
      body = bytearray(bodies[index])
      op = rng.integers(3)
      i = int(rng.integers(len(body)))
      if op == 0:
        body[i] ^= 1 << int(rng.integers(8))
      elif op == 1:
        body[i] = int(rng.integers(256))
      else:
        del body[i:i + int(rng.integers(1, 4))]
      data = seal(json_bytes,
                  bodies[:index] + [bytes(body)] + bodies[index + 1:])
      try:
        _, records = coding.decode_container(data)
      except FormatError:
        continue
      parsed += 1
      for record in records:
        try:
          values = coding.decode_record(record, max_elements=10_000)
        except FormatError:
          continue
        self.assertEqual(values.shape, record.shape, f"trial {trial}")
        if record.kind == "quantized":
          lo, hi = coding.index_range(record.bits, record.signed)
          self.assertTrue(((values >= lo) & (values <= hi)).all())
    self.assertGreater(parsed, 0)


if __name__ == "__main__":
  tf.test.main()


class DeflatedHeaderTest(tf.test.TestCase):
  """A large header JSON is stored deflated (preamble flag 0x0001)."""

  def _records(self):
    return [coding.float_record("bias", np.arange(3, dtype=np.float32))]

  def test_large_header_is_deflated_smaller_and_round_trips(self):
    header = {"config": {"layers": [{"name": f"dense_{i}", "units": 10}
                                    for i in range(200)]}}
    data = coding.encode_container(header, self._records())
    _, _, flags, _, _, json_len = PREAMBLE.unpack_from(data)
    self.assertEqual(flags, coding.FLAG_DEFLATED_HEADER)
    plain = len(json.dumps(header, separators=(",", ":")).encode())
    self.assertLess(json_len, plain // 4)
    decoded_header, records = coding.decode_container(data)
    self.assertEqual(decoded_header, header)
    self.assertEqual(records, self._records())
    sizes = coding.container_sizes(header, self._records())
    self.assertEqual(sizes.file_bytes, len(data))

  def _sealed(self, section, flags):
    body = split(coding.encode_container({}, self._records()))[1]
    return seal(section, body, flags=flags)

  def test_corrupt_deflated_header_raises_format_error(self):
    good = zlib.compress(b'{"a": 1}')
    cases = {
        "not a zlib stream": b"not zlib at all",
        "truncated": good[:-3],
        "extra bytes": good + b"xx",
    }
    for label, section in cases.items():
      with self.subTest(label):
        with self.assertRaisesRegex(FormatError, "header: deflated JSON"):
          coding.decode_container(self._sealed(section, 1))

  def test_header_inflating_past_the_limit_raises_format_error(self):
    bomb = zlib.compress(b" " * (coding.MAX_HEADER_JSON + 10), 9)
    with self.assertRaisesRegex(FormatError, "inflates beyond"):
      coding.decode_container(self._sealed(bomb, 1))

  def test_unknown_flag_bits_raise_format_error(self):
    with self.assertRaisesRegex(FormatError, r"flags: unknown bits in 0x0002"):
      coding.decode_container(self._sealed(b"{}", 2))
