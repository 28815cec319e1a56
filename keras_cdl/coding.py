"""Entropy coding of quantized tensors and the `.cdl` container, tensor level.

This module stores tensors, not models: it knows nothing about Keras.  A CDL
model is saved as integer indices `i` (reconstructed as `i * q`) plus step
sizes, and floats for everything that is not quantized.

* `encode_indices` / `decode_indices` range-code one tensor of integer indices
  with tensorflow-compression's range coder against the tensor's own
  empirical PMF (the histogram of its indices over `[min, max]`), quantized to
  `precision` bits (`CodingTable`).  The payload stays within a few bytes of
  the ideal `N * H / 8`, `H` the empirical entropy in bits per index (measured:
  at most 0.01% + 2 bytes above it at precision 16, see docs/FORMAT.md).
* `Record` is one stored tensor (`quantized_record`, `float_record`);
  `encode_container` / `decode_container` (and `write_container` /
  `read_container` for files) turn a JSON header plus records into `.cdl`
  bytes and back.  docs/FORMAT.md gives the byte layout.
* `decode_record` and `dequantize_record` give a record's values back;
  `tensor_size` and `container_sizes` account for the bytes three ways
  (coded payload, payload + tables + headers, whole file) against the ideal
  `N * H / 8`.

Every reader here treats its input as untrusted: malformed data raises
`keras_cdl.errors.FormatError` naming the record, the field, the expected and
the found value, and sizes are checked against the bytes actually present
before anything is allocated.  tensorflow-compression's range coder has no
redundancy to detect corruption with: a corrupt payload decodes to other
indices that re-encode to exactly the corrupt bytes, and decoding more symbols
than were encoded reads implicit zeros without complaint.  So the container
carries a CRC32 per record and over the whole file, and every coding table a
CRC32 of the indices it codes, which `decode_indices` checks after decoding.

> E.-H. Yang and S. M. Hamidi, "Coded Deep Learning: Framework and Algorithm",
> arXiv 2501.09849, 2025.
"""

import dataclasses
import heapq
import json
import math
import operator
import os
import struct
import zlib

import numpy as np
import tensorflow as tf
import tensorflow_compression as tfc

from keras_cdl.errors import FormatError

__all__ = [
    "MAGIC",
    "FORMAT_VERSION",
    "PRECISIONS",
    "MAX_ELEMENTS",
    "KINDS",
    "DTYPES",
    "CodingTable",
    "Record",
    "TensorSize",
    "SizeReport",
    "index_range",
    "empirical_entropy",
    "indices_crc32",
    "build_table",
    "encode_indices",
    "decode_indices",
    "quantized_record",
    "float_record",
    "validate_record",
    "decode_record",
    "dequantize_record",
    "encode_container",
    "decode_container",
    "write_bytes",
    "write_container",
    "read_container",
    "tensor_size",
    "container_sizes",
]

MAGIC = b"KCDL"
FORMAT_VERSION = 1
# Precisions of the quantized CDF, in bits, that `precision=None` chooses
# from.  16 (tensorflow-compression's maximum) gives the smallest payload: at
# 12 bits rare levels are over-charged (+0.2% at H = 4 bits, +46% at H = 0.001
# bits).  Lower precisions give smaller tables (frequencies are varints), which
# wins for small tensors: 1000 8-bit indices at H = 7 bits take 876 payload
# bytes plus a 396-byte table at 16 bits, a 264-byte table at 12 bits.
PRECISIONS = tuple(range(8, 17))
# A chosen precision's estimated payload must stay within this of N * H / 8
# (the guarantee is N * H / 8 * 1.005 + 32; the coder adds at most ~4 bytes).
_PAYLOAD_SLACK = (1.004, 24)
# tensorflow-compression's coding ops take int32 shapes.
MAX_ELEMENTS = 2**31 - 1
KINDS = ("float", "quantized")
DTYPES = ("float16", "bfloat16", "float32", "float64")

_MAX_NDIM = 32
_MAX_DIM = 2**32 - 1
_NO_AXIS = 0xFF
_KIND_CODES = {"float": 0, "quantized": 1}
_EXTRA_ALPHA = 1
_EXTRA_KAPPA = 2
_PREAMBLE = struct.Struct("<4sHHQII")  # magic, version, flags, length, n, json
# Preamble flag: the header section holds zlib-deflated JSON.
FLAG_DEFLATED_HEADER = 0x0001
# A deflated header may inflate to at most this many bytes (zip-bomb guard).
MAX_HEADER_JSON = 64 * 2**20
_CRC = struct.Struct("<I")
_LEN = struct.Struct("<Q")
_TABLE_HEAD = struct.Struct("<BhHI")  # precision, offset, levels, crc32
# Smallest file: preamble, its CRC, no JSON, no records, the file CRC.
_MIN_FILE = _PREAMBLE.size + 2 * _CRC.size
# Smallest record: length, CRC, and a body of at least name_len + 1 byte of
# name + kind + dtype_len + 7 bytes of dtype + ndim + data_len.
_MIN_RECORD = _LEN.size + _CRC.size + 2 + 1 + 1 + 1 + 7 + 1 + 8
# Indices are histogrammed and CRC'd in chunks of this many (cache-sized).
_CHUNK = 2**18


# -----------------------------------------------------------------------------
# Small helpers.
# -----------------------------------------------------------------------------
def _is_int(value):
  return isinstance(value, (int, np.integer)) and not isinstance(
      value, (bool, np.bool_))


def _prod(shape):
  return math.prod(shape)


def index_range(bits, signed):
  """Returns `(lo, hi)`, the index set `A` of a `bits`-bit tensor.

  Signed: the narrow symmetric range `[-(2^(b-1) - 1), 2^(b-1) - 1]`;
  unsigned: `[0, 2^b - 1]` (docs/cdl-method section 1, as `ops.index_range`).
  """
  if not _is_int(bits) or not 2 <= bits <= 8:
    raise ValueError(f"`bits` must be an integer from 2 to 8, but got "
                     f"{bits!r}.")
  if signed:
    hi = 2**(int(bits) - 1) - 1
    return -hi, hi
  return 0, 2**int(bits) - 1


def _check_precision(precision, name="precision"):
  if precision is None:
    return None
  if not _is_int(precision) or not 1 <= precision <= 16:
    raise ValueError(f"`{name}` must be None (automatic) or an integer from 1 "
                     f"to 16 (the range coder's limit), but got "
                     f"{precision!r}.")
  return int(precision)


def _flat_indices(indices, name="indices"):
  """Validates an integer array and returns it flattened."""
  array = np.asarray(indices)
  if array.dtype.kind not in "iu":
    raise TypeError(
        f"`{name}` must have an integer dtype, but got dtype {array.dtype}. "
        f"Round and cast first, e.g. `np.rint(x).astype(np.int32)`.")
  if array.size == 0:
    raise ValueError(f"`{name}` must not be empty, but got shape "
                     f"{array.shape}: an empty tensor has nothing to code.")
  if array.size > MAX_ELEMENTS:
    raise ValueError(
        f"`{name}` must have at most {MAX_ELEMENTS} elements (the range "
        f"coder's int32 limit), but got {array.size}; split the tensor.")
  return array.reshape(-1)


