"""The capture tests' models, one table for the cross-framework matrix (tests/test_cross_framework.py).

Each `Case` builds a source model (random weights, nothing downloaded) and the example
inputs it is called with, in the form its framework takes them (torch tensors, numpy
arrays, dicts of named inputs). Builders are reused from the capture tests where they
are importable (tests/ is on sys.path); the rest are small equivalents.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Case:
    name: str  # "<source>-<model>"
    source: str  # "torch" | "keras" | "flax"
    build: Callable[[], tuple[Any, Any]]  # () -> (model, example inputs)
    slow: bool = False
    trace_options: dict[str, Any] = field(default_factory=dict)
    trainable: bool = True  # has trainable parameters (the optimizer-step test needs some)
    lr: float = 1e-2  # SGD step of the optimizer-step test
    atol_scale: bool = False  # atol relative to the outputs' magnitude (deep models)


def _rand(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# --------------------------------------------------------------------------- torch


def _torch_cases() -> list[Case]:
    import torch

    def from_models(name):
        def build():
            import models

            # models.cases() seeds torch itself and builds all six; pick one
            for case_name, module, inputs in models.cases():
                if case_name == name:
                    return module, inputs
            raise KeyError(name)

        return build

    def from_emit_models(factory, make_input):
        def build():
            import emit_models
            from models import randomize_batchnorm

            torch.manual_seed(0)
            model = randomize_batchnorm(getattr(emit_models, factory)()).eval()
            return model, (make_input(),)

        return build

    def hf(kind):
        def build():
            import transformers

            warnings.filterwarnings("ignore")
            gen = torch.Generator().manual_seed(0)
            ids = torch.randint(0, 100, (2, 7), generator=gen)
            torch.manual_seed(0)
            if kind == "bert":
                config = transformers.BertConfig(
                    vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64,
                )  # fmt: skip
                mask = torch.ones(2, 7, dtype=torch.long)
                mask[1, 5:] = 0
                return transformers.BertModel(config).eval(), {
                    "input_ids": ids,
                    "attention_mask": mask,
                }
            if kind == "distilbert":
                config = transformers.DistilBertConfig(
                    vocab_size=100, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                    max_position_embeddings=64,
                )  # fmt: skip
                model = transformers.DistilBertForSequenceClassification(config).eval()
                return model, {"input_ids": ids}
            if kind == "gpt2":
                config = transformers.GPT2Config(
                    vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=64
                )
                return transformers.GPT2LMHeadModel(config).eval(), (ids,)
            if kind == "llama":
                config = transformers.LlamaConfig(
                    vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                )  # fmt: skip
                return transformers.LlamaForCausalLM(config).eval(), (ids,)
            if kind == "vit":
                config = transformers.ViTConfig(
                    image_size=16, patch_size=4, num_channels=3, hidden_size=32,
                    num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                )  # fmt: skip
                pixels = torch.randn(2, 3, 16, 16, generator=gen)
                return transformers.ViTModel(config).eval(), (pixels,)
            raise KeyError(kind)

        return build

    cases = [
        Case("torch-resnetish", "torch", from_models("resnetish")),
        Case("torch-encoder", "torch", from_models("encoder"), slow=True),
        Case("torch-lstm", "torch", from_models("lstm"), slow=True),
        Case("torch-attention", "torch", from_models("attention")),
        Case("torch-two_tower", "torch", from_models("two_tower")),
        Case("torch-dict_head", "torch", from_models("dict_head")),
        Case(
            "torch-residual_cnn",
            "torch",
            from_emit_models("ResidualCNN", lambda: torch.randn(2, 3, 16, 16)),
            slow=True,
        ),
        Case("torch-mlp", "torch", from_emit_models("MLP", lambda: torch.randn(2, 6))),
        Case(
            "torch-tagger",
            "torch",
            from_emit_models("Tagger", lambda: torch.randint(0, 20, (2, 9))),
            slow=True,
        ),
    ]
    for kind in ("bert", "distilbert", "gpt2", "llama", "vit"):
        cases.append(Case(f"torch-hf_{kind}", "torch", hf(kind), slow=True, lr=1e-3))
    return cases


# --------------------------------------------------------------------------- keras


def _keras_cases() -> list[Case]:
    def seeded(fn):
        def build():
            import keras

            keras.utils.set_random_seed(0)
            return fn()

        return build

    def cnn():
        import keras
        from keras import layers

        model = keras.Sequential(
            [
                keras.Input((16, 16, 3)),
                layers.Conv2D(8, 3, padding="same", activation="relu", name="conv"),
                layers.BatchNormalization(name="bn"),
                layers.DepthwiseConv2D(3, strides=2, padding="same", name="dw"),
                layers.SeparableConv2D(6, 3, padding="valid", name="sep"),
                layers.AveragePooling2D(2, padding="same", name="pool"),
                layers.Dropout(0.3, name="drop"),
                layers.Flatten(name="flat"),
                layers.Dense(4, activation="softmax", name="fc"),
            ],
            name="cnn",
        )
        _randomize_keras_batchnorm(model)
        return model, _rand(2, 16, 16, 3)

    def functional_shared():
        import keras
        from keras import layers, ops

        a, b = keras.Input((6,), name="a"), keras.Input((6,), name="b")
        shared = layers.Dense(5, activation="tanh", name="shared")
        ha, hb = shared(a), shared(b)
        out1 = layers.Concatenate(name="cat")([ha, hb])
        out2 = layers.Add(name="add")([ha, hb]) * 2.0 - ops.mean(ha, axis=-1, keepdims=True)
        model = keras.Model([a, b], [out1, out2], name="two")
        return model, (_rand(3, 6), _rand(3, 6, seed=2))

    def dict_io():
        import keras
        from keras import layers

        a, b = keras.Input((4,), name="a"), keras.Input((4,), name="b")
        model = keras.Model(
            {"a": a, "b": b}, {"sum": layers.Dense(3)(a + b), "prod": layers.Multiply()([a, b])}
        )
        return model, {"a": _rand(2, 4), "b": _rand(2, 4, seed=3)}

    def subclassed():
        from test_keras_capture import Imperative

        model = Imperative()
        x = _rand(4, 5)
        model(x)
        _randomize_keras_batchnorm(model)
        return model, x

    def nested():
        import keras
        from keras import layers
        from test_keras_capture import Imperative

        inner = keras.Sequential(
            [keras.Input((8,)), layers.Dense(8, activation="gelu"), layers.LayerNormalization()],
            name="inner_seq",
        )
        outer = Imperative(inner)
        x = _rand(2, 5)
        outer(x)
        _randomize_keras_batchnorm(outer)
        i = keras.Input((5,))
        return keras.Model(i, layers.Dense(2, name="top")(outer(i)["logits"])), x

    def recurrent(kind, return_sequences):
        def build():
            from test_keras_capture import _sequence_model, _tokens

            model = _sequence_model(kind, return_sequences, go_backwards=not return_sequences)
            return model, _tokens(3, 9, seed=5)

        return build

    def bidirectional():
        import keras
        from keras import layers

        i = keras.Input((None, 4))
        masked = layers.Masking(name="mask")(i)
        seq = layers.Bidirectional(layers.LSTM(5, return_sequences=True), name="bi_lstm")(masked)
        last = layers.Bidirectional(
            layers.GRU(3, reset_after=False), merge_mode="ave", name="bi_gru"
        )(seq)
        model = keras.Model(i, [seq, last])
        x = _rand(3, 7, 4)
        x[0, 5:] = 0
        x[2, :2] = 0
        return model, x

    def layer_case(table, name):
        def build():
            import importlib

            import keras

            shape, make = importlib.import_module(table).CASES[name]
            dtype = "int32" if shape == (None,) else "float32"
            i = keras.Input(shape, dtype=dtype)
            model = keras.Model(i, make(i))
            rs = np.random.RandomState(1)
            x = (
                rs.randint(0, 10, size=(2, 7)).astype("int32")
                if dtype == "int32"
                else (rs.rand(2, *shape) * 4 - 2).astype("float32")
            )
            return model, x

        return build

    def application(name, size):
        def build():
            import keras

            model = getattr(keras.applications, name)(
                weights=None, input_shape=(size, size, 3), classes=10, classifier_activation=None
            )
            # with BatchNorm at its initial statistics (mean 0, variance 1) the random-weight
            # activations shrink layer by layer to logits ~1e-10, which any output (zeros
            # too) would match: calibrated, perturbed statistics keep them of order 1
            calibration = np.random.RandomState(1).rand(8, size, size, 3).astype("float32")
            _calibrate_keras_batchnorm(model, calibration * 255)
            return model, np.random.RandomState(0).rand(2, size, size, 3).astype("float32") * 255

        return build

    cases = [
        Case("keras-cnn", "keras", seeded(cnn)),
        Case("keras-functional_shared", "keras", seeded(functional_shared)),
        Case("keras-dict_io", "keras", seeded(dict_io)),
        Case("keras-subclassed", "keras", seeded(subclassed)),
        Case("keras-nested", "keras", seeded(nested), slow=True),
        Case("keras-bidirectional", "keras", seeded(bidirectional), slow=True),
    ]
    for kind in ("LSTM", "GRU", "SimpleRNN"):
        cases.append(
            Case(f"keras-{kind.lower()}_masked", "keras", recurrent(kind, True), slow=True)
        )
    fast_layers = {"conv_transpose_same", "grouped_conv_strided", "einsum_dense", "prelu"}
    free = {
        "upsampling_nearest", "upsampling_bilinear", "crop_global_max", "average_pool1d_same",
        "permute_flatten_repeat", "relu_clipped_leaky", "softmax", "activations",
        "unit_norm", "upsampling1d", "upsampling3d", "lambda", "identity_reshape",
        "softmax_axis", "relu_threshold", "global_pool_keepdims", "activations_more",
    }  # fmt: skip
    for table, names in (
        ("test_keras_layers", _keras_layer_names("test_keras_layers")),
        ("test_keras_layers_more", _keras_layer_names("test_keras_layers_more")),
    ):
        for name in names:
            cases.append(
                Case(
                    f"keras-layer_{name}",
                    "keras",
                    seeded(layer_case(table, name)),
                    slow=name not in fast_layers,
                    trainable=name not in free,
                )
            )
    for name, size in (("MobileNetV2", 64),):  # ResNet50 / EfficientNetB0: 20-40 s more each
        cases.append(
            Case(
                f"keras-app_{name}",
                "keras",
                seeded(application(name, size)),
                slow=True,
                lr=1e-6,  # calibrated BatchNorm: steep loss (at 1e-6 it drops 4.8 -> 3.7)
                atol_scale=True,
            )
        )
    return cases


def _keras_layer_names(table: str) -> list[str]:
    import importlib

    return list(importlib.import_module(table).CASES)


def _keras_batchnorms(model) -> list:
    """Every BatchNormalization layer of a Keras model, nested layers included."""
    import keras

    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def _randomize_keras_batchnorm(model, seed: int = 0) -> None:
    """Non-trivial BatchNorm statistics and affine weights (seeded): an emitter that
    dropped the moving mean / variance or gamma / beta would not match."""
    rs = np.random.RandomState(seed)
    layers = _keras_batchnorms(model)
    assert layers, "no BatchNormalization layer to randomize"
    for layer in layers:
        n = layer.moving_mean.shape[0]
        layer.moving_mean.assign(rs.randn(n).astype("float32") * 0.1)
        layer.moving_variance.assign(rs.rand(n).astype("float32") + 0.5)
        if layer.gamma is not None:
            layer.gamma.assign(rs.rand(n).astype("float32") + 0.5)
        if layer.beta is not None:
            layer.beta.assign(rs.randn(n).astype("float32") * 0.1)


def _calibrate_keras_batchnorm(model, calibration: np.ndarray, seed: int = 0) -> None:
    """Random (seeded) gamma / beta, then moving statistics set to those of a calibration
    batch (one training-mode call with momentum 0) and perturbed (mean shifted by 0.1
    standard deviations, variance scaled by 0.5-1.5): every layer's output stays of order 1
    however deep the model, and no statistic is the trivial 0 / 1."""
    rs = np.random.RandomState(seed)
    layers = _keras_batchnorms(model)
    assert layers, "no BatchNormalization layer to calibrate"
    momenta = []
    for layer in layers:
        n = layer.moving_mean.shape[0]
        if layer.gamma is not None:
            layer.gamma.assign(rs.uniform(0.5, 1.5, n).astype("float32"))
        if layer.beta is not None:
            layer.beta.assign(rs.normal(0, 0.1, n).astype("float32"))
        momenta.append(layer.momentum)
        layer.momentum = 0.0  # the moving statistics become the batch's
    try:
        model(calibration, training=True)
    finally:
        for layer, momentum in zip(layers, momenta):
            layer.momentum = momentum
    for layer in layers:
        n = layer.moving_mean.shape[0]
        std = np.sqrt(np.asarray(layer.moving_variance.numpy()))
        shift = rs.normal(0, 0.1, n).astype("float32") * std
        layer.moving_mean.assign(np.asarray(layer.moving_mean.numpy()) + shift)
        scale = rs.uniform(0.5, 1.5, n).astype("float32")
        layer.moving_variance.assign(np.asarray(layer.moving_variance.numpy()) * scale)


def _randomize_nnx_batchnorm(model, seed: int = 0):
    """Non-trivial running statistics and scale / bias for every nnx.BatchNorm (seeded)."""
    import jax.numpy as jnp
    from flax import nnx

    rs = np.random.RandomState(seed)
    found = [m for _, m in nnx.iter_graph(model) if isinstance(m, nnx.BatchNorm)]
    assert found, "no nnx.BatchNorm to randomize"
    for bn in found:
        n = bn.mean.value.shape[-1]
        bn.mean.value = jnp.asarray(rs.randn(n).astype("float32") * 0.1)
        bn.var.value = jnp.asarray(rs.rand(n).astype("float32") + 0.5)
        if bn.scale is not None:
            bn.scale.value = jnp.asarray(rs.rand(n).astype("float32") + 0.5)
        if bn.bias is not None:
            bn.bias.value = jnp.asarray(rs.randn(n).astype("float32") * 0.1)
    return model


# --------------------------------------------------------------------------- flax


def _flax_cases() -> list[Case]:
    def builtin(name):
        def build():
            from flax import nnx
            from test_flax_nnx import BUILTINS

            make, shape = BUILTINS[name]
            model = make(nnx.Rngs(0))
            if isinstance(model, nnx.BatchNorm):  # not the trivial mean 0 / variance 1
                _randomize_nnx_batchnorm(model)
            if isinstance(model, nnx.LoRA):  # B starts at zero: the output would be all 0
                model.lora_b[...] = _rand(*model.lora_b.shape, seed=1)
            return model, (_rand(2, *shape),)

        return build

    def nnx_model(cls_name, make_inputs, stats=False):
        def build():
            import test_flax_nnx
            from flax import nnx

            model = getattr(test_flax_nnx, cls_name)(nnx.Rngs(0))
            if stats:  # non-trivial BatchNorm statistics and scale / bias
                _randomize_nnx_batchnorm(model)
            return model, make_inputs()

        return build

    def ids(*shape, high=10, seed=0):
        return np.random.default_rng(seed).integers(0, high, shape).astype(np.int32)

    def linen(cls_name, make_input, stats=False):
        def build():
            import jax
            import test_flax_linen

            module = getattr(test_flax_linen, cls_name)()
            x = make_input()
            variables = module.init({"params": jax.random.key(0), "dropout": jax.random.key(1)}, x)
            if stats:  # non-trivial BatchNorm statistics and scale / bias, per channel
                rs = np.random.RandomState(0)

                def mean(v):
                    return v + rs.randn(*v.shape).astype("float32") * 0.1

                def positive(v):
                    return v * 0 + rs.rand(*v.shape).astype("float32") + 0.5

                params = dict(variables["params"])
                bn = params["BatchNorm_0"]
                params["BatchNorm_0"] = {"scale": positive(bn["scale"]), "bias": mean(bn["bias"])}
                running = variables["batch_stats"]["BatchNorm_0"]
                variables = {
                    "params": params,
                    "batch_stats": {
                        "BatchNorm_0": {
                            "mean": mean(running["mean"]),
                            "var": positive(running["var"]),
                        }
                    },
                }
            return (module, variables), (x,)

        return build

    def rnn():
        from flax import nnx

        return nnx.RNN(nnx.LSTMCell(3, 5, rngs=nnx.Rngs(0))), (_rand(2, 6, 3),)

    fast_builtins = {"linear", "conv_same_stride2", "batchnorm_4d", "layernorm", "lora"}
    cases = [
        Case(f"flax-nnx_{name}", "flax", builtin(name), slow=name not in fast_builtins)
        for name in _flax_builtin_names()
        if name != "dropout"  # no parameters: identity in eval mode
    ]
    cases += [
        Case("flax-nnx_cnn", "flax", nnx_model("CNN", lambda: (_rand(2, 16, 16, 3),), stats=True)),
        Case(
            "flax-nnx_encoder",
            "flax",
            nnx_model("Encoder", lambda: (ids(2, 7, high=50),)),
        ),
        Case("flax-nnx_scan", "flax", nnx_model("ScannedMLP", lambda: (_rand(2, 8),))),
        Case("flax-nnx_rnn", "flax", rnn, slow=True),
        Case(
            "flax-nnx_two_inputs",
            "flax",
            nnx_model(
                "TwoInputs",
                lambda: {"ids": ids(2, 5, high=20), "mask": (_rand(2, 5) > 0).astype(np.float32)},
            ),
        ),
        Case(
            "flax-nnx_causal_attention",
            "flax",
            nnx_model("CausalAttention", lambda: (_rand(2, 5, 8),)),
            slow=True,
        ),
        Case("flax-linen_cnn", "flax", linen("CNN", lambda: _rand(2, 16, 16, 3), stats=True)),
        Case(
            "flax-linen_transformer",
            "flax",
            linen("Transformer", lambda: ids(2, 5, high=30)),
            slow=True,
        ),
        Case("flax-linen_scan", "flax", linen("ScanStack", lambda: _rand(2, 6)), slow=True),
        Case(
            "flax-linen_setup_mlp",
            "flax",
            linen("SetupMLP", lambda: _rand(8, 3, seed=1)),
            slow=True,
        ),
    ]
    return cases


def _flax_builtin_names() -> list[str]:
    from test_flax_nnx import BUILTINS

    return list(BUILTINS)


def all_cases() -> list[Case]:
    """Every case whose framework is installed."""
    import importlib.util

    cases: list[Case] = []
    if importlib.util.find_spec("torch"):
        cases += _torch_cases()
    if importlib.util.find_spec("keras"):
        cases += _keras_cases()
    if importlib.util.find_spec("flax"):
        cases += _flax_cases()
    return cases
