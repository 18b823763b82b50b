"""MiniViT's weight distillation: predictions (soft cross-entropy with temperature), attention
relations (MiniLMv2: relations of the q, k, v outputs) and hidden-state relations, on (student
layer, teacher layer) pairs. Swin relations are taken per window.

Shapes: relations need the same number of tokens per window at paired layers; channels may differ
(each side is scaled by its own sqrt(C / relation heads))."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..ops.dense_soft_target_ce import dense_soft_target_cross_entropy
from ..ops.reference import window_partition_reference
from .modules import _MiniBlock
from .multiplex import stage_blocks


def all_blocks(model: nn.Module) -> list[nn.Module]:
    return [b for s in stage_blocks(model) for b in s]


def to_windows(t: torch.Tensor, block: nn.Module, shifted: bool) -> torch.Tensor:
    """(B, N, C) as is; a (B, H, W, C) feature map of a Swin block cut into its windows (after its
    cyclic shift when `shifted`, as its attention sees them) -> (B * windows, N, C)."""
    if t.dim() == 3:
        return t
    shift = tuple(block.shift_size) if shifted else (0, 0)
    return window_partition_reference(t, tuple(block.window_size), shift)


class Capture:
    """Records, for the chosen layers of a model, the qkv linear's output and the block's output.
    Mini blocks record qkv themselves (their qkv is a shared module); timm blocks through a hook on
    their own attn.qkv. close() removes everything."""

    def __init__(self, model: nn.Module, layers: list[int], qkv: bool = True, hidden: bool = True):
        blocks = all_blocks(model)
        for i in layers:
            if not 0 <= i < len(blocks):
                raise UserError(f"distillation layer {i} does not exist: the model has {len(blocks)} layers")
        self.blocks = [blocks[i] for i in layers]
        self.qkv: dict[int, torch.Tensor] = {}
        self.hidden: dict[int, torch.Tensor] = {}
        self.handles = []
        for slot, b in enumerate(self.blocks):
            if qkv:
                if isinstance(b, _MiniBlock):
                    b.capture = True
                else:
                    self.handles.append(b.attn.qkv.register_forward_hook(self._keep(self.qkv, slot)))
            if hidden:
                self.handles.append(b.register_forward_hook(self._keep(self.hidden, slot)))

    @staticmethod
    def _keep(store, slot):
        def hook(_module, _inputs, output):
            store[slot] = output
        return hook

    def take(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """(qkv per layer as windows, hidden per layer as windows), then forget them."""
        qkv, hidden = [], []
        for slot, b in enumerate(self.blocks):
            if isinstance(b, _MiniBlock) and b.capture:
                self.qkv[slot] = b.captured_qkv
                b.captured_qkv = None
            if slot in self.qkv:
                qkv.append(to_windows(self.qkv.pop(slot), b, shifted=True))
            if slot in self.hidden:
                hidden.append(to_windows(self.hidden.pop(slot), b, shifted=False))
        return qkv, hidden

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        for b in self.blocks:
            if isinstance(b, _MiniBlock):
                b.capture = False
                b.captured_qkv = None


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """mean over rows of -sum softmax(teacher / T) log_softmax(student / T) (the official form), as
    one fused pass of vitfast's dense soft-target CE (float32 math, the teacher a constant)."""
    if temperature <= 0:
        raise UserError(f"the distillation temperature must be > 0, got {temperature}")
    return dense_soft_target_cross_entropy(student_logits, teacher_logits.detach(), 1.0 / temperature,
                                           1.0 / temperature)