def _symbols_and_counts(flat):
  """Returns `(lo, symbols, counts, crc32)` of flat integer indices.

  `symbols` is the int32 `flat - lo`, the range coder's input, `counts`
  their histogram over `[0, max - min]` and `crc32` is `indices_crc32(flat)`.
  The histogram and the CRC32 run together over cache-sized chunks:
  `np.bincount` casts its input to int64 and the CRC32 needs the indices as
  int16, and for a whole tensor that means two large temporary arrays
  (measured: 7 ms instead of 17 ms for 3.2M indices).
  """
  lo, hi = int(flat.min()), int(flat.max())
  if hi - lo + 1 > 2**16:
    raise ValueError(
        f"`indices` must span at most 65536 levels, but they span "
        f"[{lo}, {hi}] = {hi - lo + 1} levels.")
  _check_int16_span(lo, hi - lo + 1)
  symbols = np.empty(flat.size, dtype=np.int32)
  counts = np.zeros(hi - lo + 1, dtype=np.int64)
  crc = 0
  for start in range(0, flat.size, _CHUNK):
    stop = start + _CHUNK
    chunk = np.subtract(flat[start:stop], np.int32(lo),
                        out=symbols[start:stop])
    counts += np.bincount(chunk, minlength=hi - lo + 1)
    crc = zlib.crc32(np.ascontiguousarray(flat[start:stop], dtype="<i2"),
                     crc)
  return lo, symbols, counts, crc


def _entropy_of_counts(counts):
  counts = np.asarray(counts, dtype=np.float64)
  counts = counts[counts > 0]
  total = counts.sum()
  p = counts / total
  return max(0.0, float(-(p * np.log2(p)).sum()))


def empirical_entropy(indices):
  """Empirical entropy `H` of integer `indices`, in bits per index.

  `H = -sum_i p_i log2 p_i` with `p_i` the relative frequency of level `i`;
  `N * H / 8` bytes is the ideal size of the tensor under an i.i.d. code with
  its own PMF, the yardstick of `encode_indices`.
  """
  flat = _flat_indices(indices)
  lo, hi = int(flat.min()), int(flat.max())
  if hi - lo < 2**20:
    counts = np.bincount(flat.astype(np.int64) - lo)
  else:
    _, counts = np.unique(flat, return_counts=True)
  return _entropy_of_counts(counts)


# -----------------------------------------------------------------------------
# Coding tables.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class CodingTable:
  """A quantized PMF over the levels `offset, ..., offset + len(freqs) - 1`.

  `freqs[k]` is level `offset + k`'s probability times `2**precision`: the
  frequencies are non-negative integers summing to `2**precision`, the first
  and last positive (the table spans exactly the tensor's `[min, max]`), and a
  zero marks a level the tensor never uses.  The range coder's CDF is
  `[0, cumsum(freqs)]`.  A single-level table (`freqs == [2**precision]`)
  describes a constant tensor, which codes to an empty payload.

  Attributes:
    offset: Integer, the first level (the tensor's smallest index).
    precision: Integer from 1 to 16.
    freqs: Read-only int64 vector of the quantized frequencies.
    crc32: CRC32 of the coded indices (`indices_crc32`), checked by
      `decode_indices`; `None` skips the check (not allowed in a container).
  """
  offset: int
  precision: int
  freqs: np.ndarray
  crc32: int | None = None

  def __post_init__(self):
    freqs = np.array(self.freqs)
    if freqs.dtype.kind not in "iu":
      raise FormatError(f"table: frequencies must be integers, found dtype "
                        f"{freqs.dtype}")
    freqs = freqs.astype(np.int64).reshape(-1)
    freqs.setflags(write=False)
    object.__setattr__(self, "freqs", freqs)

  @property
  def num_levels(self):
    return int(self.freqs.size)

  @property
  def cdf(self):
    """The int32 CDF `[0, f0, f0 + f1, ..., 2**precision]`."""
    return np.concatenate([[0], np.cumsum(self.freqs)]).astype(np.int32)

  @property
  def lookup(self):
    """The table in tensorflow-compression's `lookup` layout."""
    return np.concatenate([[self.precision], self.cdf]).astype(np.int32)

  def __eq__(self, other):
    if not isinstance(other, CodingTable):
      return NotImplemented
    return (self.offset == other.offset and
            self.precision == other.precision and
            np.array_equal(self.freqs, other.freqs) and
            self.crc32 == other.crc32)

  def __repr__(self):
    crc = "None" if self.crc32 is None else f"{self.crc32:#010x}"
    return (f"CodingTable(offset={self.offset}, precision={self.precision}, "
            f"freqs={self.freqs.tolist()}, crc32={crc})")


def indices_crc32(indices):
  """CRC32 of integer indices as little-endian int16, in C order.

  Indices must lie in the int16 range (every `CodingTable` level does).
  """
  return zlib.crc32(np.ascontiguousarray(indices, dtype="<i2").reshape(-1))


def _check_table(table, where="table"):
  """Raises `FormatError` unless `table` is a valid `CodingTable`."""
  if not isinstance(table, CodingTable):
    raise FormatError(f"{where}: expected a CodingTable, found "
                      f"{type(table).__name__}")
  if not _is_int(table.precision) or not 1 <= table.precision <= 16:
    raise FormatError(f"{where}: precision: expected 1 to 16, found "
                      f"{table.precision!r}")
  if not _is_int(table.offset) or not -2**15 <= table.offset < 2**15:
    raise FormatError(f"{where}: offset: expected an int16, found "
                      f"{table.offset!r}")
  if table.crc32 is not None and (not _is_int(table.crc32) or
                                  not 0 <= table.crc32 < 2**32):
    raise FormatError(f"{where}: crc32: expected a uint32 or None, found "
                      f"{table.crc32!r}")
  freqs = table.freqs
  total = 1 << int(table.precision)
  if not 1 <= freqs.size <= min(total, 2**16 - 1):
    raise FormatError(
        f"{where}: expected 1 to {min(total, 2**16 - 1)} levels at precision "
        f"{table.precision}, found {freqs.size}")
  if table.offset + freqs.size - 1 >= 2**15:
    raise FormatError(
        f"{where}: last level {table.offset + freqs.size - 1} is outside "
        f"int16")
  negative = np.flatnonzero(freqs < 0)
  if negative.size:
    k = int(negative[0])
    raise FormatError(
        f"{where}: the CDF is not monotone: frequency of level "
        f"{table.offset + k} is {int(freqs[k])} < 0")
  if freqs[0] == 0 or freqs[-1] == 0:
    raise FormatError(
        f"{where}: first and last level must have positive frequency (the "
        f"table spans exactly [min, max] of its tensor), found "
        f"{int(freqs[0])} and {int(freqs[-1])}")
  if int(freqs.sum()) != total:
    raise FormatError(
        f"{where}: frequencies sum to {int(freqs.sum())}, expected "
        f"2**{table.precision} = {total}")


def _quantize_counts(counts, precision):
  """Integer frequencies summing to `2**precision`, zero where counts are 0.

  Uses `tfc.pmf_to_quantized_cdf`, which gives every level at least one unit,
  even a level the tensor never uses; those units are handed back, one at a
  time, to the used level whose code length shrinks most from one more unit
  (`count * log2((f + 1) / f)`, the op's own greedy rule).  For a sparse
  tensor whose levels have gaps this matters: at H = 0.012 bits and two gaps
  of ~250 unused levels, it turned a 45% overhead into 0%.
  """
  counts = np.asarray(counts, dtype=np.int64)
  total = 1 << precision
  if counts.size == 1:
    return np.array([total], dtype=np.int64)
  pmf = counts / counts.sum()
  # On the CPU: `_build_table` enters the device scope once for all
  # precisions (entering it costs about as much as the op).
  cdf = tfc.pmf_to_quantized_cdf(
      tf.constant(pmf, tf.float32), precision=precision).numpy()
  freqs = np.diff(cdf.astype(np.int64))
  unused = counts == 0
  spare = int(freqs[unused].sum())
  freqs[unused] = 0
  if spare:
    heap = [(-c * math.log2((f + 1) / f), k)
            for k, (c, f) in enumerate(zip(counts.tolist(), freqs.tolist()))
            if c > 0]
    heapq.heapify(heap)
    for _ in range(spare):
      _, k = heapq.heappop(heap)
      freqs[k] += 1
      f = int(freqs[k])
      heapq.heappush(heap, (-int(counts[k]) * math.log2((f + 1) / f), k))
  if int(freqs.sum()) != total or (freqs[counts > 0] <= 0).any():
    raise AssertionError(  # An invariant of the op, checked to never ship it.
        f"pmf_to_quantized_cdf gave frequencies {freqs.tolist()} for counts "
        f"{counts.tolist()}")
  return freqs


