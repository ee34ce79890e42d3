"""Issue 22 part 4: keras.io-style subclassed models traced at one batch and run at others.

A variational autoencoder with the keras.io ``Sampling`` layer, and a model with a custom
``train_step`` trained a step in Keras before the capture. Each is checked against Keras
within 1e-4 at the example batch and two other batch sizes, and its torch and Flax
emissions at a third. (The ViT and the text transformer are in test_keras_dynamic_dims.py.)

Inference mode does not stop ``keras.random``: the keras.io Sampling layer draws fresh
noise from its SeedGenerator on every call, ``predict`` included, and no ONNX operator
reproduces the backend's random stream. A VAE is used for inference through its mean
(the encoder's ``z_mean`` fed to the decoder), which is deterministic and runs at any
batch. The sampled ``z`` itself is captured as the noise drawn at the trace: only right
at the example's batch, so the dim check declares the batch static, naming the layer,
and the comparison restores the seed state the trace drew from.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from keras import layers, ops

import interop

RS = np.random.RandomState(0)
TOL = 1e-4


def _np(value):
    return np.asarray(ops.convert_to_numpy(value))


def _close(graph, model, x):
    np.testing.assert_allclose(graph.run(x), _np(model(x, training=False)), rtol=TOL, atol=TOL)


def _emitted_close(graph, model, x):
    import torch

    want = _np(model(x, training=False))
    with torch.no_grad():
        got = interop.to_torch(graph)(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, want, rtol=TOL, atol=TOL)
    np.testing.assert_allclose(np.asarray(interop.to_flax(graph)(x)), want, rtol=TOL, atol=TOL)


# ---------------------------------------------------------------------------- VAE
class Sampling(layers.Layer):
    """keras.io: uses (z_mean, z_log_var) to sample z, the vector encoding a digit."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seed_generator = keras.random.SeedGenerator(1337)

    def call(self, inputs):
        z_mean, z_log_var = inputs
        batch = ops.shape(z_mean)[0]
        dim = ops.shape(z_mean)[1]
        epsilon = keras.random.normal(shape=(batch, dim), seed=self.seed_generator)
        return z_mean + ops.exp(0.5 * z_log_var) * epsilon


def _encoder(latent_dim=2):
    inputs = keras.Input(shape=(12, 12, 1))
    x = layers.Conv2D(8, 3, activation="relu", strides=2, padding="same")(inputs)
    x = layers.Conv2D(16, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Flatten()(x)
    x = layers.Dense(16, activation="relu")(x)
    z_mean = layers.Dense(latent_dim, name="z_mean")(x)
    z_log_var = layers.Dense(latent_dim, name="z_log_var")(x)
    z = Sampling(name="sampling")([z_mean, z_log_var])
    return keras.Model(inputs, [z_mean, z_log_var, z], name="encoder")


def _decoder(latent_dim=2):
    latent_inputs = keras.Input(shape=(latent_dim,))
    x = layers.Dense(3 * 3 * 16, activation="relu")(latent_inputs)
    x = layers.Reshape((3, 3, 16))(x)
    x = layers.Conv2DTranspose(16, 3, activation="relu", strides=2, padding="same")(x)
    x = layers.Conv2DTranspose(8, 3, activation="relu", strides=2, padding="same")(x)
    outputs = layers.Conv2DTranspose(1, 3, activation="sigmoid", padding="same")(x)
    return keras.Model(latent_inputs, outputs, name="decoder")


class VAE(keras.Model):
    """keras.io's VAE with a ``call``: in inference, the reconstruction of the mean."""

    def __init__(self, encoder, decoder, **kwargs):
        super().__init__(**kwargs)
        self.encoder = encoder
        self.decoder = decoder

    def call(self, inputs, training=False):
        z_mean, z_log_var, z = self.encoder(inputs, training=training)
        return self.decoder(z if training else z_mean, training=training)


def _images(batch):
    return RS.rand(batch, 12, 12, 1).astype("float32")


def test_vae_in_inference_mode_runs_at_other_batch_sizes():
    vae = VAE(_encoder(), _decoder())
    x = _images(2)
    vae(x)
    g = interop.trace(vae, x)
    assert g.inputs[0].shape == ("batch", 12, 12, 1)
    assert g.count_params() == vae.count_params()
    for batch in (2, 1, 5):
        _close(g, vae, _images(batch))
    _emitted_close(g, vae, _images(3))


def test_vae_sampled_z_holds_the_noise_of_the_trace_and_fixes_the_batch():
    encoder = _encoder()
    x = _images(2)
    state = encoder.get_layer("sampling").seed_generator.state
    start = _np(state)
    with pytest.warns(UserWarning, match="'batch' does not hold") as record:
        g = interop.trace(encoder, x)
    text = " ".join(str(w.message) for w in record)
    assert "layer 'sampling'" in text, text
    assert g.inputs[0].shape == (2, 12, 12, 1)
    state.assign(start)  # the noise the trace drew: Keras draws it again
    want = [_np(v) for v in encoder(x, training=False)]
    got = g.run(x)
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=TOL, atol=TOL)
    assert not np.allclose(want[2], want[0])  # z is the mean plus real noise
    # the deterministic outputs hold at other batches
    g2 = interop.trace(keras.Model(encoder.input, encoder.outputs[:2]), x)
    assert g2.inputs[0].shape[0] == "batch"
    for batch in (1, 4):
        other = _images(batch)
        for a, b in zip(g2.run(other), encoder(other)[:2], strict=True):
            np.testing.assert_allclose(a, _np(b), rtol=TOL, atol=TOL)


# ---------------------------------------------------------------------------- train_step
class CustomFit(keras.Model):
    """keras.io "Customizing what happens in fit()": a train_step of its own."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = layers.Dense(16, activation="relu")
        self.norm = layers.BatchNormalization()
        self.drop = layers.Dropout(0.3)
        self.out = layers.Dense(3)
        self.loss_tracker = keras.metrics.Mean(name="loss")

    def call(self, x, training=False):
        return self.out(self.drop(self.norm(self.hidden(x), training=training), training=training))

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = ops.mean(ops.square(y - y_pred))
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply(grads, self.trainable_variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}

    @property
    def metrics(self):
        return [self.loss_tracker]


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a tf.GradientTape step")
def test_model_with_a_custom_train_step_trained_then_captured():
    model = CustomFit()
    x, y = RS.rand(16, 6).astype("float32"), RS.rand(16, 3).astype("float32")
    model(x[:2])
    before = [_np(w) for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    moved = [
        not np.allclose(a, _np(w)) for a, w in zip(before, model.trainable_weights, strict=True)
    ]
    assert all(moved)  # the step changed every trainable weight
    assert not np.allclose(_np(model.norm.moving_mean), 0.0)  # and the statistics
    g = interop.trace(model, x[:2])
    assert g.inputs[0].shape == ("batch", 6)
    own = [w for layer in (model.hidden, model.norm, model.out) for w in layer.weights]
    assert g.count_params() == sum(int(np.prod(w.shape)) for w in own)  # not the metric's
    for batch in (2, 1, 7):
        _close(g, model, RS.rand(batch, 6).astype("float32"))
    _emitted_close(g, model, RS.rand(5, 6).astype("float32"))