def _relations(x: torch.Tensor, y: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, N, C) x (B, N, C) -> (B, heads, N, N) scaled dot products per relation head."""
    B, N, C = x.shape
    if C % heads:
        raise UserError(f"relation heads ({heads}) must divide the qkv width ({C})")
    xs = x.reshape(B, N, heads, C // heads).transpose(1, 2)
    ys = y.reshape(B, N, heads, C // heads).transpose(1, 2)
    return xs @ ys.transpose(-1, -2) / (C / heads) ** 0.5


def attention_relation_loss(student_qkv: torch.Tensor, teacher_qkv: torch.Tensor, heads: int = 1) -> torch.Tensor:
    """MiniLMv2 relations of q, k, v (the qkv linear's output, split in 3): for the 9 pairs (i, j),
    soft cross-entropy between softmax(X_i X_j^T / sqrt(C/heads)) of teacher and student; mean."""
    s = student_qkv.float().chunk(3, -1)
    with torch.no_grad():
        t = teacher_qkv.float().chunk(3, -1)
    if s[0].shape[:2] != t[0].shape[:2]:
        raise UserError(f"attention relations need the same windows and tokens on both sides: student "
                        f"{tuple(s[0].shape[:2])}, teacher {tuple(t[0].shape[:2])}")
    total = 0.0
    for i in range(3):
        for j in range(3):
            rs = _relations(s[i], s[j], heads)
            with torch.no_grad():
                pt = F.softmax(_relations(t[i], t[j], heads), -1)
            total = total - (pt * F.log_softmax(rs, -1)).sum(-1).mean()
    return total / 9


def hidden_relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """mean((n(S) n(S)^T - n(T) n(T)^T)^2) x tokens, with n() the L2 normalisation of each token
    (official Mini-Swin: x 49, its window's tokens)."""
    s = F.normalize(student.float(), dim=-1)
    with torch.no_grad():
        t = F.normalize(teacher.float(), dim=-1)
        rt = t @ t.transpose(-1, -2)
    if s.shape[:2] != t.shape[:2]:
        raise UserError(f"hidden relations need the same windows and tokens on both sides: student "
                        f"{tuple(s.shape[:2])}, teacher {tuple(t.shape[:2])}")
    return ((s @ s.transpose(-1, -2) - rt) ** 2).mean() * s.shape[1]


@torch.no_grad()
def check_pairs(student: nn.Module, teacher: nn.Module, cap_s: Capture, cap_t: Capture,
                pairs: list[tuple[int, int]], input_size, device) -> None:
    """One blank image through both models (eval mode: no RNG drawn) before training: a layer pair
    whose windows or tokens differ is refused naming the pair, not at the first training step."""
    x = torch.zeros(1, *input_size, device=device)
    modes = student.training, teacher.training
    student.eval()
    teacher.eval()
    try:
        student(x)
        teacher(x)
    finally:
        student.train(modes[0])
        teacher.train(modes[1])
    sq, sh = cap_s.take()
    tq, th = cap_t.take()
    for (i, j), a, b in zip(pairs, sq or sh, tq or th):
        if a.shape[:2] != b.shape[:2]:
            raise UserError(f"layer pair {i}:{j}: the student's layer {i} gives {a.shape[0]} window(s) of {a.shape[1]} "
                            f"tokens, the teacher's layer {j} {b.shape[0]} of {b.shape[1]}; relations need the same "
                            "(--layer-pairs, --distill-teacher)")


def default_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[int, int]]:
    """The official choice generalised: the second block of every pair of layers (the shifted one in
    Swin), matched by relative depth within each stage. Swin-T vs Swin-B gives the official
    (1,1), (3,3), (5,9), (7,15), (9,21), (11,23)."""
    ss, ts = stage_blocks(student), stage_blocks(teacher)
    if len(ss) != len(ts):
        raise UserError(f"default layer pairs need the same stages on both sides ({len(ss)} vs {len(ts)}); "
                        "give --layer-pairs")
    pairs, s0, t0 = [], 0, 0
    for sb, tb in zip(ss, ts):
        for j in range(1, len(sb), 2):
            k = round((j + 1) / len(sb) * len(tb)) - 1
            k = k if k % 2 == 1 or len(tb) == 1 else k - 1 if k > 0 else k
            pairs.append((s0 + j, t0 + max(0, min(k, len(tb) - 1))))
        if len(sb) == 1:
            pairs.append((s0, t0 + len(tb) - 1))
        s0, t0 = s0 + len(sb), t0 + len(tb)
    return pairs
