"""Flax's standard layers captured as ONNX layer ops (adapters/flax/capture_layers.py).

nnx / linen BatchNorm (inference), LayerNorm, Conv and Linear/Dense become
BatchNormalization, LayerNormalization, Conv with its bias as B, and MatMul + Add of the
bias, so the emitters rebuild the hosts' own layers. The captured graph is checked on
ONNX Runtime against the Flax call (rtol 1e-5, atol 1e-6), the emitted torch / Keras
models against the Flax model (rtol 1e-4, atol 1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import interop

nnx = pytest.importorskip("flax.nnx")
ort = pytest.importorskip("onnxruntime")

ORT_RTOL, ORT_ATOL = 1e-5, 1e-6
RTOL, ATOL = 1e-4, 1e-5
rng = np.random.default_rng(0)


def f32(*shape):
    return rng.standard_normal(shape).astype(np.float32)


def nodes(graph, op_type):
    return [n for n in graph.model.graph if n.op_type == op_type]


def input_names(node):
    return [v.name if v is not None else None for v in node.inputs]


def param_count(model) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


def randomize_batch_norm(bn):
    """Running statistics and affine weights away from their identity initial values."""
    c = bn.mean[...].shape[0]
    bn.mean[...] = jnp.asarray(f32(c))
    bn.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, c).astype(np.float32))
    if bn.scale is not None:
        bn.scale[...] = jnp.asarray(rng.uniform(0.5, 1.5, c).astype(np.float32))
    if bn.bias is not None:
        bn.bias[...] = jnp.asarray(f32(c))


def inference_output(model, x):
    """The Flax model's own output on running averages (a clone: the model is not changed)."""
    clone = nnx.clone(model)
    clone.eval()
    return np.asarray(clone(jnp.asarray(x)))


def check_onnxruntime(model, graph, *batches):
    for x in batches:
        np.testing.assert_allclose(
            graph.run(x), inference_output(model, x), rtol=ORT_RTOL, atol=ORT_ATOL
        )