def _table_size(freqs):
  """Bytes of a serialised table (see `_table_bytes`)."""
  # Varints of 1, 2 or 3 bytes (frequencies are at most 2**16 < 2**21).
  return _TABLE_HEAD.size + freqs.size + int(
      np.count_nonzero(freqs >= 1 << 7) + np.count_nonzero(freqs >= 1 << 14))


def _choose_precision(counts):
  """The precision in `PRECISIONS` minimising payload + table bytes.

  The payload of precision `p` is estimated as its model cost
  `sum_i count_i * (p - log2 f_i) / 8` plus 2 bytes (tfc's coder was measured
  within 0.01% of it), and only precisions whose estimate stays within
  `_PAYLOAD_SLACK` of `N * H / 8` compete; 16 always does.
  Returns `(precision, freqs)`.
  """
  used = counts > 0
  ideal = float(counts.sum()) * _entropy_of_counts(counts) / 8
  best = None
  for precision in PRECISIONS:
    if counts.size > 1 << precision:
      continue
    freqs = _quantize_counts(counts, precision)
    payload = float(
        (counts[used] * (precision - np.log2(freqs[used]))).sum()) / 8 + 2
    scale, extra = _PAYLOAD_SLACK
    if precision < PRECISIONS[-1] and payload > ideal * scale + extra:
      continue
    total = payload + _table_size(freqs)
    if best is None or total < best[0]:
      best = (total, precision, freqs)
  return best[1], best[2]


def _check_int16_span(lo, levels):
  if not -2**15 <= lo or lo + levels - 1 >= 2**15:
    raise ValueError(
        f"`indices` must lie in the int16 range [-32768, 32767], but they "
        f"span [{lo}, {lo + levels - 1}].")


def _build_table(lo, counts, precision, crc32=None):
  """The table of a histogram `counts` starting at level `lo`."""
  _check_int16_span(lo, counts.size)
  if counts.size > 1 << (precision or PRECISIONS[-1]):
    precision = precision or PRECISIONS[-1]
    raise ValueError(
        f"`indices` span {counts.size} levels [{lo}, {lo + counts.size - 1}], "
        f"more than the 2**{precision} = {1 << precision} a table of "
        f"`precision`={precision} can hold.")
  with tf.device("/cpu:0"):
    if precision is None:
      precision, freqs = _choose_precision(counts)
    else:
      freqs = _quantize_counts(counts, precision)
  return CodingTable(lo, precision, freqs, crc32)


def build_table(indices, precision=None):
  """The `CodingTable` of `indices`: their own PMF over `[min, max]`.

  Args:
    indices: Non-empty integer array.
    precision: `None` to choose the precision in `PRECISIONS` that minimises
      payload + table bytes while keeping the payload near `N * H / 8`; or
      an integer from 1 to 16 with `2**precision >= max - min + 1`.

  Returns:
    A `CodingTable` whose frequencies are the empirical PMF of `indices`
    quantized to `precision` bits (unused levels inside the span get 0), and
    whose `crc32` is `indices_crc32(indices)`.
  """
  precision = _check_precision(precision)
  flat = _flat_indices(indices)
  lo, _, counts, crc = _symbols_and_counts(flat)
  return _build_table(lo, counts, precision, crc)


# -----------------------------------------------------------------------------
# Range coding.
# -----------------------------------------------------------------------------
def _range_encode(symbols, table):
  """Range-codes int32 `symbols` (indices minus `table.offset`)."""
  with tf.device("/cpu:0"):
    handle = tfc.create_range_encoder([], tf.constant(table.lookup))
    handle = tfc.entropy_encode_channel(handle, tf.constant(symbols))
    return tfc.entropy_encode_finalize(handle).numpy()


def encode_indices(indices, precision=None):
  """Range-codes integer `indices` against their own empirical PMF.

  The table is `build_table(indices, precision)`; all indices go into one
  range-coder stream (`tfc.entropy_encode_channel` with a single CDF), in
  C order.  A constant tensor (one level) codes to an empty payload.

  With `precision=None` the table's precision is chosen per tensor to
  minimise payload + table bytes, among the precisions whose payload stays
  within `N * H / 8 * 1.005 + 32` bytes (the tested guarantee); at 16 bits the
  payload was measured within `N * H / 8 * 1.0001 + 2` bytes for H from 0.001
  to 8 bits (docs/FORMAT.md).

  Args:
    indices: Non-empty integer array of any shape, at most `MAX_ELEMENTS`
      elements, spanning at most `2**precision` levels inside int16.
    precision: `None` (automatic) or an integer from 1 to 16, the CDF's
      precision in bits.

  Returns:
    `(payload, table)`: the coded bytes and the `CodingTable` to decode them
    (which also holds the indices' CRC32).

  Raises:
    TypeError: `indices` is not an integer array.
    ValueError: `indices` is empty or too large, or `precision` is invalid.
  """
  precision = _check_precision(precision)
  flat = _flat_indices(indices)
  lo, symbols, counts, crc = _symbols_and_counts(flat)
  table = _build_table(lo, counts, precision, crc)
  if table.num_levels == 1:
    return b"", table
  return _range_encode(symbols, table), table


def _check_shape(shape, name="shape"):
  if _is_int(shape):
    shape = (shape,)
  try:
    shape = tuple(operator.index(d) for d in shape)
  except TypeError:
    raise TypeError(f"`{name}` must be a sequence of integers, but got "
                    f"{shape!r}.") from None
  if any(d < 0 for d in shape):
    raise ValueError(f"`{name}` must have non-negative dimensions, but got "
                     f"{shape}.")
  return shape


def _max_payload_bytes(count, precision):
  """An upper bound on the payload of `count` symbols.

  tfc's range coder keeps its range `size >= 2**16 >= 2**p`, so a symbol of
  frequency `f >= 1` leaves at least `floor(size * f / 2**p) >=
  size * f / 2**(p + 1)`: each symbol costs at most `p + 1` bits of range.
  The coder emits 16 bits per renormalisation, which multiplies the range by
  more than 2**16, so it emits at most the total cost, plus at most 2 bytes
  when it finalises.  8 bytes of slack on top.
  """
  return (count * (precision + 1) + 7) // 8 + 8


def _check_crc(indices, table, shape):
  if table.crc32 is None:
    return
  actual = indices_crc32(indices)
  if actual != table.crc32:
    raise FormatError(
        f"payload: the decoded indices have CRC32 {actual:#010x}, the table "
        f"records {table.crc32:#010x}: the payload is corrupt or shape "
        f"{shape} is not the encoded shape")


