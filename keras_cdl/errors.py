"""Exceptions of keras_cdl."""

__all__ = ["FormatError"]


class FormatError(ValueError):
  """Malformed `.cdl` data: a container, a record, a coding table or a payload.

  The message names what is wrong: which record or tensor, which field, what
  was expected and what was found, e.g.
  `record 2 ('dense/kernel'): table: frequencies sum to 65535, expected
  2**16 = 65536`.  Subclasses `ValueError`, so callers that already handle bad
  values keep working.
  """
