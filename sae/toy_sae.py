"""SAEs on a toy model's hidden activations, one per setting of a `toy-train` run.

`toy-sae data.run=OUT` trains an SAE on h of each setting's best toy model and reports, per setting,
how well its decoder rows recover the toy model's represented feature directions (MMCS, Sharkey,
Braun & Millidge 2022). Each SAE's run directory is `<run dir>/setting_<s>/`, as `sae-train` writes it;
the table is in `<run dir>/toy_sae.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from sae.config import Config
from sae.data.toy import load_toy_run
from sae.training import train

REPORTED = ("mmcs", "recovered_fraction", "l0", "fvu", "dead_fraction")


def train_per_setting(cfg: Config, out_dir: str | Path) -> dict:
    """Train one SAE per toy setting (or only data.setting); returns and writes the per-setting table."""
    out_dir = Path(out_dir)
    arrays, toy_config = load_toy_run(cfg.data.run)
    n_settings = len(arrays["feature_probability"])
    chosen = range(n_settings) if cfg.data.setting is None else [cfg.data.setting]
    rows = []
    for s in chosen:
        setting_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, setting=s))
        metrics = train(setting_cfg, out_dir / f"setting_{s}")
        row = {"setting": s, "feature_probability": float(arrays["feature_probability"][s])}
        row.update({key: metrics[key] for key in REPORTED if key in metrics})
        rows.append(row)
    report = {
        "toy_run": str(Path(cfg.data.run).absolute()),
        "toy_model": toy_config["model"],
        "architecture": cfg.sae.name,
        "d_sae": cfg.sae.d_sae,
        "settings": rows,
    }
    (out_dir / "toy_sae.json").write_text(json.dumps(report, indent=2))
    print("setting  p         MMCS    recovered  L0")
    for row in rows:
        print(
            f"{row['setting']:>7}  {row['feature_probability']:<8.3g}  {row['mmcs']:.3f}   "
            f"{row['recovered_fraction']:>8.2f}  {row['l0']:.2f}"
        )
    return report