class CNN(nnx.Module):
    def __init__(self, rngs):
        self.conv1 = nnx.Conv(3, 8, (3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, rngs=rngs)
        self.conv2 = nnx.Conv(8, 16, (3, 3), strides=2, padding=((1, 1), (1, 1)), rngs=rngs)
        self.ln = nnx.LayerNorm(16, rngs=rngs)
        self.fc = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        x = nnx.relu(self.bn(self.conv1(x)))
        x = self.ln(self.conv2(x))
        return self.fc(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def cnn():
    model = CNN(nnx.Rngs(0))
    randomize_batch_norm(model.bn)
    for p in (model.ln.scale, model.ln.bias):
        p[...] = jnp.asarray(f32(16))
    graph = interop.trace(model, f32(2, 9, 9, 3))
    return model, graph


def test_nnx_cnn_graph_holds_layer_ops(cnn):
    model, graph = cnn
    convs = nodes(graph, "Conv")
    assert [input_names(n)[2] for n in convs] == ["conv1.bias", "conv2.bias"]
    (bn,) = nodes(graph, "BatchNormalization")
    assert input_names(bn)[1:] == ["bn.scale", "bn.bias", "bn.mean", "bn.var"]
    assert bn.attributes["momentum"].as_float() == pytest.approx(0.99)
    assert bn.attributes["epsilon"].as_float() == pytest.approx(1e-5)
    assert bn.metadata_props["interop.scope"] == "bn"
    (ln,) = nodes(graph, "LayerNormalization")
    assert input_names(ln)[1:] == ["ln.scale", "ln.bias"]
    assert ln.attributes["axis"].as_int() == -1
    (matmul,) = nodes(graph, "MatMul")
    (use,) = matmul.outputs[0].uses()
    assert use.node.op_type == "Add" and input_names(use.node)[1] == "fc.bias"
    # no bias or statistic reshaped, no normalisation arithmetic left
    weights = {v.name for v in graph.model.graph.initializers.values()}
    for node in graph.model.graph:
        if node.op_type in ("Reshape", "Sqrt", "Reciprocal", "Sub"):
            assert not set(input_names(node)) & weights, node
    assert not nodes(graph, "ReduceMean")
    assert graph.count_params() == param_count(model)
    check_onnxruntime(model, graph, f32(2, 9, 9, 3), f32(5, 9, 9, 3))
    assert interop.verify(model, graph, (f32(3, 9, 9, 3),), rtol=RTOL, atol=ATOL).ok


def test_nnx_cnn_to_torch_gives_native_layers(cnn):
    torch = pytest.importorskip("torch")
    model, graph = cnn
    emitted = interop.to_torch(graph).eval()
    children = {name: type(layer) for name, layer in emitted.named_children()}
    assert children["conv1"] is torch.nn.Conv2d and children["conv2"] is torch.nn.Conv2d
    assert children["bn"] is torch.nn.BatchNorm2d
    assert children["ln"] is torch.nn.LayerNorm
    assert children["fc"] is torch.nn.Linear
    assert emitted.conv1.bias is not None and emitted.fc.bias is not None
    trainable = sum(p.numel() for p in emitted.parameters() if p.requires_grad)
    assert trainable == param_count(model)
    x = f32(4, 9, 9, 3)
    with torch.no_grad():
        out = emitted(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, inference_output(model, x), rtol=RTOL, atol=ATOL)


def test_torch_training_mode_batch_norm_uses_batch_statistics(cnn):
    torch = pytest.importorskip("torch")
    model, graph = cnn
    emitted = interop.to_torch(graph).train()
    x = f32(6, 9, 9, 3)
    with torch.no_grad():
        out = emitted(torch.from_numpy(x)).numpy()
    flax_model = nnx.clone(model)
    flax_model.train()  # BatchNorm on batch statistics, updating its running averages
    expected = np.asarray(flax_model(jnp.asarray(x)))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
    assert not np.allclose(out, inference_output(model, x), atol=1e-3)
    # Flax's momentum 0.99 keeps 99 % of the running mean, as torch's momentum 0.01 does
    np.testing.assert_allclose(
        emitted.bn.running_mean.numpy(), np.asarray(flax_model.bn.mean[...]), rtol=1e-5, atol=1e-6
    )


def test_nnx_cnn_to_keras_gives_native_layers(cnn):
    keras = pytest.importorskip("keras")
    model, graph = cnn
    emitted = interop.to_keras(graph)
    kinds = {layer.name: type(layer).__name__ for layer in emitted.layers}
    assert kinds["conv1"] == kinds["conv2"] == "Conv2D"
    assert kinds["bn"] == "BatchNormalization"
    assert kinds["ln"] == "LayerNormalization"
    assert kinds["fc"] == "Dense"
    assert emitted.get_layer("conv1").use_bias and emitted.get_layer("fc").use_bias
    x = f32(3, 9, 9, 3)
    out = keras.ops.convert_to_numpy(emitted(x))
    np.testing.assert_allclose(out, inference_output(model, x), rtol=RTOL, atol=ATOL)
    train = keras.ops.convert_to_numpy(emitted(x, training=True))
    flax_model = nnx.clone(model)
    flax_model.train()
    np.testing.assert_allclose(train, np.asarray(flax_model(jnp.asarray(x))), rtol=RTOL, atol=ATOL)


def test_capture_function_differentiates_like_the_model(cnn):
    # the layer primitives' jvp rule is Flax's formula, so gradients through the
    # capture (fn(params, x)) equal the inference-mode model's
    from interop.adapters.flax.capture import capture

    model, _ = cnn
    cap = capture(model)
    x = jnp.asarray(f32(2, 9, 9, 3))
    jaxpr = str(jax.make_jaxpr(lambda v: cap.fn(cap.params, v))(x))
    assert "interop_batch_norm" in jaxpr and "interop_layer_norm" in jaxpr
    loss = lambda params, v: (cap.fn(params, v) ** 2).sum()  # noqa: E731
    grad_x, grad_params = jax.jit(jax.grad(lambda v, p: loss(p, v), argnums=(0, 1)))(x, cap.params)
    clone = nnx.clone(model)
    clone.eval()
    graphdef, params, rest = nnx.split(clone, nnx.Param, ...)

    def flax_loss(v, p):
        return (nnx.merge(graphdef, p, rest)(v) ** 2).sum()

    expected_x, expected_params = jax.grad(flax_loss, argnums=(0, 1))(x, params)
    np.testing.assert_allclose(np.asarray(grad_x), np.asarray(expected_x), rtol=RTOL, atol=ATOL)
    flat = jax.tree_util.tree_flatten_with_path
    got = {jax.tree_util.keystr(k): v for k, v in flat(grad_params)[0]}
    want = {jax.tree_util.keystr(k): v for k, v in flat(expected_params)[0]}
    assert len(want) == 10 and set(want) <= set(got)
    for key, value in want.items():
        np.testing.assert_allclose(np.asarray(got[key]), np.asarray(value), rtol=RTOL, atol=1e-4)


# ---------------------------------------------------------------------- BatchNorm variants
class Call(nnx.Module):
    """One layer called as `fn(layer, x)`."""

    def __init__(self, layer, fn=None):
        self.layer = layer
        self.fn = fn

    def __call__(self, x):
        return self.fn(self.layer, x) if self.fn else self.layer(x)


@pytest.mark.parametrize(
    ("options", "shape"),
    [
        ({}, (4, 6)),
        ({}, (3, 5, 6)),
        ({}, (2, 4, 3, 2, 6)),
        ({"use_scale": False}, (3, 4, 4, 6)),
        ({"use_bias": False}, (3, 4, 4, 6)),
        ({"use_scale": False, "use_bias": False, "momentum": 0.9, "epsilon": 1e-3}, (3, 6)),
    ],
)
def test_batch_norm_is_one_onnx_batch_normalization(options, shape):
    model = Call(nnx.BatchNorm(6, rngs=nnx.Rngs(0), **options))
    randomize_batch_norm(model.layer)
    graph = interop.trace(model, f32(*shape))
    (bn,) = nodes(graph, "BatchNormalization")
    names = input_names(bn)
    assert names[3:] == ["layer.mean", "layer.var"]
    for i, (flag, name) in enumerate((("use_scale", "layer.scale"), ("use_bias", "layer.bias"))):
        if options.get(flag, True):
            assert names[1 + i] == name
        else:  # ONNX needs the input: a constant, not a parameter
            assert bn.inputs[1 + i].producer().op_type == "Constant"
    assert bn.attributes["momentum"].as_float() == pytest.approx(options.get("momentum", 0.99))
    assert len(nodes(graph, "Transpose")) == (0 if len(shape) == 2 else 2)
    assert graph.count_params() == param_count(model)
    check_onnxruntime(model, graph, f32(*shape), f32(7, *shape[1:]))


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        # features on axis 1 (channels-first data): Flax's arithmetic, traced as is
        (lambda: Call(nnx.BatchNorm(6, axis=1, rngs=nnx.Rngs(0))), (4, 6, 5)),
        # an explicit training-mode call keeps batch statistics
        (
            lambda: Call(
                nnx.BatchNorm(6, rngs=nnx.Rngs(0)), lambda bn, x: bn(x, use_running_average=False)
            ),
            (4, 5, 6),
        ),
    ],
)
def test_batch_norm_outside_the_pattern_keeps_flax_arithmetic(make, shape):
    model = make()
    randomize_batch_norm(model.layer)
    x = f32(*shape)
    graph = interop.trace(model, x)
    assert not nodes(graph, "BatchNormalization")
    assert interop.verify(model, graph, (x,), rtol=RTOL, atol=ATOL).ok


