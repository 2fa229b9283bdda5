"""Shared building blocks, initialised the way the PyTorch CMG reference initialises them.

PyTorch defaults (reference_implementations.md §5.2) that differ from Flax's:

* `nn.Linear` / `nn.Conv2d` weight: kaiming_uniform(a=√5) = U(±1/√fan_in); bias: U(±1/√fan_in).
  For `nn.ConvTranspose2d` PyTorch takes fan_in from the weight's second axis, i.e. the *output*
  channels × kernel area; `ConvTranspose` below reproduces that.
* `nn.MultiheadAttention`: the packed q/k/v projection [d, 3d] is xavier_uniform with zero bias; the
  output projection keeps the Linear weight init but a zero bias.
* `nn.LayerNorm`: eps 1e-5.
* `nn.LSTM`: every weight and both bias vectors (b_ih, b_hh) are U(±1/√hidden); gates i, f, g, o.

Kernels use the Flax layout (`[in, out]` for dense, `[kh, kw, in, out]` for convolutions), so the
parameter counts equal the reference's; importing PyTorch weights needs the usual transposes.
"""

from collections.abc import Callable, Sequence
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any
Array = jax.Array

LAYER_NORM_EPSILON = 1e-5

# kaiming_uniform(a=√5): gain² = 2 / (1 + 5) = 1/3, bound = √(3·gain²/fan_in) = 1/√fan_in.
torch_weight_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
# ConvTranspose2d: PyTorch's fan_in is out_channels × kernel area (kernel layout [kh, kw, in, out]).
torch_transposed_weight_init = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


def torch_uniform_init(fan: int) -> nn.initializers.Initializer:
    """U(±1/√fan): PyTorch's Linear/conv bias init (fan = fan_in) and LSTM init (fan = hidden)."""
    bound = 1.0 / math.sqrt(fan)

    def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class Dense(nn.Module):
    """`y = x W + b` with PyTorch `nn.Linear` initialisation (params `kernel` [in, out], `bias`)."""

    features: int
    use_bias: bool = True
    zero_bias: bool = False  # PyTorch MultiheadAttention zeroes its output-projection bias.
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        fan_in = inputs.shape[-1]
        kernel = self.param("kernel", torch_weight_init, (fan_in, self.features))
        bias = None
        if self.use_bias:
            bias_init = nn.initializers.zeros if self.zero_bias else torch_uniform_init(fan_in)
            bias = self.param("bias", bias_init, (self.features,))
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        outputs = jnp.dot(inputs, kernel)
        return outputs if bias is None else outputs + bias


