"""`interop.torch.Module`: a model of any framework as a trainable PyTorch submodule.

The guest is traced (or loaded) into a Graph and emitted by the torch emitter, so its
weights are `nn.Parameter`s named after the source and gradients flow through it.
Save it with ``state_dict``; rebuild it from the saved Graph:

>>> enc = interop.torch.Module(keras_encoder, example_inputs=(x,))   # doctest: +SKIP
>>> enc.graph.save("enc.onnx"); torch.save(enc.state_dict(), "enc.pt")  # doctest: +SKIP
>>> again = interop.torch.Module(interop.load("enc.onnx"))           # doctest: +SKIP
>>> again.load_state_dict(torch.load("enc.pt"))                      # doctest: +SKIP
"""

from __future__ import annotations

# the class lives with its host adapter (interop.adapters.torch.nesting); this module keeps
# the public name, and the import path that pickles and saved models may refer to
from .adapters.torch.nesting import Module

__all__ = ["Module"]
