"""Ground-truth recovery of each SAE family on synthetic data at a given budget (one JSON line each).

  python scripts/benchmark_recovery.py --d-in 64 --n-features 512 --d-sae 1024 --tokens 20000000

Each family trains with its conf/sae/<name>.yaml defaults (d_sae overridden) through `sae.training.train`,
into --out/<name>; prints mmcs, recovered_fraction (cos > 0.9), fvu, l0, dead_fraction and seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import time
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sae import config as config_lib
from sae.architectures import FAMILIES
from sae.cli import CONF_DIR, register_schemas
from sae.training import train


def family_config(name: str, overrides: list[str]) -> config_lib.Config:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
        return OmegaConf.to_object(compose("train", overrides=[f"sae={name}", *overrides]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", default="all", help="comma-separated names, or 'all'")
    parser.add_argument("--d-in", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=512)
    parser.add_argument("--d-sae", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=20_000_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="outputs/recovery")
    args = parser.parse_args()
    register_schemas()
    names = list(FAMILIES) if args.arch == "all" else args.arch.split(",")
    for name in names:
        cfg = family_config(
            name,
            [
                f"data.d_in={args.d_in}",
                f"data.n_features={args.n_features}",
                f"sae.d_sae={args.d_sae}",
                f"trainer.total_tokens={args.tokens}",
                f"seed={args.seed}",
            ],
        )
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            metrics = train(cfg, Path(args.out) / name)
        keys = ("mmcs", "recovered_fraction", "fvu", "l0", "dead_fraction")
        print(
            json.dumps(
                {
                    "arch": name,
                    **{k: metrics[k] for k in keys},
                    "d_in": args.d_in,
                    "n_features": args.n_features,
                    "d_sae": args.d_sae,
                    "tokens": metrics["tokens"],
                    "seconds": time.perf_counter() - start,
                }
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()
