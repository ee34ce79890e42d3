"""`interop.keras.Layer`: a model of any framework as a trainable Keras layer.

The guest is traced (or loaded) into a Graph and emitted with the Keras emitter, on
whichever Keras backend is active (TensorFlow, JAX or torch), so its weights are Keras
variables of the host and train with ``model.fit``. Calling the layer on a symbolic
input checks the input against the guest's signature at definition time and computes
the output shape from the graph's shape inference. The layer's config carries the
graph (ONNX bytes) and the current weights, so ``model.save`` /
``keras.models.load_model`` work in a process where the guest's framework is not
installed (``import interop`` is enough, before or after ``import keras``: it registers the
class once Keras is imported, see interop/keras_registration.py):

>>> inp = keras.Input((3, 32, 32))                                      # doctest: +SKIP
>>> x = interop.keras.Layer(torch_backbone, example_inputs=(sample,))(inp)  # doctest: +SKIP
>>> model = keras.Model(inp, keras.layers.Dense(10)(x))                 # doctest: +SKIP
"""

from __future__ import annotations

# the class lives with its host adapter (interop.adapters.keras.nesting); this module keeps
# the public name, and the import path that pickles and saved models may refer to
from .adapters.keras.nesting import Layer

__all__ = ["Layer"]