def decode_indices(payload, table, shape, *, max_elements=None):
  """Decodes `encode_indices`' payload back to the integer indices.

  The range decoder itself decodes any bytes to *some* symbols, so this
  checks what it can: the table is valid, the payload is not longer than
  `prod(shape)` symbols can take, the decoder ends exactly at the end of the
  payload (`tfc.entropy_decode_finalize`), and, the check that matters, the
  decoded indices have the CRC32 the table records (`table.crc32`; skipped if
  it is `None`).  This catches a corrupt payload or table and a `shape` other
  than the encoded one, up to CRC32's 2**-32 chance.

  Args:
    payload: Bytes from `encode_indices`.
    table: The `CodingTable` from `encode_indices`.
    shape: The shape to decode; `prod(shape)` symbols are decoded.
    max_elements: Optional cap on `prod(shape)`.  A constant tensor codes to
      zero bytes, so the output size is not bounded by the payload size:
      set this when decoding untrusted data.

  Returns:
    An int32 array of `shape`.

  Raises:
    FormatError: The table, the payload or `shape` is inconsistent.
    ValueError: `shape` is empty or too large.
  """
  shape = _check_shape(shape)
  count = _prod(shape)
  if count == 0:
    raise ValueError(f"`shape` must have at least one element, but got "
                     f"{shape}: empty tensors are not coded.")
  limit = MAX_ELEMENTS if max_elements is None else min(
      int(max_elements), MAX_ELEMENTS)
  if count > limit:
    raise ValueError(f"`shape` {shape} has {count} elements, more than the "
                     f"limit of {limit} (`max_elements` or the range coder's "
                     f"int32 limit).")
  if not isinstance(payload, (bytes, bytearray, memoryview)):
    raise TypeError(f"`payload` must be bytes, but got "
                    f"{type(payload).__name__}.")
  payload = bytes(payload)
  _check_table(table)
  if table.num_levels == 1:
    if payload:
      raise FormatError(
          f"payload: a single-level (constant) table codes to 0 bytes, "
          f"found {len(payload)}")
    indices = np.full(shape, table.offset, dtype=np.int32)
    _check_crc(indices, table, shape)
    return indices
  bound = _max_payload_bytes(count, table.precision)
  if len(payload) > bound:
    raise FormatError(
        f"payload: {len(payload)} bytes, but {count} symbols at precision "
        f"{table.precision} take at most {bound}: shape {shape} does not "
        f"match the payload")
  lookup = tf.constant(table.lookup)
  try:
    with tf.device("/cpu:0"):
      handle = tfc.create_range_decoder(tf.constant(payload), lookup)
      handle, symbols = tfc.entropy_decode_channel(handle, [count], tf.int32)
      ended = bool(tfc.entropy_decode_finalize(handle).numpy())
  except tf.errors.OpError as e:
    raise FormatError(f"payload: the range decoder failed: {e.message}") from e
  if not ended:
    raise FormatError(
        f"payload: the range decoder did not end at the end of the "
        f"{len(payload)}-byte payload after {count} symbols: the payload is "
        f"corrupt or shape {shape} is not the encoded shape")
  # `np.asarray` reads the tensor in place (`.numpy()` would copy it first).
  indices = np.add(np.asarray(symbols), np.int32(table.offset))
  _check_crc(indices, table, shape)
  return indices.reshape(shape)


# -----------------------------------------------------------------------------
# Records.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, eq=False)
class Record:
  """One stored tensor of a `.cdl` container.

  Build records with `quantized_record` and `float_record`; read their values
  with `decode_record` / `dequantize_record`.  Fields are normalised on
  construction (shape to a tuple, step to a read-only float32 array, alpha and
  kappa to float32-representable floats, a negative channel axis to its
  positive form) and validated by `validate_record`, which every writer and
  reader calls.

  Attributes:
    name: Unique non-empty name, e.g. the Keras weight's path.
    kind: "quantized" (integer indices times step sizes) or "float".
    shape: Tuple of the tensor's dimensions.
    dtype: The dtype to restore the tensor as, one of `DTYPES`.
    bits: Quantized only: bit width, 2 to 8.
    signed: Quantized only: `True` for the narrow symmetric signed index
      range, `False` for `[0, 2**bits - 1]` (see `index_range`).
    step: Quantized only: float32 step size `q`, a scalar, or a vector of
      `shape[channel_axis]` per-channel steps.
    channel_axis: Quantized only: `None` for one step, else the axis the step
      vector runs along.
    alpha: Quantized only, optional: the CPMF hardness `alpha`.
    kappa: Quantized only, optional: `kappa = alpha * q**2`.
    table: Quantized only: the `CodingTable` of the payload.
    payload: Quantized: the range-coded indices; float: the tensor as raw
      little-endian float32, C order.
  """
  name: str
  kind: str
  shape: tuple
  dtype: str = "float32"
  bits: int | None = None
  signed: bool | None = None
  step: np.ndarray | None = None
  channel_axis: int | None = None
  alpha: float | None = None
  kappa: float | None = None
  table: CodingTable | None = None
  payload: bytes = b""

  def __post_init__(self):
    setattr_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731
    setattr_("shape", _check_shape(self.shape))
    if self.step is not None:
      step = np.array(self.step, dtype=np.float32)
      step.setflags(write=False)
      setattr_("step", step)
    for key in ("alpha", "kappa"):
      value = getattr(self, key)
      if value is not None:
        setattr_(key, float(np.float32(value)))
    if isinstance(self.signed, np.bool_):
      setattr_("signed", bool(self.signed))
    if _is_int(self.bits):
      setattr_("bits", int(self.bits))
    axis = self.channel_axis
    if _is_int(axis):
      axis = int(axis)
      if -len(self.shape) <= axis < 0:
        axis += len(self.shape)
      setattr_("channel_axis", axis)
    if isinstance(self.payload, (bytearray, memoryview)):
      setattr_("payload", bytes(self.payload))

  @property
  def count(self):
    """The number of elements, `prod(shape)`."""
    return _prod(self.shape)

  def __eq__(self, other):
    if not isinstance(other, Record):
      return NotImplemented
    same_step = (self.step is None and other.step is None) or (
        self.step is not None and other.step is not None and
        self.step.shape == other.step.shape and
        np.array_equal(self.step, other.step))
    return (same_step and
            all(getattr(self, f.name) == getattr(other, f.name)
                for f in dataclasses.fields(self) if f.name != "step"))

  def __repr__(self):
    if self.kind == "quantized":
      step = self.step
      if step is not None:
        step = step.tolist() if step.size <= 4 else (
            f"<{step.size} steps in [{step.min()}, {step.max()}]>")
      extra = (f", bits={self.bits}, signed={self.signed}, step={step}, "
               f"channel_axis={self.channel_axis}, alpha={self.alpha}, "
               f"kappa={self.kappa}, table={self.table!r}")
    else:
      extra = ""
    return (f"Record(name={self.name!r}, kind={self.kind!r}, "
            f"shape={self.shape}, dtype={self.dtype!r}{extra}, "
            f"payload=<{len(self.payload)} bytes>)")


def _positive_finite(value):
  return isinstance(value, float) and math.isfinite(value) and value > 0


