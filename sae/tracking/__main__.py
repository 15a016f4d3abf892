"""python -m sae.tracking RUN.wandb: print a run's records as JSON."""

import json
import sys
from pathlib import Path

from sae.tracking.wandb_file import read_wandb_run

for arg in sys.argv[1:]:
    print(json.dumps(read_wandb_run(Path(arg)), indent=1, default=str))
