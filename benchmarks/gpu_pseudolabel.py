"""Device check for the learn stage's network: training steps/s and inference tiles/s, fp32 vs bf16.

    python benchmarks/gpu_pseudolabel.py                      # CUDA: full sizes, about 2 minutes
    python benchmarks/gpu_pseudolabel.py --compile            # + torch.compile for inference
    python benchmarks/gpu_pseudolabel.py --device cpu --size 32 --infer-batch 2 --train-size 32 \\
        --train-batch 2 --configs tiny:4:2 --seconds 0.2      # smoke run on a CPU

Needs only torch and numpy (the GPU machine has neither Prefect, Dask nor rasterio): it imports the
pipeline's own ``tasks/learn/model.py`` from this checkout, so what it times is the code the stage runs
(``train`` and the network for training; the network under the same autocast/channels-last settings for
inference, plus ``predict`` end to end, numpy in and out). Tiles are synthetic (4 bands, random), which
is all that throughput depends on. Peak GPU memory is ``torch.cuda.max_memory_allocated`` per run.

Configs are ``name:base_width:depth``: ``ours`` (32:3) is the CUDA setting of ``LearnParams``;
``ref`` (32:4, 7.8 M parameters) is the plain U-Net of the issue's scale figure (about 8,000 tiles/s of
4x256x256 on an H100, bf16, compiled, channels-last). A global ``--budget-s`` stops early and says so.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from tasks.learn.model import (  # noqa: E402
    ModelConfig,
    UNet,
    autocast,
    n_parameters,
    pick_device,
    predict,
    seed_everything,
    to_channels_last,
    train,
)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device, seconds: float, warmup: int) -> tuple[float, int]:
    """Run ``fn`` ``warmup`` times, then repeatedly for about ``seconds``; return (seconds, calls)."""
    for _ in range(warmup):
        fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        if n % 4 == 0 or seconds <= 0.5:
            sync(device)
            if time.perf_counter() - t0 >= seconds:
                break
    sync(device)
    return time.perf_counter() - t0, n


def peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def bench_train(cfg: ModelConfig, bf16: bool, args, device: torch.device) -> dict:
    seed_everything(0)
    model = UNet(cfg).to(device)
    cl = device.type == "cuda"
    if cl:
        model = to_channels_last(model)
    g = torch.Generator(device="cpu").manual_seed(0)
    b, s = args.train_batch, args.train_size
    x = torch.randn(b, 4, s, s, generator=g).to(device)
    y = torch.randint(0, 3, (b, s, s), generator=g).to(device)
    w = torch.rand(b, s, s, generator=g).to(device)
    batches = iter(lambda: (x, y, w), None)  # the same on-device batch: no host copies in the loop
    steps = 8
    reset_peak(device)
    secs, calls = timed(
        lambda: train(model, batches, steps, device=device, bf16=bf16, channels_last=cl),
        device,
        args.seconds,
        warmup=1,
    )
    return {"train_steps_per_s": calls * steps / secs, "train_peak_mib": peak_mib(device)}


def bench_infer(cfg: ModelConfig, bf16: bool, args, device: torch.device) -> dict:
    seed_everything(0)
    model = UNet(cfg).to(device).eval()
    cl = device.type == "cuda"
    if cl:
        model = to_channels_last(model)
    net = torch.compile(model) if args.compile else model
    b, s = args.infer_batch, args.size
    x = torch.randn(b, 4, s, s, generator=torch.Generator().manual_seed(1)).to(device)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def step():
        with autocast(device, bf16):
            return torch.softmax(net(x).float(), dim=1)

    reset_peak(device)
    secs, calls = timed(step, device, args.seconds, warmup=3 if args.compile else 1)
    out = {"infer_tiles_per_s": calls * b / secs, "infer_peak_mib": peak_mib(device)}
    # end to end as the stage calls it: numpy tiles in, numpy probabilities out (host copies included)
    tiles = np.random.default_rng(2).normal(size=(b, 4, s, s)).astype(np.float32)
    secs, calls = timed(
        lambda: predict(model, tiles, batch_size=b, device=device, bf16=bf16, channels_last=cl),
        device,
        min(args.seconds, 3.0),
        warmup=1,
    )
    out["predict_tiles_per_s"] = calls * b / secs
    with torch.inference_mode(), autocast(device, bf16):
        out["_probs"] = torch.softmax(model(x[: min(b, 8)]).float(), dim=1).cpu()
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--configs", default="ours:32:3,ref:32:4", help="name:base_width:depth, comma separated")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--size", type=int, default=256, help="Inference tile side (4 bands).")
    ap.add_argument("--infer-batch", type=int, default=256)
    ap.add_argument("--train-size", type=int, default=224, help="Training crop side.")
    ap.add_argument("--train-batch", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=6.0, help="Timed seconds per measurement.")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network for inference.")
    ap.add_argument("--budget-s", type=float, default=170.0, help="Stop starting measurements after this.")
    ap.add_argument("--json", type=Path, default=None, help="Also write the results here.")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()
    device = pick_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (TF32 would blur the comparison)
    torch.backends.cudnn.allow_tf32 = False
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"device {name}; torch {torch.__version__}; python {sys.version.split()[0]}; compile={args.compile}"
    )
    print(f"train: batch {args.train_batch} x 4x{args.train_size}^2; ", end="")
    print(f"infer: batch {args.infer_batch} x 4x{args.size}^2")
    results = {"device": name, "torch": torch.__version__, "compile": args.compile, "runs": []}
    for spec in args.configs.split(","):
        label, base, depth = spec.split(":")
        cfg = ModelConfig(base_width=int(base), depth=int(depth))
        params = n_parameters(UNet(cfg))
        probs = {}
        for prec in args.precisions.split(","):
            if time.perf_counter() - t_start > args.budget_s:
                print(f"{label} {prec}: skipped (budget of {args.budget_s:.0f} s spent)")
                continue
            bf16 = prec == "bf16"
            if bf16 and device.type != "cuda":
                print(f"{label} bf16: skipped (bf16 autocast is CUDA-only in the pipeline)")
                continue
            row = {"config": label, "base_width": cfg.base_width, "depth": cfg.depth, "params": params}
            row.update(
                precision=prec, **bench_train(cfg, bf16, args, device), **bench_infer(cfg, bf16, args, device)
            )
            probs[prec] = row.pop("_probs")
            mem = ""
            if row["train_peak_mib"] is not None:
                gib = row["train_peak_mib"] / 1024, row["infer_peak_mib"] / 1024
                mem = f"; peak GiB train {gib[0]:.2f}, infer {gib[1]:.2f}"
            print(
                f"{label} ({params / 1e6:.2f} M params) {prec}: "
                f"train {row['train_steps_per_s']:.1f} steps/s, "
                f"infer {row['infer_tiles_per_s']:.0f} tiles/s (predict() end to end "
                f"{row['predict_tiles_per_s']:.0f}){mem}",
                flush=True,
            )
            results["runs"].append(row)
        if len(probs) == 2:
            diff = float((probs["fp32"] - probs["bf16"]).abs().max())
            print(f"{label}: max |p_fp32 - p_bf16| = {diff:.4f}")
            results.setdefault("bf16_max_abs_diff", {})[label] = diff
    results["seconds"] = time.perf_counter() - t_start
    print(f"total {results['seconds']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