def validate_record(record, where=None):
  """Raises `FormatError` unless `record` is a consistent `Record`.

  Args:
    record: The `Record`.
    where: Prefix of error messages; defaults to `record '<name>'`.
  """
  if not isinstance(record, Record):
    raise FormatError(f"{where or 'record'}: expected a Record, found "
                      f"{type(record).__name__}")
  where = where or f"record {record.name!r}"
  if not isinstance(record.name, str) or not record.name:
    raise FormatError(f"{where}: name: expected a non-empty str, found "
                      f"{record.name!r}")
  try:
    name_bytes = record.name.encode("utf-8")
  except UnicodeEncodeError as e:
    raise FormatError(f"{where}: name: not encodable as UTF-8: {e}") from None
  if len(name_bytes) > 2**16 - 1:
    raise FormatError(f"{where}: name: expected at most 65535 UTF-8 bytes, "
                      f"found {len(name_bytes)}")
  if record.kind not in KINDS:
    raise FormatError(f"{where}: kind: expected one of {KINDS}, found "
                      f"{record.kind!r}")
  if record.dtype not in DTYPES:
    raise FormatError(f"{where}: dtype: expected one of {DTYPES}, found "
                      f"{record.dtype!r}")
  shape = record.shape
  if len(shape) > _MAX_NDIM or any(d > _MAX_DIM for d in shape):
    raise FormatError(f"{where}: shape: expected at most {_MAX_NDIM} "
                      f"dimensions of at most {_MAX_DIM}, found {shape}")
  count = _prod(shape)
  if not isinstance(record.payload, bytes):
    raise FormatError(f"{where}: payload: expected bytes, found "
                      f"{type(record.payload).__name__}")
  quantized_fields = ("bits", "signed", "step", "channel_axis", "alpha",
                      "kappa", "table")
  if record.kind == "float":
    for key in quantized_fields:
      if getattr(record, key) is not None:
        raise FormatError(f"{where}: {key}: a float record has none, found "
                          f"{getattr(record, key)!r}")
    if len(record.payload) != 4 * count:
      raise FormatError(
          f"{where}: payload: expected 4 * {count} = {4 * count} bytes of "
          f"float32 for shape {shape}, found {len(record.payload)}")
    return
  # Quantized.
  if count == 0:
    raise FormatError(f"{where}: shape: a quantized tensor must not be "
                      f"empty, found {shape}")
  if count > MAX_ELEMENTS:
    raise FormatError(f"{where}: shape: expected at most {MAX_ELEMENTS} "
                      f"elements, found {count} in {shape}")
  if not _is_int(record.bits) or not 2 <= record.bits <= 8:
    raise FormatError(f"{where}: bits: expected an integer from 2 to 8, "
                      f"found {record.bits!r}")
  if not isinstance(record.signed, bool):
    raise FormatError(f"{where}: signed: expected a bool, found "
                      f"{record.signed!r}")
  axis = record.channel_axis
  step = record.step
  if step is None:
    raise FormatError(f"{where}: step: a quantized record needs a step size")
  if axis is None:
    if step.shape != ():
      raise FormatError(
          f"{where}: step: expected a scalar without a channel_axis, found "
          f"shape {step.shape}")
  else:
    if not _is_int(axis) or not 0 <= axis < len(shape):
      raise FormatError(
          f"{where}: channel_axis: expected an axis of shape {shape} or "
          f"None, found {axis!r}")
    if step.shape != (shape[axis],):
      raise FormatError(
          f"{where}: step: expected shape ({shape[axis]},) for channel_axis "
          f"{axis} of shape {shape}, found {step.shape}")
  bad = np.flatnonzero(~(np.isfinite(step.reshape(-1)) &
                         (step.reshape(-1) > 0)))
  if bad.size:
    raise FormatError(
        f"{where}: step: expected finite positive values, found "
        f"{float(step.reshape(-1)[bad[0]])} at position {int(bad[0])}")
  for key in ("alpha", "kappa"):
    value = getattr(record, key)
    if value is not None and not _positive_finite(value):
      raise FormatError(f"{where}: {key}: expected a finite positive float "
                        f"or None, found {value!r}")
  _check_table(record.table, f"{where}: table")
  if record.table.crc32 is None:
    raise FormatError(f"{where}: table: crc32: a stored table needs the "
                      f"CRC32 of its indices, found None")
  lo, hi = index_range(record.bits, record.signed)
  first = record.table.offset
  last = first + record.table.num_levels - 1
  if first < lo or last > hi:
    raise FormatError(
        f"{where}: table: levels [{first}, {last}] fall outside the index "
        f"range [{lo}, {hi}] of bits={record.bits}, signed={record.signed}")
  if record.table.num_levels == 1:
    if record.payload:
      raise FormatError(
          f"{where}: payload: a constant tensor codes to 0 bytes, found "
          f"{len(record.payload)}")
  else:
    bound = _max_payload_bytes(count, record.table.precision)
    if len(record.payload) > bound:
      raise FormatError(
          f"{where}: payload: {len(record.payload)} bytes, but {count} "
          f"symbols at precision {record.table.precision} take at most "
          f"{bound}: shape {shape} does not match the payload")


def _check_dtype_arg(dtype):
  if dtype is None:
    return None
  try:
    name = tf.as_dtype(dtype).name
  except TypeError:
    name = str(dtype)
  if name not in DTYPES:
    raise ValueError(f"`dtype` must be one of {DTYPES}, but got {dtype!r}.")
  return name


def quantized_record(name, indices, *, bits, signed, step, channel_axis=None,
                     alpha=None, kappa=None, dtype="float32",
                     precision=None):
  """Range-codes a tensor of integer indices into a quantized `Record`.

  Args:
    name: Unique non-empty record name.
    indices: Non-empty integer array; every index must lie in
      `index_range(bits, signed)`.
    bits: Bit width, 2 to 8.
    signed: Whether the indices use the signed (narrow symmetric) range.
    step: Step size `q > 0`: a scalar, or one per channel along
      `channel_axis`.
    channel_axis: `None` for a scalar step, else the per-channel axis.
    alpha: Optional hardness `alpha > 0` to store.
    kappa: Optional `kappa > 0` to store.
    dtype: The dtype to restore the dequantized tensor as.
    precision: Precision of the coding table in bits, `None` for automatic.

  Returns:
    The `Record`.

  Raises:
    TypeError, ValueError: An argument is invalid; the message names it.
  """
  flat = _flat_indices(indices)
  if not isinstance(signed, (bool, np.bool_)):
    raise TypeError(f"`signed` must be a bool, but got {signed!r}.")
  index_lo, index_hi = index_range(bits, signed)
  lo, hi = int(flat.min()), int(flat.max())
  if lo < index_lo or hi > index_hi:
    bad = int(np.flatnonzero((flat < index_lo) | (flat > index_hi))[0])
    raise ValueError(
        f"`indices` must lie in [{index_lo}, {index_hi}] for bits={bits}, "
        f"signed={signed}, but found {int(flat[bad])} at flat position {bad}.")
  shape = np.shape(indices)
  step_array = np.asarray(step, dtype=np.float32)
  if channel_axis is None:
    if step_array.size != 1:
      raise ValueError(
          f"`step` must be a scalar when `channel_axis` is None, but got "
          f"shape {step_array.shape}; pass `channel_axis` for per-channel "
          f"steps.")
    step_array = step_array.reshape(())
  elif not _is_int(channel_axis) or not -len(shape) <= channel_axis < len(
      shape):
    raise ValueError(f"`channel_axis` must be None or an axis of shape "
                     f"{shape}, but got {channel_axis!r}.")
  elif step_array.shape != (shape[channel_axis],):
    raise ValueError(
        f"`step` must have shape ({shape[channel_axis]},) for channel_axis "
        f"{channel_axis} of shape {shape}, but got {step_array.shape}.")
  if not (np.isfinite(step_array) & (step_array > 0)).all():
    raise ValueError(f"`step` must be finite and positive, but got "
                     f"{step_array.tolist()}.")
  for key, value in (("alpha", alpha), ("kappa", kappa)):
    if value is None:
      continue
    if not (_is_int(value) or isinstance(value, (float, np.floating))):
      raise TypeError(f"`{key}` must be None or a float, but got {value!r}.")
    with np.errstate(over="ignore"):
      value32 = np.float32(value)
    if not (np.isfinite(value32) and value32 > 0):
      raise ValueError(f"`{key}` must be None or a finite positive float32, "
                       f"but got {value!r}.")
  payload, table = encode_indices(indices, precision)
  record = Record(name=name, kind="quantized", shape=shape,
                  dtype=_check_dtype_arg(dtype), bits=bits,
                  signed=bool(signed), step=step_array,
                  channel_axis=channel_axis, alpha=alpha, kappa=kappa,
                  table=table, payload=payload)
  validate_record(record)
  return record


