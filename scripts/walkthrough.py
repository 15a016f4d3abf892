"""What the walkthrough scripts share (monosemanticity.py, minilm.py): key=value arguments and stages run as
subprocesses of the other scripts, each logged and timed."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def parse(argv: list[str], defaults: dict, usage: str) -> dict[str, str]:
    """key=value arguments over `defaults`; exits with one line naming a bad item or a missing out."""
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            sys.exit(f"error: {item!r} is not key=value with a key in {sorted(defaults)}")
        args[key] = value
    if not args["out"]:
        sys.exit(f"error: out is required: {usage}")
    return args


def run(stage: str, script: str, *overrides: str, timings: dict, log: Path) -> None:
    """Run scripts/<script> with Hydra overrides (see `command`)."""
    command(stage, [sys.executable, str(ROOT / "scripts" / script), *overrides], timings=timings, log=log)


def command(stage: str, argv: list[str], timings: dict, log: Path) -> None:
    """Run argv, its output to log, timed into timings[stage]; exit with its tail on failure."""
    shown = [Path(argv[1]).name, *argv[2:]] if argv[0] == sys.executable else argv
    print(f"[{stage}] {' '.join(shown)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=False)
    timings[stage] = time.perf_counter() - t0
    if proc.returncode:
        sys.exit(
            f"error: stage {stage} failed (exit {proc.returncode}); the end of {log}:\n"
            + "\n".join(log.read_text().splitlines()[-20:])
        )
    print(f"[{stage}] done in {timings[stage]:.0f} s", flush=True)


def lm_stage(args: dict[str, str], out: Path, logs: Path, timings: dict, save_timings, *overrides: str) -> Path:
    """The LM of a walkthrough: args["lm"] (an lm-train run) or out/lm, trained for args["lm_steps"] steps
    with `overrides` unless it is there already. Returns its run directory."""
    lm = Path(args["lm"]).expanduser().absolute() if args["lm"] else out / "lm"
    if not (lm / "metrics.json").exists():
        steps, where = f"trainer.steps={args['lm_steps']}", f"hydra.run.dir={lm}"
        run("lm-train", "train_lm.py", steps, *overrides, where, timings=timings, log=logs / "lm_train.log")
        save_timings()
    return lm


def workspace(args: dict[str, str]) -> tuple[Path, Path, dict, Callable[[], None]]:
    """(out, out/logs, the stage timings so far, a function saving them to out/timings.json), made if absent."""
    out = Path(args["out"]).expanduser().absolute()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    path = out / "timings.json"
    timings = json.loads(path.read_text()) if path.exists() else {}
    return out, out / "logs", timings, lambda: path.write_text(json.dumps(timings, indent=1))


def timings_table(timings: dict[str, float]) -> list[str]:
    """The lines of a markdown table of the stages' seconds (after a blank line)."""
    rows = [f"| {stage} | {seconds:.0f} |" for stage, seconds in timings.items()]
    return ["", "| stage | seconds |", "|---|---|", *rows]