# ---------------------------------------------------------------------- LayerNorm
@pytest.mark.parametrize(
    ("options", "has_bias"),
    [
        ({}, True),
        ({"use_bias": False}, False),
        ({"use_scale": False}, True),
        ({"use_fast_variance": False, "epsilon": 1e-3}, True),
    ],
)
def test_layer_norm_is_one_onnx_layer_normalization(options, has_bias):
    model = Call(nnx.LayerNorm(6, rngs=nnx.Rngs(0), **options))
    for p in (model.layer.scale, model.layer.bias):
        if p is not None:
            p[...] = jnp.asarray(f32(6))
    x = f32(3, 5, 6) * 3.0 + 1.0
    graph = interop.trace(model, x)
    (ln,) = nodes(graph, "LayerNormalization")
    assert len(ln.inputs) == (3 if has_bias else 2)
    assert ln.attributes["epsilon"].as_float() == pytest.approx(options.get("epsilon", 1e-6))
    if options.get("use_scale", True):
        assert ln.inputs[1].name == "layer.scale"
    assert not nodes(graph, "ReduceMean") and not nodes(graph, "ReduceSum")
    assert graph.count_params() == param_count(model)
    check_onnxruntime(model, graph, x, f32(2, 5, 6))


def test_layer_norm_over_several_axes_keeps_flax_arithmetic():
    model = Call(nnx.LayerNorm(6, reduction_axes=(-2, -1), rngs=nnx.Rngs(0)))
    x = f32(3, 5, 6)
    graph = interop.trace(model, x)
    assert not nodes(graph, "LayerNormalization")
    check_onnxruntime(model, graph, x)