def float_record(name, values, dtype=None):
  """Stores a float tensor as raw little-endian float32 in a `Record`.

  Args:
    name: Unique non-empty record name.
    values: Float array (any float dtype; converted to float32).
    dtype: The dtype to restore it as; defaults to `values`' dtype.

  Returns:
    The `Record`.
  """
  array = np.asarray(values)
  if array.dtype.kind != "f" and array.dtype.name != "bfloat16":
    raise TypeError(f"`values` must be a float array, but got dtype "
                    f"{array.dtype}.")
  dtype = _check_dtype_arg(dtype if dtype is not None else array.dtype.name)
  data = np.ascontiguousarray(array, dtype="<f4").tobytes()
  record = Record(name=name, kind="float", shape=array.shape, dtype=dtype,
                  payload=data)
  validate_record(record)
  return record


def decode_record(record, *, max_elements=None):
  """A record's stored values: int32 indices or float32 floats.

  Args:
    record: A `Record`.
    max_elements: Optional cap on the number of elements; a record with more
      raises `FormatError` before anything is allocated.  Float records are
      bounded by their bytes, but a constant quantized record codes any
      shape (up to `MAX_ELEMENTS`) in zero payload bytes: set this when
      reading untrusted files.

  Returns:
    Quantized: the int32 indices; float: a float32 array; both of
    `record.shape`.

  Raises:
    FormatError: The record is inconsistent or its payload is corrupt.
  """
  where = f"record {getattr(record, 'name', None)!r}"
  validate_record(record, where)
  if max_elements is not None and record.count > max_elements:
    raise FormatError(f"{where}: shape: {record.shape} has {record.count} "
                      f"elements, more than max_elements={max_elements}")
  if record.kind == "float":
    return np.frombuffer(record.payload, dtype="<f4").astype(
        np.float32).reshape(record.shape)
  try:
    return decode_indices(record.payload, record.table, record.shape,
                          max_elements=max_elements)
  except FormatError as e:
    raise FormatError(f"{where}: {e}") from None


def dequantize_record(record, *, max_elements=None):
  """A record's float32 values: `indices * step` (per channel) or the floats.

  Casting to `record.dtype` is left to the caller (bfloat16 is not a NumPy
  dtype).
  """
  values = decode_record(record, max_elements=max_elements)
  if record.kind == "float":
    return values
  step = record.step
  if record.channel_axis is not None:
    shape = [1] * len(record.shape)
    shape[record.channel_axis] = -1
    step = step.reshape(shape)
  return (values.astype(np.float32) * step).astype(np.float32)


# -----------------------------------------------------------------------------
# Serialisation.
# -----------------------------------------------------------------------------
def _varint(value):
  out = bytearray()
  while True:
    byte = value & 0x7F
    value >>= 7
    if value:
      out.append(byte | 0x80)
    else:
      out.append(byte)
      return bytes(out)


def _table_bytes(table):
  parts = [_TABLE_HEAD.pack(table.precision, table.offset, table.num_levels,
                           table.crc32)]
  parts.extend(_varint(int(f)) for f in table.freqs)
  return b"".join(parts)


def _record_body(record):
  """The serialised body of a validated record: (body, table byte count)."""
  name = record.name.encode("utf-8")
  dtype = record.dtype.encode("ascii")
  parts = [struct.pack("<H", len(name)), name,
           struct.pack("<BB", _KIND_CODES[record.kind], len(dtype)), dtype,
           struct.pack("<B", len(record.shape)),
           struct.pack(f"<{len(record.shape)}I", *record.shape)]
  table = b""
  if record.kind == "quantized":
    axis = _NO_AXIS if record.channel_axis is None else record.channel_axis
    steps = record.step.reshape(-1)
    parts += [struct.pack("<BBBI", record.bits, int(record.signed), axis,
                          steps.size),
              steps.astype("<f4").tobytes()]
    extras = ((_EXTRA_ALPHA if record.alpha is not None else 0) |
              (_EXTRA_KAPPA if record.kappa is not None else 0))
    parts.append(struct.pack("<B", extras))
    for value in (record.alpha, record.kappa):
      if value is not None:
        parts.append(struct.pack("<f", value))
    table = _table_bytes(record.table)
    parts.append(table)
  parts += [_LEN.pack(len(record.payload)), record.payload]
  return b"".join(parts), len(table)


def _frame(body):
  """`[length, body, CRC32]` of a record; joined once, by `_seal`."""
  length = _LEN.pack(len(body))
  return [length, body, _CRC.pack(zlib.crc32(body, zlib.crc32(length)))]


def _header_section(json_bytes):
  """`(section bytes, flags)`: the JSON, deflated when that is smaller.

  A Keras architecture shrinks several-fold, which matters next to a few
  kilobytes of coded weights.
  """
  deflated = zlib.compress(json_bytes, 9)
  if len(deflated) < len(json_bytes) and len(json_bytes) <= MAX_HEADER_JSON:
    return deflated, FLAG_DEFLATED_HEADER
  return json_bytes, 0


def _seal(json_bytes, bodies):
  """Assembles a container from the header JSON and record bodies."""
  json_bytes, flags = _header_section(json_bytes)
  frames = [part for body in bodies for part in _frame(body)]
  length = (_PREAMBLE.size + len(json_bytes) + _CRC.size +
            sum(len(f) for f in frames) + _CRC.size)
  head = _PREAMBLE.pack(MAGIC, FORMAT_VERSION, flags, length, len(bodies),
                        len(json_bytes)) + json_bytes
  parts = [head, _CRC.pack(zlib.crc32(head))] + frames
  crc = 0  # The file CRC32, chained over the parts: no joined copy to scan.
  for part in parts:
    crc = zlib.crc32(part, crc)
  parts.append(_CRC.pack(crc))
  return b"".join(parts)


def _header_json(header):
  if not isinstance(header, dict):
    raise TypeError(f"`header` must be a dict, but got "
                    f"{type(header).__name__}.")
  try:
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":"))
  except (TypeError, ValueError) as e:
    raise ValueError(f"`header` must be JSON-serialisable: {e}") from None
  data = text.encode("utf-8")
  if len(data) > 2**32 - 1:
    raise ValueError(f"`header` JSON must be under 4 GiB, got {len(data)} "
                     f"bytes.")
  return data


def encode_container(header, records):
  """Serialises `header` and `records` to `.cdl` bytes (docs/FORMAT.md).

  Args:
    header: A JSON-serialisable dict (e.g. the model's Keras config).
    records: A sequence of `Record`s with unique names.

  Returns:
    The container bytes.

  Raises:
    TypeError, ValueError: `header` is not a JSON-serialisable dict.
    FormatError: A record is invalid or a name repeats.
  """
  json_bytes = _header_json(header)
  records = list(records)
  if len(records) > 2**32 - 1:
    raise ValueError(f"`records` must hold fewer than 2**32 records, got "
                     f"{len(records)}.")
  names = set()
  bodies = []
  for i, record in enumerate(records):
    validate_record(record, f"records[{i}] ({getattr(record, 'name', '?')!r})")
    if record.name in names:
      raise FormatError(f"records[{i}]: name {record.name!r} repeats; record "
                        f"names must be unique")
    names.add(record.name)
    bodies.append(_record_body(record)[0])
  return _seal(json_bytes, bodies)