def conv_as_matmul(inputs: Array, kernel: Array, padding: int) -> Array:
    """Stride-1 2-D cross-correlation of NHWC `inputs` with an HWIO `kernel`, `padding` zeros per side.

    `jax.lax.conv_general_dilated(inputs, kernel, (1, 1), [(padding, padding)] * 2)` up to float
    rounding, computed as ONE matmul (im2col): the k x k shifted windows of the padded input side by
    side on the channel axis, times the kernel as a [k*k*C, O] matrix. On the CMG video maps (3x3 to
    7x7, 512 to 2304 channels) XLA:CPU's convolution reaches a fraction of its matmul speed.
    """
    kernel_height, kernel_width, in_features, features = kernel.shape
    if padding:
        inputs = jnp.pad(inputs, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    _, height, width, _ = inputs.shape
    out_height, out_width = height - kernel_height + 1, width - kernel_width + 1
    if out_height < 1 or out_width < 1:
        raise ValueError(f"Convolution of {inputs.shape} (padded) with {kernel.shape} is empty.")
    windows = [inputs[:, a:a + out_height, b:b + out_width]
               for a in range(kernel_height) for b in range(kernel_width)]
    patches = windows[0] if len(windows) == 1 else jnp.concatenate(windows, axis=-1)
    return jnp.dot(patches, kernel.reshape(kernel_height * kernel_width * in_features, features))


@jax.custom_vjp
def _place_taps(taps: Array) -> Array:
    """[N, H, W, k, k, O] per-tap products -> [N, H + k - 1, W + k - 1, O]: tap (a, b) of input
    position (i, j) is added at output position (i + k - 1 - a, j + k - 1 - b)."""
    batch, height, width, kernel_height, kernel_width, features = taps.shape
    # Accumulated in place into one buffer (k*k zero-padded copies would all be live at once).
    outputs = jnp.zeros((batch, height + kernel_height - 1, width + kernel_width - 1, features), taps.dtype)
    for a in range(kernel_height):
        for b in range(kernel_width):
            start = (0, kernel_height - 1 - a, kernel_width - 1 - b, 0)
            window = jax.lax.dynamic_slice(outputs, start, (batch, height, width, features))
            outputs = jax.lax.dynamic_update_slice(outputs, window + taps[:, :, :, a, b], start)
    return outputs


def _place_taps_forward(taps: Array) -> tuple[Array, tuple[int, ...]]:
    return _place_taps(taps), taps.shape


def _place_taps_backward(shape: tuple[int, ...], cotangent: Array) -> tuple[Array]:
    # The transpose of the placement gathers, for every input position and tap, the cotangent at
    # the output position it went to: one stacked gather, where autodiff of the forward would
    # build k*k zero-padded copies of the whole [N, H, W, k, k, O] array.
    _, height, width, kernel_height, kernel_width, _ = shape
    gathered = [cotangent[:, kernel_height - 1 - a:kernel_height - 1 - a + height,
                          kernel_width - 1 - b:kernel_width - 1 - b + width]
                for a in range(kernel_height) for b in range(kernel_width)]
    return (jnp.stack(gathered, axis=3).reshape(shape),)


_place_taps.defvjp(_place_taps_forward, _place_taps_backward)


def conv_transpose_as_matmul(inputs: Array, kernel: Array) -> Array:
    """Stride-1 VALID transposed convolution (H -> H + k - 1) of NHWC `inputs`, HWIO `kernel`.

    `jax.lax.conv_transpose(inputs, kernel, (1, 1), "VALID")` (no kernel flip) up to float rounding:
    output position i + k - 1 - a receives inputs[i] @ kernel[a]. Computed as ONE matmul of every
    input position with every tap ([N*H*W, C] x [C, k*k*O]), each tap's result added at its shifted
    place; the products with the k - 1 rows of zero padding that a convolution would compute (64% of
    them from 3x3 to 5x5) are never formed.
    """
    batch, height, width, in_features = inputs.shape
    kernel_height, kernel_width, _, features = kernel.shape
    taps = jnp.dot(inputs, kernel.transpose(2, 0, 1, 3).reshape(in_features, -1))
    return _place_taps(taps.reshape(batch, height, width, kernel_height, kernel_width, features))


class Conv(nn.Module):
    """Stride-1 2-D convolution over NHWC inputs with PyTorch `nn.Conv2d` initialisation.

    `padding` "VALID" (H -> H - k + 1) or "SAME" (odd k, H -> H); computed by `conv_as_matmul`.
    """

    features: int
    kernel_size: int
    padding: str = "VALID"
    use_bias: bool = True
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        in_features = inputs.shape[-1]
        shape = (self.kernel_size, self.kernel_size, in_features, self.features)
        kernel = self.param("kernel", torch_weight_init, shape)
        bias = None
        if self.use_bias:
            fan_in = self.kernel_size * self.kernel_size * in_features
            bias = self.param("bias", torch_uniform_init(fan_in), (self.features,))
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        if self.padding not in ("SAME", "VALID") or (self.padding == "SAME" and self.kernel_size % 2 == 0):
            raise ValueError(f"Conv padding must be 'VALID' or 'SAME' with an odd kernel, got "
                             f"{self.padding!r} with kernel {self.kernel_size}")
        pad = (self.kernel_size - 1) // 2 if self.padding == "SAME" else 0
        outputs = conv_as_matmul(inputs, kernel, pad)
        return outputs if bias is None else outputs + bias


class ConvTranspose(nn.Module):
    """Stride-1 unpadded transposed convolution (H -> H + k - 1), PyTorch `nn.ConvTranspose2d` init.

    The function of `jax.lax.conv_transpose(x, w, (1, 1), "VALID")` without kernel flipping (as
    `flax.linen.ConvTranspose` computes it), the same family of functions as PyTorch's: a PyTorch
    kernel [in, out, kh, kw] maps onto ours as `w.transpose(2, 3, 0, 1)[::-1, ::-1]`. Computed by
    `conv_transpose_as_matmul`.
    """

    features: int
    kernel_size: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        shape = (self.kernel_size, self.kernel_size, inputs.shape[-1], self.features)
        kernel = self.param("kernel", torch_transposed_weight_init, shape)
        fan_in = self.kernel_size * self.kernel_size * self.features
        bias = self.param("bias", torch_uniform_init(fan_in), (self.features,))
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        return conv_transpose_as_matmul(inputs, kernel) + bias


def layer_norm(name: str, dtype: Dtype | None = None) -> nn.LayerNorm:
    """PyTorch `nn.LayerNorm` equivalent (eps 1e-5, unit scale, zero bias)."""
    return nn.LayerNorm(epsilon=LAYER_NORM_EPSILON, dtype=dtype, name=name)


class MLP(nn.Module):
    """Dense layers (named `dense_{i}`) with `activation` between them, none after the last."""

    features: tuple[int, ...]
    activation: Callable[[Array], Array] = nn.relu
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        outputs = inputs
        for index, width in enumerate(self.features):
            if index:
                outputs = self.activation(outputs)
            outputs = Dense(width, dtype=self.dtype, name=f"dense_{index}")(outputs)
        return outputs


class MultiHeadSelfAttention(nn.Module):
    """PyTorch `nn.MultiheadAttention(d, heads, dropout)` as self-attention on batch-first inputs.

    Params: `in_proj_kernel` (packed q/k/v [d, 3d], xavier_uniform), `in_proj_bias` (zeros) and
    `out_proj` (a Dense with zero bias).
    Dropout (rate `dropout`) acts on the attention weights, as in PyTorch.
    """

    num_heads: int
    dropout: float = 0.0
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
        model_dim = inputs.shape[-1]
        if model_dim % self.num_heads:
            raise ValueError(f"model dim {model_dim} is not divisible by {self.num_heads} heads")
        head_dim = model_dim // self.num_heads
        kernel = self.param(
            "in_proj_kernel", nn.initializers.xavier_uniform(), (model_dim, 3 * model_dim))
        bias = self.param("in_proj_bias", nn.initializers.zeros, (3 * model_dim,))
        inputs, kernel, bias = nn.dtypes.promote_dtype(inputs, kernel, bias, dtype=self.dtype)
        packed = jnp.dot(inputs, kernel) + bias
        heads = packed.reshape(*inputs.shape[:-1], 3, self.num_heads, head_dim)
        query, key, value = heads[..., 0, :, :], heads[..., 1, :, :], heads[..., 2, :, :]
        logits = jnp.einsum("...qhd,...khd->...hqk", query, key) / math.sqrt(head_dim)
        weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(value.dtype)
        weights = nn.Dropout(self.dropout)(weights, deterministic=deterministic)
        attended = jnp.einsum("...hqk,...khd->...qhd", weights, value).reshape(inputs.shape)
        return Dense(model_dim, zero_bias=True, dtype=self.dtype, name="out_proj")(attended)


class TransformerEncoderLayer(nn.Module):
    """Post-LN transformer encoder layer (PyTorch `nn.TransformerEncoderLayer`; CMG `models.py`).

    x = LN1(x + Dropout(SelfAttention(x)));  x = LN2(x + Dropout(W2 Dropout(ReLU(W1 x)))).
    No positional encoding anywhere (the reference has none).
    """

    num_heads: int
    ffn_dim: int
    dropout: float
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array, *, deterministic: bool) -> Array:
        model_dim = inputs.shape[-1]
        dropout = nn.Dropout(self.dropout, deterministic=deterministic)  # Fresh mask at every call.
        attended = MultiHeadSelfAttention(
            self.num_heads, self.dropout, self.dtype, name="self_attention"
        )(inputs, deterministic=deterministic)
        hidden = layer_norm("norm_1", self.dtype)(inputs + dropout(attended))
        feed_forward = Dense(self.ffn_dim, dtype=self.dtype, name="linear_1")(hidden)
        feed_forward = dropout(nn.relu(feed_forward))
        feed_forward = Dense(model_dim, dtype=self.dtype, name="linear_2")(feed_forward)
        return layer_norm("norm_2", self.dtype)(hidden + dropout(feed_forward))


