"""Argument checks for the Python side (fake kernels and the fallback path), worded like the
C++ checks so an error reads the same on every path."""
from __future__ import annotations

import math

import torch

TOPK_MAX_K = 2048
SOFT_TARGET_MAX_K = 2048

FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INTS = (torch.int16, torch.int32, torch.int64)


def fail(exc: type, op: str, arg: str, what: str):
    raise exc(f"vitfast.{op}: argument '{arg}' {what}")


def check_dtype(t: torch.Tensor, allowed, op: str, arg: str) -> None:
    if t.dtype not in allowed:
        names = ", ".join(str(a).replace("torch.", "") for a in allowed)
        fail(TypeError, op, arg, f"must have dtype in {{{names}}}, got {str(t.dtype).replace('torch.', '')}")


def check_topk_args(logits, k, temperature, values_dtype) -> None:
    op = "topk_softmax"
    if logits.dim() != 2:
        fail(ValueError, op, "logits", f"must be 2-D (rows, classes), got shape {list(logits.shape)}")
    check_dtype(logits, FLOATS[:3], op, "logits")
    c = logits.shape[1]
    if not 1 <= c <= 2**31 - 1:
        fail(ValueError, op, "logits", f"must have between 1 and 2^31-1 classes, got {c}")
    if not (1 <= k <= c and k <= TOPK_MAX_K):
        fail(ValueError, op, "k", f"must be in [1, min(classes, {TOPK_MAX_K})] = [1, {min(c, TOPK_MAX_K)}], got {k}")
    if not (math.isfinite(temperature) and temperature > 0):
        fail(ValueError, op, "temperature", f"must be finite and > 0, got {temperature}")
    if not math.isfinite(float(torch.tensor(1.0 / temperature, dtype=torch.float32))):
        fail(ValueError, op, "temperature", f"must be at least ~3e-39 (1 / temperature must fit a float32), "
             f"got {temperature}")
    if values_dtype not in (None, torch.float16, torch.float32):
        fail(TypeError, op, "values_dtype", f"must be torch.float16 or torch.float32, got {values_dtype}")


def check_soft_target_args(logits, values, indices, num_classes) -> None:
    op = "sparse_soft_target_cross_entropy"
    if logits.dim() != 2:
        fail(ValueError, op, "student_logits", f"must be 2-D (batch, classes), got shape {list(logits.shape)}")
    check_dtype(logits, FLOATS, op, "student_logits")
    check_dtype(values, FLOATS, op, "values")
    check_dtype(indices, INTS, op, "indices")
    for arg, t in (("values", values), ("indices", indices)):
        if t.device != logits.device:
            fail(ValueError, op, arg, f"must be on the same device as 'student_logits' ({logits.device}), got {t.device}")
    b, c = logits.shape
    if values.dim() != 2 or values.shape[0] != b:
        fail(ValueError, op, "values", f"must have shape ({b}, k) to match student_logits, got {list(values.shape)}")
    if indices.shape != values.shape:
        fail(ValueError, op, "indices", f"must have the shape of 'values' {list(values.shape)}, got {list(indices.shape)}")
    k = values.shape[1]
    if not (1 <= k <= c and k <= SOFT_TARGET_MAX_K):
        fail(ValueError, op, "values",
             f"must hold k in [1, min(classes, {SOFT_TARGET_MAX_K})] = [1, {min(c, SOFT_TARGET_MAX_K)}] entries per row, "
             f"got {k}")
    if num_classes != c:
        fail(ValueError, op, "num_classes", f"must equal student_logits.shape[1] = {c}, got {num_classes}")


# --- window_attention / head_mix_attention: the C++ check_layout + attach_mix, rule for rule ---
ATTN_MAX_HEAD_DIM = 256
ATTN_MAX_TOKENS = 4096
HEAD_MIX_MAX_HEADS = 32


def _same_device(a: torch.Tensor, b: torch.Tensor, op: str, arg_a: str, arg_b: str) -> None:
    if a.device != b.device:
        fail(ValueError, op, arg_b, f"must be on the same device as '{arg_a}' ({a.device}), got {b.device}")


