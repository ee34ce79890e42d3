"""Weights the Keras and Flax captures lay out for ONNX (Transpose/Reshape of a kernel) become
the other hosts' own layers, and the transposes a layout change leaves between layers cancel.

Checked on real Keras and Flax models: the emitted torch module holds nn.Conv2d /
nn.BatchNorm2d / nn.Linear named after the source layers, the Flax module nnx.Conv, outputs
match the source (rtol 1e-4) and the relaid kernels train.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
keras = pytest.importorskip("keras")
nnx = pytest.importorskip("flax.nnx")
jax = pytest.importorskip("jax")
nn = torch.nn

import interop  # noqa: E402
from interop.interpret import evaluate  # noqa: E402
from interop.normalize import opset_of  # noqa: E402
from interop.packing import PACKED_FROM, pack_weights  # noqa: E402
from interop.simplify import cancel_inverse_transposes  # noqa: E402


def _keras_cnn():
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    x = keras.layers.BatchNormalization(name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    x = keras.layers.Conv2D(4, 1, name="pw")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(5, name="head")(x)
    model = keras.Model(inputs, outputs)
    for layer in model.layers:  # non-trivial statistics, so inference mode is tested
        if isinstance(layer, keras.layers.BatchNormalization):
            rng = np.random.default_rng(len(layer.name))
            layer.moving_mean.assign(rng.uniform(-0.5, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    return model


@pytest.fixture(scope="module")
def keras_traced():
    model = _keras_cnn()
    x = np.random.default_rng(0).standard_normal((2, 16, 16, 3)).astype(np.float32)
    return model, x, interop.trace(model, x)


def test_keras_kernels_fold_under_their_own_names(keras_traced):
    _, _, graph = keras_traced
    model = graph.model
    packed = pack_weights(model, opset_of(model))
    convs = [n for n in packed.graph if n.op_type == "Conv"]
    assert [n.inputs[1].name for n in convs] == ["conv1/kernel", "dw/kernel", "pw/kernel"]
    kernel = packed.graph.initializers["conv1/kernel"]
    assert kernel.const_value.shape == (8, 3, 3, 3)  # OIHW, from Keras's HWIO (3, 3, 3, 8)
    assert kernel.metadata_props[PACKED_FROM] == '["conv1/kernel"]'
    source = model.graph.initializers["conv1/kernel"].const_value.numpy()
    np.testing.assert_array_equal(kernel.const_value.numpy(), source.transpose(3, 2, 0, 1))
    assert packed.graph.initializers["dw/kernel"].const_value.shape == (8, 1, 3, 3)
    # the caller's model is untouched (the fold works on a clone)
    assert model.graph.initializers["conv1/kernel"].const_value.shape == (3, 3, 3, 8)
    assert any(n.op_type == "Transpose" and n.inputs[0].name == "conv1/kernel" for n in model.graph)


def test_keras_cnn_becomes_native_torch_layers(keras_traced):
    source, x, graph = keras_traced
    module = interop.to_torch(graph).eval()
    kinds = {name: type(m).__name__ for name, m in module.named_children()}
    assert kinds == {
        "conv1": "Conv2d",
        "bn1": "BatchNorm2d",
        "dw": "Conv2d",
        "bn2": "BatchNorm2d",
        "pw": "Conv2d",
        "head": "Linear",
    }
    assert module.dw.groups == 8 and tuple(module.dw.weight.shape) == (8, 1, 3, 3)
    # 3 convs (+bias) + 2 BN (gamma, beta) + Dense: 6 + 4 + 2 trainable tensors
    assert len([p for p in module.parameters() if p.requires_grad]) == 12
    assert sum(p.numel() for p in module.parameters()) == sum(
        int(np.prod(v.shape)) for v in source.trainable_variables
    )
    # the NHWC <-> NCHW transposes between layers cancelled: one in, none between
    permutes = module.code.count("torch.permute")
    assert permutes <= 2, module.code
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.asarray(source(x)), rtol=1e-4, atol=1e-5)


def test_relaid_kernels_train_in_torch(keras_traced):
    _, x, graph = keras_traced
    module = interop.to_torch(graph).train()
    before = module.conv1.weight.detach().clone()
    loss = module(torch.from_numpy(x)).square().mean()
    loss.backward()
    torch.optim.SGD(module.parameters(), lr=0.1).step()
    assert not torch.equal(before, module.conv1.weight)
    assert module.bn1.num_batches_tracked.item() == 1  # batch statistics in training mode


def test_keras_cnn_becomes_native_flax_layers(keras_traced):
    source, x, graph = keras_traced
    module = interop.to_flax(graph)
    convs = [m for _, m in module.iter_modules() if isinstance(m, nnx.Conv)]
    norms = [m for _, m in module.iter_modules() if isinstance(m, nnx.BatchNorm)]
    assert len(convs) == 3 and len(norms) == 2
    # Dense's MatMul + Add(bias) is one nnx.Linear holding its bias
    linears = [m for _, m in module.iter_modules() if isinstance(m, nnx.Linear)]
    assert len(linears) == 1 and linears[0].use_bias
    params = nnx.state(module, nnx.Param)
    assert sum(v.size for v in jax.tree.leaves(params)) == sum(
        int(np.prod(v.shape)) for v in source.trainable_variables
    )
    module.eval()
    out = module(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    np.testing.assert_allclose(np.asarray(out), np.asarray(source(x)), rtol=1e-4, atol=1e-5)


def test_tied_kernel_stays_one_parameter():
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(3, 3, padding="same", name="shared")
    outputs = conv(conv(inputs))  # one kernel read by two Convs
    model = keras.Model(inputs, outputs)
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    graph = interop.trace(model, x)
    packed = pack_weights(graph.model, opset_of(graph.model))
    assert not any(name.endswith(".relaid") for name in packed.graph.initializers)
    module = interop.to_torch(graph).eval()
    assert len([p for p in module.parameters() if p.ndim == 4]) == 1
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.asarray(model(x)), rtol=1e-4, atol=1e-5)


def test_inverse_transposes_cancel_and_others_stay():
    import onnx_ir as ir
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, None)
    nodes = [
        helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]),
        helper.make_node("Transpose", ["a"], ["b"], perm=[0, 3, 1, 2]),  # undoes a
        helper.make_node("Relu", ["b"], ["y"]),
        helper.make_node("Transpose", ["a"], ["c"], perm=[0, 2, 1, 3]),  # does not
        helper.make_node("Relu", ["c"], ["z"]),
    ]
    proto = helper.make_model(helper.make_graph(nodes, "g", [x], [y, z]))
    model = ir.serde.deserialize_model(proto)
    assert cancel_inverse_transposes(model.graph) == 1
    relu = next(n for n in model.graph if n.outputs[0].name == "y")
    assert relu.inputs[0].name == "x"
    assert [n.op_type for n in model.graph].count("Transpose") == 2  # a (still read) and c
    x_value = np.random.default_rng(0).standard_normal((1, 2, 3, 4)).astype(np.float32)
    y_got, z_got = evaluate(ir.serde.deserialize_model(proto), x_value)  # through simplify
    np.testing.assert_array_equal(y_got, np.maximum(x_value, 0))
    np.testing.assert_array_equal(
        z_got, np.maximum(x_value.transpose(0, 2, 3, 1), 0).transpose(0, 2, 1, 3)
    )


def test_emission_leaves_the_callers_graph_alone(keras_traced):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 3, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, None)
    nodes = [  # nothing to fold, transposes to cancel, shapes to infer
        helper.make_node("Transpose", ["x"], ["a"], perm=[0, 2, 3, 1]),
        helper.make_node("Relu", ["a"], ["r"]),
        helper.make_node("Transpose", ["r"], ["b"], perm=[0, 3, 1, 2]),
        helper.make_node("Sigmoid", ["b"], ["y"]),
    ]
    plain = interop.load(helper.make_model(helper.make_graph(nodes, "g", [x], [y])))
    _, _, keras_graph = keras_traced
    for graph in (plain, keras_graph):
        before = graph.to_bytes()
        interop.to_torch(graph)
        interop.to_flax(graph)
        assert graph.to_bytes() == before
    assert [n.op_type for n in plain.model.graph] == ["Transpose", "Relu", "Transpose", "Sigmoid"]
    assert plain.model.graph.node(1).outputs[0].shape is None


class _NoAffineNet(nnx.Module):
    def __init__(self, rngs, use_bias=False):
        self.conv = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
        self.bn = nnx.BatchNorm(4, use_scale=False, use_bias=use_bias, momentum=0.8, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.conv(x))


def _no_affine_source(use_bias):
    source = _NoAffineNet(nnx.Rngs(0), use_bias)
    rng = np.random.default_rng(3)
    source.bn.mean.value = rng.uniform(-0.5, 0.5, 4).astype(np.float32)
    source.bn.var.value = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    if use_bias:
        source.bn.bias.value = rng.uniform(-0.5, 0.5, 4).astype(np.float32)
    source.eval()
    return source, rng.standard_normal((2, 8, 8, 3)).astype(np.float32)


@pytest.mark.parametrize("use_bias", [False, True])
def test_batchnorm_without_scale_is_a_keras_and_flax_layer_without_it(use_bias):
    source, x = _no_affine_source(use_bias)
    graph = interop.trace(source, (x,))
    emitted = interop.to_keras(graph)
    norm = next(la for la in emitted.layers if isinstance(la, keras.layers.BatchNormalization))
    assert not norm.scale and norm.center == use_bias
    assert len(norm.trainable_weights) == int(use_bias)
    np.testing.assert_allclose(np.asarray(emitted(x)), np.asarray(source(x)), rtol=1e-4, atol=1e-5)
    module = interop.to_flax(graph)
    bn = next(m for _, m in module.iter_modules() if isinstance(m, nnx.BatchNorm))
    assert not bn.use_scale and bn.use_bias == use_bias
    out = module(x)
    out = out[0] if isinstance(out, (list, tuple)) else out
    np.testing.assert_allclose(np.asarray(out), np.asarray(source(x)), rtol=1e-4, atol=1e-5)


def test_batchnorm_without_scale_and_bias_is_a_non_affine_torch_layer():
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.conv = nnx.Conv(3, 4, (3, 3), padding=1, rngs=rngs)
            self.bn = nnx.BatchNorm(4, use_scale=False, use_bias=False, momentum=0.8, rngs=rngs)

        def __call__(self, x):
            return self.bn(self.conv(x))

    source = Net(nnx.Rngs(0))
    rng = np.random.default_rng(3)
    source.bn.mean.value = rng.uniform(-0.5, 0.5, 4).astype(np.float32)
    source.bn.var.value = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    source.eval()
    x = rng.standard_normal((2, 8, 8, 3)).astype(np.float32)
    module = interop.to_torch(interop.trace(source, (x,))).eval()
    assert isinstance(module.bn, nn.BatchNorm2d) and not module.bn.affine
    assert module.bn.momentum == pytest.approx(0.2)
    np.testing.assert_allclose(module.bn.running_var.numpy(), source.bn.var.value, rtol=1e-6)
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, np.asarray(source(x)), rtol=1e-4, atol=1e-5)


def test_same_padding_at_stride_two_is_a_torch_conv():
    inputs = keras.Input((9, 10, 3))
    x = keras.layers.Conv2D(4, 3, strides=2, padding="same", name="down")(inputs)  # pads (0, 1)
    outputs = keras.layers.Conv1D(2, 4, strides=3, padding="same", name="seq")(
        keras.layers.Reshape((5 * 5, 4))(x)
    )
    model = keras.Model(inputs, outputs)
    x_value = np.random.default_rng(5).standard_normal((2, 9, 10, 3)).astype(np.float32)
    module = interop.to_torch(interop.trace(model, x_value)).eval()
    assert isinstance(module.down, nn.Conv2d) and isinstance(module.seq, nn.Conv1d)
    # height 9 pads (1, 1): torch's padding; width 10 pads (0, 1): one more on the right
    assert module.down.padding == (1, 0) and module.down.extra_pads == (0, 1, 0, 0)
    assert set(module.down.state_dict()) == {"weight", "bias"}
    with torch.no_grad():
        got = module(torch.from_numpy(x_value)).numpy()
    np.testing.assert_allclose(got, np.asarray(model(x_value)), rtol=1e-4, atol=1e-5)