# ---------------------------------------------------------------------- Conv / Linear
@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda r: nnx.Conv(3, 4, (3, 3), strides=2, padding="SAME", rngs=r), (9, 9, 3)),
        (lambda r: nnx.Conv(3, 4, (3, 3), padding="CIRCULAR", rngs=r), (8, 8, 3)),
        (lambda r: nnx.Conv(3, 4, (3,), padding="CAUSAL", rngs=r), (8, 3)),
        (lambda r: nnx.Conv(4, 4, (3, 3), feature_group_count=2, rngs=r), (6, 6, 4)),
        (lambda r: nnx.Conv(3, 4, (2, 2, 2), kernel_dilation=2, rngs=r), (5, 5, 5, 3)),
    ],
)
def test_conv_bias_is_the_conv_nodes_b_input(make, shape):
    model = Call(make(nnx.Rngs(0)))
    model.layer.bias[...] = jnp.asarray(f32(4))
    graph = interop.trace(model, f32(2, *shape))
    (conv,) = nodes(graph, "Conv")
    assert input_names(conv)[2] == "layer.bias"
    assert not nodes(graph, "Add")
    check_onnxruntime(model, graph, f32(2, *shape), f32(3, *shape))


def test_conv_over_two_batch_axes_adds_the_bias_after_flax_reshape():
    model = Call(nnx.Conv(3, 4, (3, 3), rngs=nnx.Rngs(0)))
    model.layer.bias[...] = jnp.asarray(f32(4))
    x = f32(2, 3, 6, 6, 3)
    graph = interop.trace(model, x, dynamic_batch=False)
    (conv,) = nodes(graph, "Conv")
    assert len(conv.inputs) == 2
    (add,) = nodes(graph, "Add")
    assert input_names(add)[1] == "layer.bias"
    check_onnxruntime(model, graph, x)


def test_conv_without_bias_is_unchanged():
    model = Call(nnx.Conv(3, 4, (3, 3), use_bias=False, rngs=nnx.Rngs(0)))
    graph = interop.trace(model, f32(2, 6, 6, 3))
    (conv,) = nodes(graph, "Conv")
    assert len(conv.inputs) == 2 and not nodes(graph, "Add")
    check_onnxruntime(model, graph, f32(2, 6, 6, 3))


