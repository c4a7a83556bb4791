"""A minimal PyTorch version of micronet's LeNet float and IAO W8A8 QAT step (benchmarks only).

PyTorch is not a dependency of micronet-jax; install it for the benchmarks with
``pip install torch==2.13.0`` (a CPU build is enough).

The IAO pieces follow micronet's ``wqaq/iao/quantize.py`` as described in
/work/shared/reference/micronet.md section 6 (written from that description, not
copied): observers that update under ``no_grad`` in training, scale and zero point
recomputed before every quantization, ``(clamp(round(x/scale - zp), qmin, qmax) + zp) *
scale`` with round half away from zero, and the clip-STE backward (gradient kept inside
the observer window, and inside [qmin, qmax] through ``torch.clamp``). Every conv and
linear layer quantizes its input and its weight, as micronet's ``prepare`` does with
full quantization. The configuration is micronet-jax's ``iao_rules`` default, which
micronet's classes support: weights symmetric per output channel with a min/max
observer (``weight_observer=0, q_level=0``), activations asymmetric per tensor with a
moving-average observer (momentum 0.1). LeNet's max-pools are functional here, as in
micronet-jax's LeNet, so neither side quantizes the pool inputs.

    python benchmarks/torch_micronet.py --steps 20      # times a few steps of both
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

EPS = torch.finfo(torch.float32).eps


def round_half_away(x: torch.Tensor) -> torch.Tensor:
  return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


class _ClipRound(torch.autograd.Function):
  """round half away from zero; backward passes the gradient where lo <= v <= hi."""

  @staticmethod
  def forward(ctx, v, lo, hi):
    ctx.save_for_backward((v >= lo) & (v <= hi))
    return round_half_away(v)

  @staticmethod
  def backward(ctx, g):
    (mask,) = ctx.saved_tensors
    return g * mask, None, None


class Quantizer(nn.Module):
  """micronet's IAO fake quantizer with its observer.

  ``symmetric``: scale = max(|min|, |max|) / ((qmax - qmin) / 2), zp = 0; otherwise
  scale = (max - min) / (qmax - qmin), zp = round(min / scale) (micronet's sign).
  ``per_channel``: statistics per row of dim 0 (output channel); ``moving``: a moving
  average of the per-batch extremes (momentum 0.1) instead of running extremes.
  """

  def __init__(self, bits: int, symmetric: bool, weight: bool, per_channel: bool, moving: bool, shape=(1,)):
    super().__init__()
    self.symmetric, self.per_channel, self.moving = symmetric, per_channel, moving
    if symmetric:
      self.qmin, self.qmax = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if weight else (-2 ** (bits - 1),
                                                                                           2 ** (bits - 1) - 1)
    else:
      self.qmin, self.qmax = 0, (2 ** bits - 2) if weight else (2 ** bits - 1)
    self.register_buffer("min_val", torch.zeros(shape))
    self.register_buffer("max_val", torch.zeros(shape))
    self.register_buffer("scale", torch.ones(shape))
    self.register_buffer("zero_point", torch.zeros(shape))
    self.num_flag = 0

  @torch.no_grad()
  def observe(self, x: torch.Tensor) -> None:
    if self.per_channel:
      flat = x.reshape(x.shape[0], -1)
      cur_min = flat.min(1).values.reshape(self.min_val.shape)
      cur_max = flat.max(1).values.reshape(self.max_val.shape)
    else:
      cur_min, cur_max = x.min().reshape(1), x.max().reshape(1)
    if self.num_flag == 0:
      self.num_flag = 1
      self.min_val.copy_(cur_min)
      self.max_val.copy_(cur_max)
    elif self.moving:
      self.min_val.mul_(0.9).add_(0.1 * cur_min)
      self.max_val.mul_(0.9).add_(0.1 * cur_max)
    else:
      torch.minimum(self.min_val, cur_min, out=self.min_val)
      torch.maximum(self.max_val, cur_max, out=self.max_val)

  @torch.no_grad()
  def update_qparams(self) -> None:
    if self.symmetric:
      self.scale.copy_(torch.clamp(torch.maximum(self.min_val.abs(), self.max_val.abs())
                                   / ((self.qmax - self.qmin) / 2), min=EPS))
      self.zero_point.zero_()
    else:
      self.scale.copy_(torch.clamp((self.max_val - self.min_val) / (self.qmax - self.qmin), min=EPS))
      self.zero_point.copy_(round_half_away(self.min_val / self.scale))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.training:
      self.observe(x)
      self.update_qparams()
    if self.symmetric:
      hi = torch.maximum(self.min_val.abs(), self.max_val.abs()) / self.scale
      lo = -hi
    else:
      lo, hi = self.min_val / self.scale - self.zero_point, self.max_val / self.scale - self.zero_point
    v = _ClipRound.apply(x / self.scale - self.zero_point, lo, hi)
    return (torch.clamp(v, self.qmin, self.qmax) + self.zero_point) * self.scale


def act_quantizer(bits: int = 8) -> Quantizer:
  return Quantizer(bits, symmetric=False, weight=False, per_channel=False, moving=True)


def weight_quantizer(out_channels: int, ndim: int, bits: int = 8) -> Quantizer:
  return Quantizer(bits, symmetric=True, weight=True, per_channel=True, moving=False,
                   shape=(out_channels,) + (1,) * (ndim - 1))


class QuantConv2d(nn.Conv2d):
  def __init__(self, *args, bits: int = 8, **kwargs):
    super().__init__(*args, **kwargs)
    self.aq, self.wq = act_quantizer(bits), weight_quantizer(self.out_channels, 4, bits)

  def forward(self, x):
    return self._conv_forward(self.aq(x), self.wq(self.weight), self.bias)


class QuantLinear(nn.Linear):
  def __init__(self, *args, bits: int = 8, **kwargs):
    super().__init__(*args, **kwargs)
    self.aq, self.wq = act_quantizer(bits), weight_quantizer(self.out_features, 2, bits)

  def forward(self, x):
    return F.linear(self.aq(x), self.wq(self.weight), self.bias)


class LeNet(nn.Module):
  """conv 10 k5 -> max-pool 2 -> relu -> conv 20 k5 -> max-pool 2 -> relu -> fc 50 ->
  relu -> dropout 0.5 -> fc 10, on (N, 1, 28, 28); ``quant``: IAO W8A8 on all four layers."""

  def __init__(self, quant: bool = False):
    super().__init__()
    conv, linear = (QuantConv2d, QuantLinear) if quant else (nn.Conv2d, nn.Linear)
    self.conv1, self.conv2 = conv(1, 10, 5), conv(10, 20, 5)
    self.fc1, self.fc2 = linear(320, 50), linear(50, 10)
    self.dropout = nn.Dropout(0.5)

  def forward(self, x):
    x = F.relu(F.max_pool2d(self.conv1(x), 2))
    x = F.relu(F.max_pool2d(self.conv2(x), 2))
    x = self.dropout(F.relu(self.fc1(x.flatten(1))))
    return self.fc2(x)


def make(quant: bool, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
  """LeNet (float or IAO W8A8) in training mode and its Adam (lr 1e-3), as micronet trains."""
  torch.manual_seed(seed)
  model = LeNet(quant).train()
  return model, torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8)


def train_step(model: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
  """One QAT (or float) step on a batch; returns the loss."""
  opt.zero_grad(set_to_none=True)
  loss = F.cross_entropy(model(x), y)
  loss.backward()
  opt.step()
  return loss.detach()


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--batch-size", type=int, default=128)
  args = p.parse_args()
  x = torch.randn(args.batch_size, 1, 28, 28)
  y = torch.randint(0, 10, (args.batch_size,))
  for quant in (False, True):
    model, opt = make(quant)
    train_step(model, opt, x, y)
    t0 = time.perf_counter()
    for _ in range(args.steps):
      loss = train_step(model, opt, x, y)
    dt = (time.perf_counter() - t0) / args.steps
    print(f"{'IAO W8A8' if quant else 'float'}: {1e3 * dt:.2f} ms/step (loss {float(loss):.3f}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")


if __name__ == "__main__":
  main()
