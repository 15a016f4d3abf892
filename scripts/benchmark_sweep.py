"""Time a sweep of SAEs trained in one pass against the same SAEs trained by separate runs, end to end.

  python scripts/benchmark_sweep.py --values 4,6,8,12 --tokens 4000000

Runs `sae-train` (this checkout's scripts/train_sae.py, each in a fresh process as a user would) once
per value, one after the other, then once with `sweep.key=sae.k sweep.values=[...]`, on the same data and
budget; the arms alternate over `--repeats` rounds so machine noise hits both alike. Prints one JSON line
with the median wall seconds of each arm, the tokens/s of each (SAEs × tokens ÷ seconds), their ratio
(`sweep_speedup`), and the final MMCS of every SAE of both arms (they must agree: the sweep trains the
same SAEs). Extra arguments after `--` go to every run (e.g. `-- data=cached data.path=STORE`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TRAIN = Path(__file__).resolve().parent / "train_sae.py"


def run(args: list[str], out: Path) -> float:
    """Wall seconds of one `sae-train` run writing to out."""
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, str(TRAIN), *args, f"hydra.run.dir={out}", "checkpoint.every=0"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", default="4,6,8,12", help="the k of each TopK SAE")
    parser.add_argument("--tokens", type=int, default=4_000_000, help="trainer.total_tokens of every SAE")
    parser.add_argument("--d-sae", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="more overrides for every run (after --)")
    args = parser.parse_args()
    values = [int(v) for v in args.values.split(",")]
    common = ["sae=topk", f"sae.d_sae={args.d_sae}", f"trainer.total_tokens={args.tokens}", *args.extra]
    separate_s, sweep_s = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            separate_s.append(sum(run([*common, f"sae.k={k}"], Path(tmp) / f"{r}/k{k}") for k in values))
            sweep_s.append(run([*common, "sweep.key=sae.k", f"sweep.values=[{args.values}]"], Path(tmp) / f"{r}/sweep"))
        mmcs = {
            "separate": [json.loads((Path(tmp) / f"0/k{k}/metrics.json").read_text()).get("mmcs") for k in values],
            "sweep": [json.loads((Path(tmp) / f"0/sweep/k={k}/metrics.json").read_text()).get("mmcs") for k in values],
        }
    separate, sweep = statistics.median(separate_s), statistics.median(sweep_s)
    total = len(values) * args.tokens
    print(
        json.dumps(
            {
                "values": values,
                "tokens_per_sae": args.tokens,
                "d_sae": args.d_sae,
                "extra": args.extra,
                "separate_s": separate,
                "sweep_s": sweep,
                "separate_tokens_per_s": total / separate,
                "sweep_tokens_per_s": total / sweep,
                "sweep_speedup": separate / sweep,
                "mmcs": mmcs,
            }
        )
    )


if __name__ == "__main__":
    main()