def check_attention_args(op, qkv, num_heads, dim_k, dim_v, offsets, head_stride, scale, bias_table, bias_index, mask,
                         window_size, shift_size, check_values: bool = True) -> None:
    """What the native path refuses, refused the same way (type, argument, words) on the fallback.
    check_values=False leaves out the one check that reads tensor data (bias_index's range: a
    device sync on CUDA)."""
    check_dtype(qkv, FLOATS, op, "qkv")
    grid = qkv.dim() == 4
    if qkv.dim() not in (3, 4):
        fail(ValueError, op, "qkv", "must be (windows, tokens, channels) or a feature map (batch, height, width, "
             f"channels), got shape {list(qkv.shape)}")
    if grid:
        if not (len(window_size) == 2 and window_size[0] >= 1 and window_size[1] >= 1):
            fail(ValueError, op, "window_size", f"must be [win_h, win_w] >= 1 for a feature-map qkv, got {window_size}")
        if len(shift_size) != 2:
            fail(ValueError, op, "shift_size", f"must be [shift_h, shift_w], got {shift_size}")
        h, w = qkv.shape[1], qkv.shape[2]
        if h % window_size[0] or w % window_size[1]:
            fail(ValueError, op, "window_size", f"{window_size} must divide the feature map {h} x {w} (pad it first)")
        if not (0 <= shift_size[0] < h and 0 <= shift_size[1] < w):
            fail(ValueError, op, "shift_size", f"must lie in [0, feature map size) = [0, {h}) x [0, {w}), got "
                 f"{shift_size}")
        tokens = window_size[0] * window_size[1]
        windows = qkv.shape[0] * (h // window_size[0]) * (w // window_size[1])
        per_image = (h // window_size[0]) * (w // window_size[1])
    else:
        if window_size and not (len(window_size) == 2 and window_size[0] * window_size[1] == qkv.shape[1]):
            fail(ValueError, op, "window_size", f"must be empty (or multiply to the token count {qkv.shape[1]}) for "
                 f"already partitioned windows, got {window_size}")
        if shift_size and not (len(shift_size) == 2 and shift_size[0] == 0 and shift_size[1] == 0):
            fail(ValueError, op, "shift_size", "must be empty for already partitioned windows (shift the feature map, "
                 f"or pass it whole), got {shift_size}")
        tokens, windows, per_image = qkv.shape[1], qkv.shape[0], None
    if not 1 <= tokens <= ATTN_MAX_TOKENS:
        fail(ValueError, op, "qkv", f"must have between 1 and {ATTN_MAX_TOKENS} tokens per window, got {tokens}")
    if num_heads < 1:
        fail(ValueError, op, "num_heads", f"must be >= 1, got {num_heads}")
    for arg, d in (("dim_k", dim_k), ("dim_v", dim_v)):
        if not 1 <= d <= ATTN_MAX_HEAD_DIM:
            fail(ValueError, op, arg, f"must lie in [1, {ATTN_MAX_HEAD_DIM}], got {d}")
    if len(offsets) != 3:
        fail(ValueError, op, "offsets", f"must be [q_offset, k_offset, v_offset], got {offsets}")
    if head_stride < 1:
        fail(ValueError, op, "head_stride", f"must be >= 1, got {head_stride}")
    if not math.isfinite(scale):
        fail(ValueError, op, "scale", f"must be finite, got {scale}")
    # q, k and v of every head inside the channels, never overlapping (intervals, not channels)
    c = qkv.shape[-1]
    spans = []
    for h in range(num_heads):
        for name, off, d in zip("qkv", offsets, (dim_k, dim_k, dim_v)):
            lo, hi = off + h * head_stride, off + h * head_stride + d
            if off < 0 or hi > c:
                fail(ValueError, op, "offsets", f"{name} of head {h} spans channels [{lo}, {hi}) outside qkv's {c} "
                     f"channels (offsets {offsets}, head_stride {head_stride})")
            spans.append((lo, hi, name, h))
    spans.sort()
    for (lo0, hi0, _, _), (lo, _, name, h) in zip(spans, spans[1:]):
        if lo < hi0:
            fail(ValueError, op, "offsets", f"{name} of head {h} overlaps another head's q/k/v at channel {lo} "
                 f"(offsets {offsets}, head_stride {head_stride})")
    if (bias_table is None) != (bias_index is None):
        given, missing = ("bias_table", "bias_index") if bias_table is not None else ("bias_index", "bias_table")
        fail(ValueError, op, missing, f"must be given together with '{given}'")
    if bias_table is not None:
        check_dtype(bias_table, FLOATS, op, "bias_table")
        _same_device(qkv, bias_table, op, "qkv", "bias_table")
        if not (bias_table.dim() == 2 and bias_table.shape[0] == num_heads and bias_table.shape[1] >= 1):
            fail(ValueError, op, "bias_table", f"must be (num_heads, L) = ({num_heads}, L); pass Swin's (L, heads) "
                 f"table transposed; got {list(bias_table.shape)}")
        check_dtype(bias_index, (torch.int32, torch.int64), op, "bias_index")
        _same_device(qkv, bias_index, op, "qkv", "bias_index")
        if tuple(bias_index.shape) != (tokens, tokens):
            fail(ValueError, op, "bias_index", f"must be (tokens, tokens) = ({tokens}, {tokens}), got "
                 f"{list(bias_index.shape)}")
        lo, hi = (int(bias_index.min()), int(bias_index.max())) if check_values and has_data(bias_index) else (0, 0)
        if lo < 0 or hi >= bias_table.shape[1]:
            fail(ValueError, op, "bias_index", f"entries must lie in [0, {bias_table.shape[1]}) (the table's length), "
                 f"got [{lo}, {hi}]")
    if mask is not None:
        check_dtype(mask, FLOATS, op, "mask")
        _same_device(qkv, mask, op, "qkv", "mask")
        if not (mask.dim() == 3 and mask.shape[0] >= 1 and mask.shape[1] == tokens and mask.shape[2] == tokens):
            fail(ValueError, op, "mask", f"must be (window types, tokens, tokens) with tokens = {tokens}, got "
                 f"{list(mask.shape)}")
        if grid and mask.shape[0] != per_image:
            fail(ValueError, op, "mask", f"must hold one (tokens, tokens) mask per window of a feature map "
                 f"({per_image}), got {mask.shape[0]}")
        if not grid and windows % mask.shape[0]:
            fail(ValueError, op, "mask", f"window types ({mask.shape[0]}) must divide the number of windows "
                 f"({windows})")


def check_mix_args(op, qkv, num_heads, pre_mix, pre_mix_bias, post_mix, post_mix_bias) -> None:
    if num_heads > HEAD_MIX_MAX_HEADS:
        fail(ValueError, op, "num_heads", f"must be at most {HEAD_MIX_MAX_HEADS} for head mixing, got {num_heads}")
    for arg, t, matrix in (("pre_mix", pre_mix, True), ("pre_mix_bias", pre_mix_bias, False),
                           ("post_mix", post_mix, True), ("post_mix_bias", post_mix_bias, False)):
        if t is None:
            continue
        check_dtype(t, FLOATS, op, arg)
        _same_device(qkv, t, op, "qkv", arg)
        want = (num_heads, num_heads) if matrix else (num_heads,)
        if tuple(t.shape) != want:
            what = f"(num_heads, num_heads) = ({num_heads}, {num_heads})" if matrix else f"(num_heads,) = ({num_heads},)"
            fail(ValueError, op, arg, f"must be {what}, got {list(t.shape)}")


def has_data(t: torch.Tensor) -> bool:
    """False for meta and fake tensors and while torch.compile traces (shapes only): value checks
    are skipped there."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type != "meta" and not is_fake(t)


def shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes a and b can touch overlap (their spans within one storage)."""
    if not (has_data(a) and has_data(b)) or a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def span(t):
        lo = t.storage_offset() * t.element_size()
        extent = 1 + sum((n - 1) * abs(st) for n, st in zip(t.shape, t.stride()))
        return lo, lo + extent * t.element_size()

    (a0, a1), (b0, b1) = span(a), span(b)
    return a0 < b1 and b0 < a1


def check_covariance_args(count, mean, m2, y) -> None:
    """The C++ check_covariance_args, rule for rule (CPU dtypes: y may be float64)."""
    op = "covariance_update"
    if y.dim() != 2:
        fail(ValueError, op, "y", f"must be 2-D (rows, features), got shape {list(y.shape)}")
    check_dtype(y, FLOATS, op, "y")
    m = y.shape[1]
    if m < 1:
        fail(ValueError, op, "y", f"must have at least one feature column, got shape {list(y.shape)}")
    if not (count.dtype == torch.float64 and count.dim() == 0):
        fail(TypeError, op, "count", f"must be a 0-d float64 tensor, got {_name(count.dtype)} of shape "
             f"{list(count.shape)}")
    for arg, t in (("mean", mean), ("m2", m2)):
        if t.dtype != torch.float64:
            fail(TypeError, op, arg, f"must be float64, got {_name(t.dtype)}")
    if not (mean.dim() == 1 and mean.shape[0] == m and mean.is_contiguous()):
        fail(ValueError, op, "mean", f"must be a contiguous vector of y.shape[1] = {m} features, got shape "
             f"{list(mean.shape)}")
    if not (m2.dim() == 2 and tuple(m2.shape) == (m, m) and m2.is_contiguous()):
        fail(ValueError, op, "m2", f"must be a contiguous ({m}, {m}) matrix, got shape {list(m2.shape)}")
    for arg, t in (("count", count), ("mean", mean), ("m2", m2)):
        _same_device(y, t, op, "y", arg)
    named = (("count", count), ("mean", mean), ("m2", m2), ("y", y))
    for i in range(1, 4):
        for j in range(i):
            if shares_memory(named[i][1], named[j][1]):
                fail(ValueError, op, named[i][0], f"must not share memory with '{named[j][0]}'")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
