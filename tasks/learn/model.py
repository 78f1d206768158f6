"""The segmentation network and its torch-only mechanics: train steps, batched inference, checkpoints.

Imports torch and numpy only, so ``benchmarks/gpu_pseudolabel.py`` runs this exact code on a bare GPU
machine (no Prefect, Dask or rasterio there). Everything that knows about sites, rasters or the catalog
lives in the other modules of ``tasks/learn``.

Network: a compact U-Net (Ronneberger et al. 2015): ``depth`` 2x down-samplings, two 3x3 conv + BatchNorm +
ReLU per level, widths ``base_width * 2**level``, transposed-conv up-sampling, skip concatenation and a
1x1 head over ``CLASSES``. Base 16 / depth 3 is 0.47 M parameters: small enough to train on two CPU cores
within a refresh, wide enough for the 4-band field/boundary task; on CUDA the width scales by config.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
from collections.abc import Iterable
from dataclasses import asdict, dataclass

# A Dask worker shares its cores with other tasks; OpenMP threads that spin while waiting burn them (a
# training step was 5x slower on a loaded two-core machine). Effective only before torch first loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

CLASSES = ("background", "interior", "boundary")


@dataclass(frozen=True)
class ModelConfig:
    in_channels: int = 4
    n_classes: int = len(CLASSES)
    base_width: int = 16
    depth: int = 3

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this (inference pads to it)."""
        return 2**self.depth


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    def __init__(self, config: ModelConfig = ModelConfig()):
        super().__init__()
        self.config = config
        widths = [config.base_width * 2**i for i in range(config.depth + 1)]
        self.down = nn.ModuleList([_block(config.in_channels, widths[0])])
        self.down.extend(_block(widths[i - 1], widths[i]) for i in range(1, config.depth + 1))
        self.pool = nn.MaxPool2d(2)
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in reversed(range(config.depth))
        )
        self.dec = nn.ModuleList(_block(2 * widths[i], widths[i]) for i in reversed(range(config.depth)))
        self.head = nn.Conv2d(widths[0], config.n_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else self.pool(x))
            skips.append(x)
        x = skips.pop()
        for up, dec in zip(self.up, self.dec, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)


def to_channels_last(model: nn.Module) -> nn.Module:
    return model.to(memory_format=torch.channels_last)


def n_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def seed_everything(seed: int) -> None:
    """Same seed, same device, same thread count -> the same weights (CUDA: deterministic kernels)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():  # CPU kernels are deterministic already; the flag only slows them
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def set_threads(n: int) -> None:
    torch.set_num_threads(max(1, int(n)))


def torch_version() -> str:
    return str(torch.__version__)


def pick_device(prefer: str = "auto") -> torch.device:
    """``auto`` = CUDA when present, else CPU; the same code runs on both."""
    if prefer == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(prefer)


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA when asked; a no-op elsewhere (CPU bf16 is slower than fp32 on most CPUs)."""
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to(x: np.ndarray | torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    t = torch.as_tensor(x).to(device, non_blocking=True)
    if channels_last and t.ndim == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


def weighted_loss(
    logits: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, class_weights: torch.Tensor | None
) -> torch.Tensor:
    """Pixel cross-entropy times per-pixel weight (0 = ignore), normalised by the total weight."""
    ce = nn.functional.cross_entropy(logits.float(), target, weight=class_weights, reduction="none")
    return (ce * weight).sum() / weight.sum().clamp_min(1.0)


def one_cycle(step: int, steps: int, warm_share: float = 0.15, floor: float = 0.02) -> float:
    """Learning-rate factor: linear warm-up, then cosine decay to ``floor`` (valid for any ``steps``)."""
    warm = max(1, int(warm_share * steps))
    if step < warm:
        return (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))


def train(
    model: nn.Module,
    batches: Iterable[tuple[np.ndarray, np.ndarray, np.ndarray]],
    steps: int,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    class_weights: tuple[float, ...] | None = None,
    device: torch.device | None = None,
    bf16: bool = False,
    channels_last: bool = False,
) -> list[float]:
    """AdamW with a one-cycle schedule over ``steps`` batches of (x float32 NCHW, y int64 NHW, w float32 NHW).

    One-cycle because a few hundred steps is all a CPU refresh can afford: the warm-up and annealing make
    that short run converge far better than a constant rate. Returns the loss of every step.
    """
    device = device or next(model.parameters()).device
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: one_cycle(i, steps))
    cw = torch.tensor(class_weights, dtype=torch.float32, device=device) if class_weights else None
    losses = []  # device tensors: a float() per step would sync the GPU every step
    for _, (x, y, w) in zip(range(steps), batches, strict=False):
        xt = _to(x, device, channels_last)
        yt, wt = torch.as_tensor(y).to(device), torch.as_tensor(w).to(device)
        with autocast(device, bf16):
            logits = model(xt)
        loss = weighted_loss(logits, yt, wt, cw)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.detach())
    return torch.stack(losses).cpu().tolist() if losses else []


@torch.inference_mode()
def predict(
    model: nn.Module,
    tiles: np.ndarray,
    batch_size: int = 16,
    device: torch.device | None = None,
    bf16: bool = False,
    channels_last: bool = False,
) -> np.ndarray:
    """Softmax probabilities (N, n_classes, H, W) float32 for tiles (N, C, H, W), in batches.

    Tiles are zero-padded (reflect would invent texture at nodata edges) to a multiple of 2**depth and the
    output is cropped back, so any tile size works.
    """
    device = device or next(model.parameters()).device
    model.eval()
    n, _, h, w = tiles.shape
    cfg = model.config  # also reachable through torch.compile's wrapper
    ph, pw = (-h) % cfg.multiple, (-w) % cfg.multiple
    out = np.empty((n, cfg.n_classes, h, w), np.float32)
    for i in range(0, n, batch_size):
        x = torch.as_tensor(np.ascontiguousarray(tiles[i : i + batch_size], dtype=np.float32))
        if ph or pw:
            x = nn.functional.pad(x, (0, pw, 0, ph))
        with autocast(device, bf16):
            logits = model(_to(x, device, channels_last))
        prob = torch.softmax(logits.float(), dim=1)[:, :, :h, :w]
        out[i : i + len(x)] = prob.cpu().numpy()
    return out


def save_checkpoint(path, model: UNet, card: dict) -> None:
    """State dict + config + model card, all plain tensors and builtins so ``weights_only=True`` loads it."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, "config": asdict(model.config), "card": card}, path)


def load_checkpoint(path, device: torch.device | str = "cpu") -> tuple[UNet, dict]:
    """Rebuild the network from a checkpoint with ``weights_only=True`` (no pickled code is executed)."""
    blob = torch.load(path, map_location=device, weights_only=True)
    model = UNet(ModelConfig(**blob["config"])).to(device)
    model.load_state_dict(blob["state_dict"])
    model.eval()
    return model, blob["card"]