def test_linear_is_matmul_plus_bias_and_emits_nn_linear():
    torch = pytest.importorskip("torch")
    model = Call(nnx.Linear(6, 3, rngs=nnx.Rngs(0)))
    model.layer.bias[...] = jnp.asarray(f32(3))
    x = f32(2, 5, 6)
    graph = interop.trace(model, x)
    assert [n.op_type for n in graph.model.graph] == ["MatMul", "Add"]
    assert input_names(nodes(graph, "Add")[0])[1] == "layer.bias"
    check_onnxruntime(model, graph, x, f32(4, 5, 6))
    emitted = interop.to_torch(graph).eval()
    assert isinstance(emitted.layer, torch.nn.Linear) and emitted.layer.bias is not None
    with torch.no_grad():
        out = emitted(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(out, inference_output(model, x), rtol=RTOL, atol=ATOL)


def test_vmapped_layers_trace_through_flax_arithmetic():
    # under vmap the primitives run Flax's formula: correct, just not a layer op
    class Ensemble(nnx.Module):
        def __init__(self, rngs):
            self.fc = nnx.Linear(6, 3, rngs=rngs)
            self.bn = nnx.BatchNorm(6, rngs=rngs)

        def __call__(self, x):
            return jax.vmap(lambda row: self.fc(self.bn(row)))(x)

    model = Ensemble(nnx.Rngs(0))
    randomize_batch_norm(model.bn)
    x = f32(4, 5, 6)
    graph = interop.trace(model, x)
    check_onnxruntime(model, graph, x)
    # the capture function differentiates like the model (the primitives' jvp rule)
    from interop.adapters.flax.capture import capture

    cap = capture(model)
    grad = jax.jit(jax.grad(lambda v: cap.fn(cap.params, v).sum()))(jnp.asarray(x))
    clone = nnx.clone(model)
    clone.eval()
    expected = jax.grad(lambda v: clone(v).sum())(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(grad), np.asarray(expected), rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------- linen
def test_linen_layers_become_onnx_layer_ops():
    torch = pytest.importorskip("torch")
    import flax.linen as nn

    class LinenCNN(nn.Module):
        train: bool = True

        @nn.compact
        def __call__(self, x):
            x = nn.Conv(8, (3, 3))(x)
            x = nn.relu(nn.BatchNorm(use_running_average=not self.train)(x))
            x = nn.LayerNorm()(nn.Conv(8, (3, 3), strides=2, padding=1)(x))
            return nn.Dense(4)(x.mean(axis=(1, 2)))

    x = f32(2, 9, 9, 3)
    variables = LinenCNN().init(jax.random.key(0), x)
    stats = variables["batch_stats"]["BatchNorm_0"]
    variables = {
        "params": variables["params"],
        "batch_stats": {
            "BatchNorm_0": {
                "mean": jnp.asarray(f32(8)),
                "var": jnp.asarray(rng.uniform(0.5, 2, 8).astype(np.float32)),
            }
        },
    }
    assert stats["mean"].shape == (8,)
    # the capture of the training configuration runs BatchNorm on running averages
    graph = interop.trace((LinenCNN(train=True), variables), x)
    convs = nodes(graph, "Conv")
    assert [input_names(n)[2] for n in convs] == ["Conv_0.bias", "Conv_1.bias"]
    (bn,) = nodes(graph, "BatchNormalization")
    assert input_names(bn)[1:] == [
        "BatchNorm_0.scale",
        "BatchNorm_0.bias",
        "BatchNorm_0.mean",
        "BatchNorm_0.var",
    ]
    assert input_names(nodes(graph, "LayerNormalization")[0])[1:] == [
        "LayerNorm_0.scale",
        "LayerNorm_0.bias",
    ]
    (matmul,) = nodes(graph, "MatMul")
    assert input_names(next(iter(matmul.outputs[0].uses())).node)[1] == "Dense_0.bias"
    for batch in (x, f32(5, 9, 9, 3)):
        expected = np.asarray(LinenCNN(train=False).apply(variables, batch))
        np.testing.assert_allclose(graph.run(batch), expected, rtol=ORT_RTOL, atol=ORT_ATOL)
    emitted = interop.to_torch(graph).eval()
    kinds = sorted(type(m).__name__ for m in emitted.children())
    assert kinds == ["BatchNorm2d", "Conv2d", "Conv2d", "LayerNorm", "Linear"]
    trainable = sum(p.numel() for p in emitted.parameters() if p.requires_grad)
    assert trainable == sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables["params"]))
    with torch.no_grad():
        out = emitted(torch.from_numpy(x)).numpy()
    expected = np.asarray(LinenCNN(train=False).apply(variables, x))
    np.testing.assert_allclose(out, expected, rtol=RTOL, atol=ATOL)
