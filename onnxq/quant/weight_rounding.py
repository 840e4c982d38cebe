"""Block-wise weight rounding for weight-only quantization: RTN, GPTQ, AWQ and HQQ, in numpy.

Every method returns the same thing: integer codes per block of `block_size` rows of a [K, N]
weight (K inputs, N outputs; the layout of an ONNX MatMul), with a scale and a zero point per
block, i.e. the form com.microsoft MatMulNBits and GatherBlockQuantized store. They differ in how
the codes (and the block parameters) are chosen:

- rtn: round to nearest with min/max block parameters. No data, no search.
- gptq (Frantar et al. 2022): the columns of W^T are quantized one input channel at a time, and
  each rounding error is pushed onto the channels not yet quantized, weighted by the inverse of the
  layer's input Hessian H = X^T X (calibration data), so that ||X W - X W_q|| stays small. Block
  parameters are taken from the already-updated weights when a block starts. Cost: O(N K^2) plus a
  K x K inverse per layer; needs H per MatMul input.
- awq (Lin et al. 2023): activation-aware scaling. Input channels with a large mean |x| matter
  more, so W's rows are multiplied by s = mean|x|^a before rounding (and X divided by s, folded into
  the producer of X elsewhere: onnxq.commands.weight_only); `a` is searched on a grid for the lowest output
  error tr(D^T H D). Then each block's clipping range is searched the same way. Without a place to
  fold 1/s only the clipping search applies.
- hqq (Badri & Shaji 2023): data-free; the zero point (asymmetric) or the scale (symmetric) of each
  block is refined by half-quadratic splitting to minimise an l_p (p < 1) norm of the rounding error,
  which lets outlier weights keep their error while the bulk gets closer. Zero points become floats
  (MatMulNBits stores them unpacked), unless integer zero points are asked for.

Everything is deterministic: no random numbers; float64 where it matters.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

METHODS = ("rtn", "gptq", "awq", "hqq")
GPTQ_DAMP = 0.01  # fraction of the mean diagonal of H added to it (GPTQ's percdamp)
AWQ_GRID = 20
CLIP_RATIOS = tuple(1.0 - 0.025 * i for i in range(21))  # 1.0 down to 0.5
HQQ_ITERS, HQQ_P, HQQ_BETA, HQQ_KAPPA = 20, 0.7, 10.0, 1.01


@dataclass(frozen=True)
class BlockFormat:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = True  # zero point 2^(bits-1) fixed (not stored); else one per block

    @property
    def qmax(self) -> int:
        return (1 << self.bits) - 1

    @property
    def mid(self) -> int:
        return 1 << (self.bits - 1)


@dataclass
class BlockQuant:
    """A [K, N] weight as codes [N, blocks, block_size] (0..2^bits-1), scales and zeros [N, blocks]."""

    codes: np.ndarray
    scales: np.ndarray
    zeros: np.ndarray
    k: int
    fmt: BlockFormat
    float_zeros: bool = False  # zeros are not integers (HQQ): stored unpacked, as floats

    def dequantize(self) -> np.ndarray:
        """The [K, N] float32 weight the kernels compute with."""
        values = (self.codes.astype(np.float64) - self.zeros[..., None]) * self.scales.astype(np.float32)[..., None]
        return values.reshape(values.shape[0], -1)[:, : self.k].T.astype(np.float32)


def concatenate(parts: list[BlockQuant]) -> BlockQuant:
    """One BlockQuant from parts that each hold some output columns of the same weight."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    return BlockQuant(np.concatenate([p.codes for p in parts]), np.concatenate([p.scales for p in parts]),
                      np.concatenate([p.zeros for p in parts]), first.k, first.fmt,
                      any(p.float_zeros for p in parts))


