"""Quantize an unmodified Flax NNX model: QAT with nnx.Optimizer + nnx.jit, then convert
to the integer deploy and check it against the fake-quant model.

    python examples/nnx_qat.py            # Fashion-MNIST (Debian's dataset-fashion-mnist)
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import micronet_jax as mj
import micronet_jax.nnx as mjn
from micronet_jax.app import data


class LeNet(nnx.Module):
  def __init__(self, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(1, 10, (5, 5), padding="VALID", rngs=rngs)
    self.conv2 = nnx.Conv(10, 20, (5, 5), padding="VALID", rngs=rngs)
    self.fc1 = nnx.Linear(320, 50, rngs=rngs)
    self.fc2 = nnx.Linear(50, 10, rngs=rngs)

  def __call__(self, x):
    x = nnx.relu(nn.max_pool(self.conv1(x), (2, 2), strides=(2, 2)))
    x = nnx.relu(nn.max_pool(self.conv2(x), (2, 2), strides=(2, 2)))
    return self.fc2(nnx.relu(self.fc1(x.reshape((x.shape[0], -1)))))


def main(n_train: int = 4096, epochs: int = 2, batch: int = 64) -> None:
  ds = data.subset(data.load("fashion_mnist"), n_train, 1000)
  x, y = jnp.asarray(ds.x_train), jnp.asarray(ds.y_train)
  model = mjn.quantize(LeNet(nnx.Rngs(0)), mj.iao_rules(8, 8), x[:batch])  # a quantized copy
  print(mjn.summary(model, x[:batch]))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, xb, yb):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(m(xb), yb).mean()  # noqa: E731
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)  # trains nnx.Param only; QuantStats moved in the forward
    return loss

  model.train()  # observers move
  for epoch in range(epochs):
    for i in range(0, len(x) - batch + 1, batch):
      loss = train_step(model, optimizer, x[i:i + batch], y[i:i + batch])
    print(f"epoch {epoch}: loss {float(loss):.3f}")
  model.eval()  # observers frozen

  xt, yt = jnp.asarray(ds.x_test), jnp.asarray(ds.y_test)
  fake = nnx.jit(lambda m, x: m(x))(model, xt)
  deploy = mjn.convert(model, xt[:batch])
  logits = jax.jit(mj.integer_apply)(deploy, deploy.quantize_input(xt))
  print(f"fake-quant accuracy {float(jnp.mean(fake.argmax(-1) == yt)):.4f}, integer accuracy "
        f"{float(jnp.mean(logits.argmax(-1) == yt)):.4f}, predictions agree on "
        f"{float(jnp.mean(logits.argmax(-1) == fake.argmax(-1))):.2%}")


if __name__ == "__main__":
  main()