class LSTMLayer(nn.Module):
    """One unidirectional PyTorch-style LSTM layer, [B, T, D] -> [B, T, H], zero initial state.

    Params `w_ih` [D, 4H], `w_hh` [H, 4H], `b_ih`, `b_hh` [4H], all U(±1/√H); gates i, f, g, o.
    """

    hidden: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        init = torch_uniform_init(self.hidden)
        w_ih = self.param("w_ih", init, (inputs.shape[-1], 4 * self.hidden))
        w_hh = self.param("w_hh", init, (self.hidden, 4 * self.hidden))
        b_ih = self.param("b_ih", init, (4 * self.hidden,))
        b_hh = self.param("b_hh", init, (4 * self.hidden,))
        inputs, w_ih, w_hh, b_ih, b_hh = nn.dtypes.promote_dtype(
            inputs, w_ih, w_hh, b_ih, b_hh, dtype=self.dtype)
        input_gates = jnp.dot(inputs, w_ih) + b_ih + b_hh  # [B, T, 4H], all time steps at once

        def step(carry: tuple[Array, Array], gates_t: Array) -> tuple[tuple[Array, Array], Array]:
            hidden, cell = carry
            gates = gates_t + jnp.dot(hidden, w_hh)
            in_gate, forget_gate, cell_gate, out_gate = jnp.split(gates, 4, axis=-1)
            cell = (jax.nn.sigmoid(forget_gate) * cell
                    + jax.nn.sigmoid(in_gate) * jnp.tanh(cell_gate))
            hidden = jax.nn.sigmoid(out_gate) * jnp.tanh(cell)
            return (hidden, cell), hidden

        zeros = jnp.zeros((inputs.shape[0], self.hidden), input_gates.dtype)
        _, outputs = jax.lax.scan(step, (zeros, zeros), jnp.swapaxes(input_gates, 0, 1), unroll=True)
        return jnp.swapaxes(outputs, 0, 1)


class LSTM(nn.Module):
    """Stacked unidirectional LSTM (PyTorch `nn.LSTM(batch_first=True)`, no inter-layer dropout)."""

    hidden: int
    num_layers: int
    dtype: Dtype | None = None

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        outputs = inputs
        for index in range(self.num_layers):
            outputs = LSTMLayer(self.hidden, self.dtype, name=f"layer_{index}")(outputs)
        return outputs