def blocks_of(weight: np.ndarray, block_size: int) -> np.ndarray:
    """[K, N] -> [N, blocks, block_size] float64, the last block zero-padded."""
    k, n = weight.shape
    count = -(-k // block_size)
    padded = np.zeros((count * block_size, n), np.float64)
    padded[:k] = weight
    return padded.T.reshape(n, count, block_size)


def minmax_params(values: np.ndarray, fmt: BlockFormat) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) over the last axis. Symmetric: the value m of largest magnitude becomes code 0
    (scale = -m / 2^(bits-1), negative when m > 0), so all 2^bits levels are used, as onnxruntime's own
    block quantizer does; values of the other sign beyond +7 steps clip by at most one step.
    Asymmetric: [min, max] with 0 inside."""
    if fmt.symmetric:
        index = np.abs(values).argmax(axis=-1)[..., None]
        scale = -np.take_along_axis(values, index, axis=-1)[..., 0] / fmt.mid
        zero = np.full(scale.shape, float(fmt.mid))
    else:
        lo = np.minimum(values.min(axis=-1), 0.0)
        hi = np.maximum(values.max(axis=-1), 0.0)
        scale = (hi - lo) / fmt.qmax
        zero = np.clip(np.round(-lo / np.where(scale > 0, scale, 1.0)), 0, fmt.qmax)
    return _safe(scale), zero


def _safe(scale: np.ndarray) -> np.ndarray:
    """Scales as float32 values (what the file stores), never 0."""
    scale = np.asarray(scale, np.float32).astype(np.float64)
    return np.where(scale != 0, scale, 1.0)


def encode(values: np.ndarray, scale: np.ndarray, zero: np.ndarray, fmt: BlockFormat) -> np.ndarray:
    """Codes of `values` [..., block] for per-block `scale`, `zero` [...]."""
    scale = np.asarray(scale, np.float32).astype(np.float64)
    return np.clip(np.round(values / scale[..., None]) + np.round(zero)[..., None], 0, fmt.qmax)


def rtn(weight: np.ndarray, fmt: BlockFormat) -> BlockQuant:
    cols = blocks_of(weight, fmt.block_size)
    scale, zero = minmax_params(cols, fmt)
    return BlockQuant(encode(cols, scale, zero, fmt).astype(np.uint8), scale.astype(np.float32), zero,
                      weight.shape[0], fmt)


def output_error(weight: np.ndarray, approx: np.ndarray, hessian: np.ndarray) -> float:
    """tr(D^T H D), D = weight - approx: the summed squared output error over the calibration rows."""
    diff = np.asarray(weight, np.float64) - approx
    return float(np.sum(diff * (hessian @ diff)))


def gptq(weight: np.ndarray, hessian: np.ndarray, fmt: BlockFormat, damp: float = GPTQ_DAMP,
         act_order: bool = False) -> BlockQuant:
    """GPTQ with block-wise groups: `hessian` [K, K] = X^T X (any positive multiple) of the layer's input.

    Block parameters come from the already-updated weights when a block starts. `act_order`: channels
    are quantized in order of decreasing H_ii (the most active first, while there is most room left to
    compensate); the block parameters are then fixed up front from the original weights ("static
    groups"), because the blocks MatMulNBits stores stay in channel order.
    """
    k, n = weight.shape
    bs = fmt.block_size
    count = -(-k // bs)
    size = count * bs
    w = np.zeros((n, size), np.float64)
    w[:, :k] = weight.T
    h = np.zeros((size, size), np.float64)
    h[:k, :k] = hessian
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(size)] += damp * float(np.mean(np.diag(h)))
    scales = np.zeros((n, count))
    zeros = np.zeros((n, count))
    order = np.arange(size)
    if act_order:
        for b in range(count):
            blk = slice(b * bs, (b + 1) * bs)
            scales[:, b], zeros[:, b] = best_range(w[:, blk], h[blk, blk], fmt)
        order = np.argsort(-np.diag(h), kind="stable")
    w, h = w[:, order], h[np.ix_(order, order)]
    upper = _inverse_cholesky_upper(h)
    codes = np.zeros((n, size), np.uint8)
    step = max(128, bs)  # column batches aligned to blocks: block parameters see every earlier update
    for start in range(0, size, step):
        stop = min(start + step, size)
        part = w[:, start:stop].copy()
        errors = np.zeros_like(part)
        inv = upper[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            block = order[col] // bs
            if not act_order and col % bs == 0:
                scales[:, block], zeros[:, block] = best_range(part[:, i : i + bs], h[col : col + bs, col : col + bs],
                                                               fmt)
            s, z = scales[:, block], zeros[:, block]
            q = encode(part[:, i : i + 1], s, z, fmt)[:, 0]
            codes[:, order[col]] = q
            err = (part[:, i] - (q - z) * s.astype(np.float32)) / inv[i, i]
            part[:, i:] -= np.outer(err, inv[i, i:])
            errors[:, i] = err
        w[:, stop:] -= errors @ upper[start:stop, stop:]
    return BlockQuant(codes.reshape(n, count, bs), scales.astype(np.float32), zeros, k, fmt)


def best_range(values: np.ndarray, block_hessian: np.ndarray, fmt: BlockFormat,
               ratios: tuple[float, ...] = CLIP_RATIOS) -> tuple[np.ndarray, np.ndarray]:
    """(scale, zero) per row of `values` [n, block]: the min/max range shrunk by the ratio with the lowest
    error d^T H_block d (AWQ's clipping search; also used at the start of each GPTQ block)."""
    best_err = np.full(values.shape[0], np.inf)
    best_s = best_z = None
    for ratio in ratios:
        s, z = minmax_params(values * ratio, fmt)
        diff = values - (encode(values, s, z, fmt) - z[:, None]) * s.astype(np.float32)[:, None]
        err = np.einsum("ni,ij,nj->n", diff, block_hessian, diff)
        if best_s is None:
            best_s, best_z, best_err = s, z, err
            continue
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_z = np.where(better, s, best_s), np.where(better, z, best_z)
    assert best_s is not None and best_z is not None
    return best_s, best_z


def _inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """Upper U with H^-1 = U^T U; more damping when H is numerically singular."""
    extra = 0.0
    for _ in range(8):
        try:
            inverse = np.linalg.inv(h + extra * np.eye(len(h)))
            return np.linalg.cholesky((inverse + inverse.T) / 2).T
        except np.linalg.LinAlgError:
            extra = max(extra * 10.0, 1e-6 * float(np.mean(np.diag(h))))
    raise np.linalg.LinAlgError("the input Hessian is not positive definite even after damping")


def awq_scales(weights: list[np.ndarray], hessian: np.ndarray, mean_abs: np.ndarray, fmt: BlockFormat,
               grid: int = AWQ_GRID) -> tuple[np.ndarray, float]:
    """Per-input-channel s (rows of every weight in `weights` times s, their shared input divided by s)
    with the lowest summed output error after RTN, and the exponent chosen. Exponent 0 (s = 1) is on
    the grid, so the result is never worse than RTN on this measure."""
    x = np.maximum(np.asarray(mean_abs, np.float64), 1e-8)
    best: tuple[float, np.ndarray, float] | None = None
    for step in range(grid):
        alpha = step / grid
        s = x**alpha
        s = s / np.sqrt(s.max() * s.min())
        error = 0.0
        for w in weights:
            approx = rtn(w * s[:, None], fmt).dequantize().astype(np.float64) / s[:, None]
            error += output_error(w, approx, hessian)
        if best is None or error < best[0]:
            best = (error, s, alpha)
    assert best is not None
    return best[1].astype(np.float32), best[2]


def clip_search(weight: np.ndarray, hessian: np.ndarray, fmt: BlockFormat) -> BlockQuant:
    """RTN whose per-block range is shrunk by the ratio with the lowest output error of that block
    (the block-diagonal part of H; AWQ's clipping search)."""
    k, _ = weight.shape
    bs = fmt.block_size
    cols = blocks_of(weight, bs)
    count = cols.shape[1]
    h = np.zeros((count * bs, count * bs))
    h[:k, :k] = hessian
    params = [best_range(cols[:, b], h[b * bs : (b + 1) * bs, b * bs : (b + 1) * bs], fmt) for b in range(count)]
    scales = np.stack([s for s, _ in params], axis=1)
    zeros = np.stack([z for _, z in params], axis=1)
    return BlockQuant(encode(cols, scales, zeros, fmt).astype(np.uint8), scales.astype(np.float32), zeros, k, fmt)


def _shrink(x: np.ndarray, beta: float, p: float) -> np.ndarray:
    """The proximal operator of the l_p norm (generalised soft threshold)."""
    magnitude = np.abs(x)
    return np.sign(x) * np.maximum(magnitude - np.power(np.maximum(magnitude, 1e-12), p - 1.0) / beta, 0.0)


def hqq(weight: np.ndarray, fmt: BlockFormat, *, integer_zeros: bool = False, iters: int = HQQ_ITERS,
        p: float = HQQ_P) -> BlockQuant:
    """HQQ: min/max start, then half-quadratic updates of the zero point (asymmetric) or the scale
    (symmetric) per block; each block keeps the iterate with its lowest mean |error|."""
    cols = blocks_of(weight, fmt.block_size)
    scale, zero = minmax_params(cols, fmt)
    zero = zero.astype(np.float64)
    live = np.zeros((cols.shape[0], cols.shape[1] * cols.shape[2]), bool)
    live[:, : weight.shape[0]] = True  # not the padding of the last block
    live = live.reshape(cols.shape)

    def quantized(s: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        zq = np.round(z) if integer_zeros or fmt.symmetric else z
        q = np.clip(np.round(cols / s.astype(np.float32)[..., None] + zq[..., None]), 0, fmt.qmax)
        return q, (q - zq[..., None]) * s.astype(np.float32)[..., None]

    def error(restored: np.ndarray) -> np.ndarray:
        return np.sum(np.abs(cols - restored) * live, axis=-1)

    best_s, best_z = scale.copy(), zero.copy()
    best_err = error(quantized(scale, zero)[1])
    beta = HQQ_BETA
    for _ in range(iters):
        q, restored = quantized(scale, zero)
        target = cols - _shrink(cols - restored, beta, p)  # what the dequantized block should equal
        if fmt.symmetric:
            centred = (q - fmt.mid) * live
            denom = np.sum(centred * centred, axis=-1)
            scale = _safe(np.where(denom > 0, np.sum(target * centred, axis=-1) / np.maximum(denom, 1e-12), scale))
        else:
            zero = np.clip(np.sum((q - target / scale.astype(np.float32)[..., None]) * live, axis=-1)
                           / np.maximum(live.sum(axis=-1), 1), 0, fmt.qmax)
        beta *= HQQ_KAPPA
        err = error(quantized(scale, zero)[1])
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s, best_z = np.where(better, scale, best_s), np.where(better, zero, best_z)
    zq = np.round(best_z) if integer_zeros or fmt.symmetric else best_z
    q = np.clip(np.round(cols / best_s.astype(np.float32)[..., None] + zq[..., None]), 0, fmt.qmax)
    return BlockQuant(q.astype(np.uint8), best_s.astype(np.float32), zq, weight.shape[0], fmt,
                      float_zeros=not (integer_zeros or fmt.symmetric))


def pack(quant: BlockQuant) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """MatMulNBits inputs: B [N, blocks, block_size * bits / 8] uint8, scales [N * blocks] float32, and
    zero points: None (symmetric), packed uint8 [N * ceil(blocks * bits / 8)], or float32 [N, blocks]."""
    n, count, _ = quant.codes.shape
    fmt = quant.fmt
    if fmt.bits == 8:
        packed = quant.codes.astype(np.uint8)
    else:
        packed = (quant.codes[..., 0::2] | (quant.codes[..., 1::2] << 4)).astype(np.uint8)
    scales = quant.scales.astype(np.float32).reshape(-1)
    if fmt.symmetric:
        return packed, scales, None
    if quant.float_zeros:
        return packed, scales, quant.zeros.astype(np.float32)
    z = quant.zeros.astype(np.uint8)
    if fmt.bits == 8:
        return packed, scales, z.reshape(-1)
    if count % 2:
        z = np.concatenate([z, np.zeros((n, 1), np.uint8)], axis=1)
    return packed, scales, (z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1).astype(np.uint8)


def quantize(weight: np.ndarray, fmt: BlockFormat, method: str, hessian: np.ndarray | None = None) -> BlockQuant:
    """One weight by `method` (awq here: the clipping search; its scaling needs the graph, see
    onnxq.commands.weight_only). gptq/awq without a Hessian (no data reached the layer) fall back to hqq."""
    if method == "rtn":
        return rtn(weight, fmt)
    if method == "hqq" or hessian is None:
        return hqq(weight, fmt)
    if method == "gptq":
        return gptq(weight, hessian, fmt)
    if method == "awq":
        return clip_search(weight, hessian, fmt)
    raise ValueError(f"unknown weight method {method!r}")
