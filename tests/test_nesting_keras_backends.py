"""interop.keras.Layer on every Keras backend, and save/load in a process without the guest's framework."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from nesting_guests import torch_cnn

import interop

BUILD = r"""
import json, sys, numpy as np, keras, interop, interop.keras
keras.utils.set_random_seed(0)  # the head's initial weights: the loss curve is reproducible
folder = sys.argv[1]
layer = interop.keras.Layer(interop.load(folder + "/guest.onnx"), name="guest")
inp = keras.Input((3, 16, 16))
model = keras.Model(inp, keras.layers.Dense(1, name="head")(layer(inp)))
x = np.load(folder + "/x.npy")
guest_error = float(np.abs(keras.ops.convert_to_numpy(layer(x)) - np.load(folder + "/expected.npy")).max())
model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
target = np.zeros((len(x), 1), np.float32)
# batch_size=3 on 4 samples: a partial last batch, so the traced step has an unknown batch dim
losses = model.fit(x, target, epochs=5, batch_size=3, shuffle=False, verbose=0).history["loss"]
before, after = float(losses[0]), float(losses[-1])
model.save(folder + "/host.keras")
np.save(folder + "/prediction.npy", model.predict(x, verbose=0))
print(json.dumps({"backend": keras.backend.backend(), "guest_error": guest_error, "before": before, "after": after}))
"""

LOAD = r"""
import json, sys
class Block:  # the guest's framework must not be needed to load the host
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch" and sys.argv[2] != "torch":
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
if sys.argv[3] == "interop-first":  # `import interop` alone registers the layer, in any order
    import interop, keras
else:
    import keras, interop
import numpy as np
folder = sys.argv[1]
model = keras.models.load_model(folder + "/host.keras")
error = float(np.abs(model.predict(np.load(folder + "/x.npy"), verbose=0) - np.load(folder + "/prediction.npy")).max())
config = model.get_config()
rebuilt = keras.Model.from_config(config)
print(json.dumps({"reload_error": error, "torch_loaded": "torch" in sys.modules, "rebuilt": len(rebuilt.weights),
                  "layer": type(model.get_layer("guest")).__module__}))
"""


def _run(script: str, folder: Path, backend: str, order: str = "") -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "JAX_PLATFORMS": "cpu",
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    done = subprocess.run(
        [sys.executable, "-c", script, str(folder), backend, order],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("backend", ["tensorflow", "jax", "torch"])
def test_keras_layer_on_every_backend(backend, tmp_path):
    model, x, run_source = torch_cnn()
    interop.trace(model, (torch.from_numpy(x),)).save(tmp_path / "guest.onnx")
    batch = np.random.default_rng(2).standard_normal((4, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", batch)
    np.save(tmp_path / "expected.npy", run_source(batch))
    built = _run(BUILD, tmp_path, backend)
    assert built["backend"] == backend
    assert built["guest_error"] < 1e-4
    assert built["after"] < built["before"]
    for order in ("interop-first", "keras-first"):
        loaded = _run(LOAD, tmp_path, backend, order)
        assert loaded["layer"] == "interop.keras", order
        assert loaded["reload_error"] < 1e-6, order
        assert loaded["rebuilt"] > 0
        if backend != "torch":
            assert not loaded["torch_loaded"], order


def test_import_interop_registers_every_saved_interop_class_once_keras_loads():
    # emitted models save generic ops and recurrent helpers as interop>... classes too
    script = (
        "import sys, interop; assert 'keras' not in sys.modules; import keras; "
        "names = ['interop>Layer', 'interop>OnnxOp1', 'interop>OnnxOp64', 'interop>RecurrentState']; "
        "print([keras.saving.get_registered_object(n) is not None for n in names])"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[True, True, True, True]"
