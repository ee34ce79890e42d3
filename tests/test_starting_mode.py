"""Every emitted or converted model starts in inference mode, as the captured graph computes.

The source is an nnx CNN whose BatchNorm has non-trivial running statistics (a converted
module left in training mode differs from it by ~10% and overwrites the statistics on its
first call). Each emission is compared against ONNX Runtime on the captured graph.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import interop

nnx = pytest.importorskip("flax.nnx")
keras = pytest.importorskip("keras")

RTOL, ATOL = 1e-4, 1e-5


class SmallCnn(nnx.Module):
    def __init__(self, rngs):
        self.conv = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
        self.bn = nnx.BatchNorm(8, use_running_average=True, rngs=rngs)
        self.drop = nnx.Dropout(0.5, deterministic=True, rngs=rngs)
        self.head = nnx.Linear(8, 4, rngs=rngs)

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.conv(x))))
        return self.head(x.mean(axis=(1, 2)))


@pytest.fixture(scope="module")
def captured():
    model = SmallCnn(nnx.Rngs(0))
    rng = np.random.default_rng(0)
    # running statistics far from the batch's own: inference and training differ clearly
    model.bn.mean.value = rng.normal(0.5, 0.3, 8).astype(np.float32)
    model.bn.var.value = rng.uniform(2.0, 4.0, 8).astype(np.float32)
    x = rng.standard_normal((4, 12, 12, 3)).astype(np.float32)
    graph = interop.trace(model, (x,))
    return model, graph, x


def _expected(graph, x):
    return graph.run(x)  # ONNX Runtime


def test_torch_starts_in_eval_and_first_call_leaves_statistics(captured):
    _, graph, x = captured
    module = interop.to_torch(graph)
    assert not module.training and not any(m.training for m in module.modules())
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with torch.no_grad():
        got = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _expected(graph, x), rtol=RTOL, atol=ATOL)
    after = module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # train() switches as in torch: batch statistics, running statistics updated
    module.train()
    with torch.no_grad():
        trained = module(torch.from_numpy(x)).numpy()
    assert np.abs(trained - got).max() > 1e-2
    changed = [k for k in before if not torch.equal(before[k], module.state_dict()[k])]
    assert any(k.endswith("running_mean") for k in changed), changed


def test_keras_computes_inference_by_default(captured):
    _, graph, x = captured
    model = interop.to_keras(graph)
    before = [np.array(w) for w in model.non_trainable_weights]
    assert before, "BatchNorm statistics are non-trainable Keras variables"
    got = keras.ops.convert_to_numpy(model(x))
    np.testing.assert_allclose(got, _expected(graph, x), rtol=RTOL, atol=ATOL)
    assert all(np.array_equal(b, np.array(w)) for b, w in zip(before, model.non_trainable_weights))
    trained = keras.ops.convert_to_numpy(model(x, training=True))
    assert np.abs(trained - got).max() > 1e-2


def test_flax_and_jax_start_in_eval(captured):
    _, graph, x = captured
    module = interop.to_flax(graph)
    state = nnx.state(module, nnx.BatchStat)
    before = [np.array(v) for v in jax_leaves(state)]
    np.testing.assert_allclose(np.asarray(module(x)), _expected(graph, x), rtol=RTOL, atol=ATOL)
    after = [np.array(v) for v in jax_leaves(nnx.state(module, nnx.BatchStat))]
    assert before and all(np.array_equal(b, a) for b, a in zip(before, after))
    fn, params = interop.to_jax(graph)
    np.testing.assert_allclose(np.asarray(fn(params, x)), _expected(graph, x), rtol=RTOL, atol=ATOL)


def jax_leaves(tree):
    import jax

    return jax.tree_util.tree_leaves(tree)


@pytest.mark.parametrize("target", ["torch", "keras", "flax"])
def test_convert_with_verify_leaves_weights_and_statistics_untouched(captured, target):
    model, graph, x = captured
    source_stats = [np.array(model.bn.mean.value), np.array(model.bn.var.value)]
    native = interop.convert(model, to=target, example_inputs=(x,), verify=True)
    fresh = getattr(interop, f"to_{target}")(graph)
    if target == "torch":
        assert not native.training
        fresh_state = fresh.state_dict()
        assert all(torch.equal(v, fresh_state[k]) for k, v in native.state_dict().items())
    elif target == "keras":
        for a, b in zip(native.weights, fresh.weights):
            np.testing.assert_array_equal(np.array(a), np.array(b))
    else:
        weights = (nnx.Param, nnx.BatchStat)
        for a, b in zip(
            jax_leaves(nnx.state(native, *weights)), jax_leaves(nnx.state(fresh, *weights))
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # the source's own statistics are untouched too
    np.testing.assert_array_equal(np.array(model.bn.mean.value), source_stats[0])
    np.testing.assert_array_equal(np.array(model.bn.var.value), source_stats[1])


def test_nested_torch_guest_follows_its_host():
    guest = interop.torch.Module(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4)),
                                 example_inputs=(torch.randn(3, 4),))  # fmt: skip
    host = torch.nn.Sequential(guest, torch.nn.Linear(4, 1))
    assert guest.net.training == host.training is True  # a new nn.Module trains, as torch's
    host.eval()
    assert not guest.net.training and not any(m.training for m in guest.net.modules())
