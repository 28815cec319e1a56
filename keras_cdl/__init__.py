"""keras_cdl: Coded Deep Learning for TensorFlow/Keras.

Quantize a Keras model with the CDL probabilistic quantizer, train it with
entropy (rate) terms on weights and activations, and store it entropy coded.
"""

from keras_cdl import coding
from keras_cdl import compress
from keras_cdl import errors
from keras_cdl import export
from keras_cdl import introspect
from keras_cdl import layers
from keras_cdl import ops
from keras_cdl import rate
from keras_cdl.compress import decompress
from keras_cdl.compress import print_size_report
from keras_cdl.compress import size_report
from keras_cdl.configs import CDLQuantizeConfig
from keras_cdl.distribute import communication_cost
from keras_cdl.errors import FormatError
from keras_cdl.model import CDLModel
from keras_cdl.quantize import initialize_step_sizes
from keras_cdl.quantize import quantize_annotate_layer
from keras_cdl.quantize import quantize_model
from keras_cdl.quantize import quantize_scope
from keras_cdl.quantize import set_rate_weights
from keras_cdl.quantizers import CDLActivationQuantizer
from keras_cdl.quantizers import CDLQuantizer
from keras_cdl.quantizers import CDLWeightQuantizer
from keras_cdl.scheme import CDLQuantizeScheme

__version__ = "0.1.0"

__all__ = [
    "CDLActivationQuantizer",
    "CDLModel",
    "CDLQuantizeConfig",
    "CDLQuantizeScheme",
    "CDLQuantizer",
    "CDLWeightQuantizer",
    "FormatError",
    "coding",
    "communication_cost",
    "compress",
    "decompress",
    "errors",
    "export",
    "initialize_step_sizes",
    "introspect",
    "layers",
    "ops",
    "print_size_report",
    "quantize_annotate_layer",
    "quantize_model",
    "quantize_scope",
    "rate",
    "set_rate_weights",
    "size_report",
]