class _Reader:
  """Bounds-checked little-endian reads from a bytes object."""

  def __init__(self, data, start, end, where):
    self.data = data
    self.pos = start
    self.end = end
    self.where = where

  def take(self, n, what):
    if n > self.end - self.pos:
      raise FormatError(
          f"{self.where}: {what}: needs {n} bytes at offset {self.pos}, only "
          f"{self.end - self.pos} remain")
    chunk = self.data[self.pos:self.pos + n]
    self.pos += n
    return chunk

  def unpack(self, fmt, what):
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, self.take(size, what))

  def one(self, fmt, what):
    return self.unpack(fmt, what)[0]

  def varint(self, what):
    value = 0
    for shift in (0, 7, 14):
      byte = self.one("<B", what)
      value |= (byte & 0x7F) << shift
      if not byte & 0x80:
        if byte == 0 and shift:
          raise FormatError(f"{self.where}: {what}: non-canonical varint")
        return value
    raise FormatError(f"{self.where}: {what}: varint longer than 3 bytes")


def _parse_table(reader):
  precision, offset, levels, crc = reader.unpack(_TABLE_HEAD.format,
                                                 "table header")
  if not 1 <= precision <= 16:
    raise FormatError(f"{reader.where}: table: precision: expected 1 to 16, "
                      f"found {precision}")
  if not 1 <= levels <= 1 << precision:
    raise FormatError(f"{reader.where}: table: expected 1 to 2**{precision} "
                      f"levels, found {levels}")
  # Each frequency takes at least one byte: check before looping.
  if levels > reader.end - reader.pos:
    raise FormatError(
        f"{reader.where}: table: {levels} frequencies need at least {levels} "
        f"bytes at offset {reader.pos}, only {reader.end - reader.pos} remain")
  freqs = [reader.varint(f"table frequency {k}") for k in range(levels)]
  table = CodingTable(offset, precision, np.array(freqs, dtype=np.int64),
                      crc)
  _check_table(table, f"{reader.where}: table")
  return table


def _parse_record(data, start, end, where):
  reader = _Reader(data, start, end, where)
  name_len = reader.one("<H", "name length")
  raw_name = reader.take(name_len, "name")
  try:
    name = raw_name.decode("utf-8")
  except UnicodeDecodeError as e:
    raise FormatError(f"{where}: name: not valid UTF-8: {e}") from None
  where = reader.where = f"{where} ({name!r})"
  kind_code, dtype_len = reader.unpack("<BB", "kind and dtype length")
  kinds = {v: k for k, v in _KIND_CODES.items()}
  if kind_code not in kinds:
    raise FormatError(f"{where}: kind: expected 0 (float) or 1 (quantized), "
                      f"found {kind_code}")
  kind = kinds[kind_code]
  try:
    dtype = reader.take(dtype_len, "dtype").decode("ascii")
  except UnicodeDecodeError:
    dtype = None
  if dtype not in DTYPES:
    raise FormatError(f"{where}: dtype: expected one of {DTYPES}, found "
                      f"{dtype!r}")
  ndim = reader.one("<B", "ndim")
  if ndim > _MAX_NDIM:
    raise FormatError(f"{where}: ndim: expected at most {_MAX_NDIM}, found "
                      f"{ndim}")
  shape = reader.unpack(f"<{ndim}I", "shape")
  fields = dict(name=name, kind=kind, shape=shape, dtype=dtype)
  if kind == "quantized":
    bits, signed, axis, step_count = reader.unpack("<BBBI",
                                                   "quantization header")
    if signed not in (0, 1):
      raise FormatError(f"{where}: signed: expected 0 or 1, found {signed}")
    steps = np.frombuffer(reader.take(4 * step_count, "step sizes"),
                          dtype="<f4").astype(np.float32)
    if axis == _NO_AXIS:
      if step_count != 1:
        raise FormatError(f"{where}: step: expected 1 step size without a "
                          f"channel axis, found {step_count}")
      steps = steps.reshape(())
    extras = reader.one("<B", "extras flags")
    if extras & ~(_EXTRA_ALPHA | _EXTRA_KAPPA):
      raise FormatError(f"{where}: extras flags: unknown bits in "
                        f"{extras:#04x}")
    alpha = reader.one("<f", "alpha") if extras & _EXTRA_ALPHA else None
    kappa = reader.one("<f", "kappa") if extras & _EXTRA_KAPPA else None
    fields.update(bits=bits, signed=bool(signed), step=steps,
                  channel_axis=None if axis == _NO_AXIS else axis,
                  alpha=alpha, kappa=kappa, table=_parse_table(reader))
  payload_len = reader.one("<Q", "payload length")
  fields["payload"] = reader.take(payload_len, "payload")
  if reader.pos != end:
    raise FormatError(f"{where}: {end - reader.pos} unexpected bytes after "
                      f"the payload")
  try:
    record = Record(**fields)
  except (TypeError, ValueError) as e:
    raise FormatError(f"{where}: {e}") from None
  validate_record(record, where)
  return record


def _check_preamble(data):
  """Checks magic, version, flags, length and the file CRC; returns counts."""
  if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
    if MAGIC.startswith(data[:len(MAGIC)]) and len(data) < len(MAGIC):
      raise FormatError(f"truncated: {len(data)} bytes, a .cdl file has at "
                        f"least {_MIN_FILE}")
    raise FormatError(f"not a .cdl file: magic: expected {MAGIC!r}, found "
                      f"{bytes(data[:len(MAGIC)])!r}")
  if len(data) < _MIN_FILE:
    raise FormatError(f"truncated: {len(data)} bytes, a .cdl file has at "
                      f"least {_MIN_FILE}")
  magic, version, flags, length, count, json_len = _PREAMBLE.unpack_from(data)
  if version != FORMAT_VERSION:
    raise FormatError(f"unsupported format version {version}: this reader "
                      f"reads version {FORMAT_VERSION}")
  if flags & ~FLAG_DEFLATED_HEADER:
    raise FormatError(f"preamble: flags: unknown bits in {flags:#06x} (known: "
                      f"{FLAG_DEFLATED_HEADER:#06x}, deflated header)")
  if length != len(data):
    what = "truncated" if len(data) < length else "trailing bytes"
    raise FormatError(f"{what}: the preamble declares {length} bytes, found "
                      f"{len(data)}")
  stored, = _CRC.unpack_from(data, len(data) - _CRC.size)
  actual = zlib.crc32(memoryview(data)[:len(data) - _CRC.size])
  if stored != actual:
    raise FormatError(f"file CRC32 mismatch: stored {stored:#010x}, computed "
                      f"{actual:#010x}: the file is corrupt")
  return count, json_len, flags


def _inflate_header(json_bytes):
  """Inflates a deflated header section, bounded by `MAX_HEADER_JSON`."""
  inflater = zlib.decompressobj()
  try:
    out = inflater.decompress(json_bytes, MAX_HEADER_JSON + 1)
  except zlib.error as e:
    raise FormatError(f"header: deflated JSON: {e}") from None
  if len(out) > MAX_HEADER_JSON or inflater.unconsumed_tail:
    raise FormatError(f"header: deflated JSON inflates beyond "
                      f"{MAX_HEADER_JSON} bytes")
  if not inflater.eof or inflater.unused_data:
    raise FormatError("header: deflated JSON: the zlib stream is truncated "
                      "or followed by extra bytes")
  return out


