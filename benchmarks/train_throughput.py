"""Training throughput of SASRec on Complete Journey windows: tokens/s per loss and device.

    python -m benchmarks.train_throughput --device cpu --steps 20
    python -m benchmarks.train_throughput --device cuda --precision bf16 --steps 100

A token is one item position with a next-item target. Times optimiser steps of the real training
step (``NextItemModule.training_step``) after warm-up; prints one line per loss.
"""

from __future__ import annotations

import argparse
import time

import torch

from recsys.data.completejourney import load_complete_journey
from recsys.data.vocabulary import PAD, UNK
from training.datamodule import ReceiptsDataModule
from training.module import NextItemModule


def measure(datamodule: ReceiptsDataModule, loss: str, args: argparse.Namespace) -> tuple[float, float]:
    net = {"name": "sasrec", "num_items": datamodule.vocab.size,
           "dim": args.dim, "num_layers": 2, "num_heads": 2, "max_len": datamodule.max_len}  # fmt: skip
    module = NextItemModule(net, datamodule.vocab, loss=loss).to(args.device)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    batches = iter(datamodule.train_dataloader())
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    tokens, elapsed = 0, 0.0
    for step in range(args.warmup + args.steps):
        items, gaps = (tensor.to(args.device) for tensor in next(batches))
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.autocast(args.device, dtype=dtype, enabled=args.precision == "bf16"):
            loss_value = module.training_step((items, gaps), step)
        optimizer.zero_grad(set_to_none=True)
        loss_value.backward()
        optimizer.step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            elapsed += time.perf_counter() - start
            inputs, targets = items[:, :-1], items[:, 1:]
            tokens += int(((targets > UNK) & (inputs != PAD)).sum())  # as training_step counts them
    return tokens / elapsed, elapsed / args.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--losses", nargs="+", default=["softmax", "sampled_softmax"])
    args = parser.parse_args()

    datamodule = ReceiptsDataModule(
        load_complete_journey, cutoff="2017-12-01", timezone="America/New_York", batch_size=args.batch_size
    )
    datamodule.setup("fit")
    device = (
        torch.cuda.get_device_name() if args.device == "cuda" else f"cpu x{torch.get_num_threads()} threads"
    )
    print(f"device={device} precision={args.precision} batch={args.batch_size} dim={args.dim} "
          f"vocab={datamodule.vocab.size}")  # fmt: skip
    for loss in args.losses:
        tokens_per_s, step_s = measure(datamodule, loss, args)
        print(f"loss={loss:16s} tokens/s={tokens_per_s:12,.0f} step={step_s * 1000:8.1f} ms")


if __name__ == "__main__":
    main()