def decode_container(data):
  """Parses `.cdl` bytes into `(header, records)`, validating everything.

  The checks run in this order: magic, version, flags, declared length
  against the actual length, the file CRC32, then the header section (its
  CRC32, UTF-8, JSON object) and each record (length against the bytes left,
  its CRC32, then every field, see `validate_record`), and finally that no
  bytes follow the last record.  Payloads are not decoded here: use
  `decode_record`.

  Args:
    data: Bytes-like.

  Returns:
    `(header, records)`: the header dict and the list of `Record`s.

  Raises:
    FormatError: Anything is wrong; the message says what and where.
  """
  if not isinstance(data, (bytes, bytearray, memoryview)):
    raise TypeError(f"`data` must be bytes-like, but got "
                    f"{type(data).__name__}; use `read_container` for paths.")
  data = bytes(data)
  count, json_len, flags = _check_preamble(data)
  view = memoryview(data)  # CRC32s over slices without copying them.
  end = len(data) - _CRC.size
  reader = _Reader(data, _PREAMBLE.size, end, "header")
  json_bytes = reader.take(json_len, "JSON")
  stored = reader.one("<I", "header CRC32")
  actual = zlib.crc32(view[:_PREAMBLE.size + json_len])
  if stored != actual:
    raise FormatError(f"header: CRC32 mismatch: stored {stored:#010x}, "
                      f"computed {actual:#010x}")
  if flags & FLAG_DEFLATED_HEADER:
    json_bytes = _inflate_header(json_bytes)
  try:
    header = json.loads(json_bytes.decode("utf-8"))
  except (UnicodeDecodeError, ValueError, RecursionError) as e:
    raise FormatError(f"header: JSON: not valid UTF-8 JSON: "
                      f"{type(e).__name__}: {e}") from None
  if not isinstance(header, dict):
    raise FormatError(f"header: JSON: expected an object, found "
                      f"{type(header).__name__}")
  if count > (end - reader.pos) // _MIN_RECORD:
    raise FormatError(
        f"header: record count: {count} records need at least "
        f"{count * _MIN_RECORD} bytes, only {end - reader.pos} remain")
  records = []
  names = set()
  for i in range(count):
    where = f"record {i}"
    reader.where = where
    body_len = reader.one("<Q", "record length")
    if body_len > end - reader.pos - _CRC.size:
      raise FormatError(
          f"{where}: record length {body_len} runs past the end: only "
          f"{max(0, end - reader.pos - _CRC.size)} bytes remain")
    body_start = reader.pos
    reader.pos += body_len  # In bounds: checked above.
    stored = reader.one("<I", "record CRC32")
    actual = zlib.crc32(view[body_start - _LEN.size:body_start + body_len])
    if stored != actual:
      raise FormatError(f"{where}: CRC32 mismatch: stored {stored:#010x}, "
                        f"computed {actual:#010x}")
    record = _parse_record(data, body_start, body_start + body_len, where)
    if record.name in names:
      raise FormatError(f"{where}: name {record.name!r} repeats; record names "
                        f"must be unique")
    names.add(record.name)
    records.append(record)
  if reader.pos != end:
    raise FormatError(f"{end - reader.pos} unexpected bytes after record "
                      f"{count - 1}")
  return header, records


def write_container(path_or_fileobj, header, records):
  """Writes a `.cdl` container; returns the number of bytes written.

  A path is written atomically (to a temporary file, then renamed).
  """
  return write_bytes(path_or_fileobj, encode_container(header, records))


def write_bytes(path_or_fileobj, data):
  """Writes `data` to a file object, or atomically to a path; returns its size.

  A path is written to a temporary file beside it, then renamed, so a crash
  never leaves a half-written `.cdl` file under the real name.
  """
  if hasattr(path_or_fileobj, "write"):
    path_or_fileobj.write(data)
    return len(data)
  path = os.fspath(path_or_fileobj)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return len(data)


def read_container(path_or_bytes):
  """Reads a `.cdl` container: `decode_container` of a path, file or bytes."""
  if isinstance(path_or_bytes, (bytes, bytearray, memoryview)):
    return decode_container(path_or_bytes)
  if hasattr(path_or_bytes, "read"):
    return decode_container(path_or_bytes.read())
  with open(os.fspath(path_or_bytes), "rb") as f:
    return decode_container(f.read())


# -----------------------------------------------------------------------------
# Size accounting.
# -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorSize:
  """The bytes one record takes in a container.

  Attributes:
    name, kind, count: The record's name, kind and element count.
    payload_bytes: Range-coded indices (quantized) or raw float32 (float).
    table_bytes: The coding table (0 for float records).
    header_bytes: Everything else of the record: its length, CRC32, name,
      dtype, shape, bits, step sizes, alpha/kappa and payload length.
    entropy_bytes: Quantized: the ideal `N * H / 8`, `H` the empirical
      entropy of the indices in bits; float: `None`.
  """
  name: str
  kind: str
  count: int
  payload_bytes: int
  table_bytes: int
  header_bytes: int
  entropy_bytes: float | None

  @property
  def record_bytes(self):
    """Payload + table + header: the record's bytes in the file."""
    return self.payload_bytes + self.table_bytes + self.header_bytes


@dataclasses.dataclass(frozen=True)
class SizeReport:
  """Sizes of a container: per tensor and in total.

  The three sizes of docs/cdl-method section 6 are `quantized_payload_bytes`
  (coded indices only), `record_bytes` (all records: payloads, tables and
  record headers, floats included) and `file_bytes` (the whole file:
  `record_bytes + container_bytes`).
  """
  tensors: tuple
  container_bytes: int  # Preamble, header JSON, header CRC, file CRC.
  file_bytes: int

  def _sum(self, key, kind=None):
    return sum(getattr(t, key) for t in self.tensors
               if kind is None or t.kind == kind)

  @property
  def quantized_payload_bytes(self):
    return self._sum("payload_bytes", "quantized")

  @property
  def float_bytes(self):
    return self._sum("payload_bytes", "float")

  @property
  def table_bytes(self):
    return self._sum("table_bytes")

  @property
  def header_bytes(self):
    return self._sum("header_bytes")

  @property
  def record_bytes(self):
    return self._sum("record_bytes")

  @property
  def entropy_bytes(self):
    """Sum of `N * H / 8` over the quantized tensors."""
    return float(sum(t.entropy_bytes for t in self.tensors
                     if t.entropy_bytes is not None))


def tensor_size(record, indices=None):
  """The `TensorSize` of one record.

  Args:
    record: A `Record`.
    indices: Optional, the record's indices if the caller has them; else a
      quantized record is decoded to measure its empirical entropy.
  """
  validate_record(record)
  if indices is not None and np.shape(indices) != record.shape:
    raise ValueError(f"`indices` must have the record's shape {record.shape}, "
                     f"but got {np.shape(indices)}.")
  body, table_bytes = _record_body(record)
  framed = len(body) + _LEN.size + _CRC.size
  entropy = None
  if record.kind == "quantized":
    if indices is None:
      indices = decode_record(record)
    entropy = record.count * empirical_entropy(indices) / 8
  return TensorSize(
      name=record.name, kind=record.kind, count=record.count,
      payload_bytes=len(record.payload), table_bytes=table_bytes,
      header_bytes=framed - table_bytes - len(record.payload),
      entropy_bytes=entropy)


def container_sizes(header, records, indices=None):
  """The `SizeReport` of the container `encode_container(header, records)`.

  Args:
    header: The header dict.
    records: The `Record`s.
    indices: Optional dict from record name to its indices, to skip decoding.
  """
  indices = indices or {}
  tensors = tuple(tensor_size(r, indices.get(r.name)) for r in records)
  section, _ = _header_section(_header_json(header))
  container = _PREAMBLE.size + len(section) + 2 * _CRC.size
  return SizeReport(tensors=tensors, container_bytes=container,
                    file_bytes=container + sum(t.record_bytes
                                               for t in tensors))
