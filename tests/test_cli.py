"""`sae-train` from the command line: bad configs and data fail before training with one clear line."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT

SCRIPT = str(Path(ROOT) / "scripts" / "train_sae.py")


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    np.save(d / "flat.npy", np.zeros(100, np.float32))
    np.save(d / "ints.npy", np.zeros((100, 4), np.int64))
    nan = np.ones((100, 4), np.float32)
    nan[37, 2] = np.nan
    np.save(d / "nan.npy", nan)
    (d / "junk.npy").write_bytes(b"not an array")
    return d


CASES = {  # overrides -> text the error must contain
    "unknown_key": (["sae.kk=3"], "kk"),
    "wrong_type": (["sae.k=abc"], "sae.k"),
    "unknown_family": (["sae=nope"], "nope"),
    "k_above_d_sae": (["sae.k=600", "sae.d_sae=512"], "sae.k=600"),
    "negative_lr": (["optim.lr=-1"], "optim.lr=-1"),
    "zero_batch": (["trainer.batch_size=0"], "trainer.batch_size=0"),
    "missing_npy": (["data=arrays", "data.path={d}/missing.npy"], "missing.npy': no such file"),
    "unreadable_npy": (["data=arrays", "data.path={d}/junk.npy"], "junk.npy': not a readable .npy"),
    "one_dimensional": (["data=arrays", "data.path={d}/flat.npy"], "flat.npy': has shape (100,)"),
    "integer_dtype": (["data=arrays", "data.path={d}/ints.npy"], "ints.npy': dtype int64"),
    "nan_in_data": (["data=arrays", "data.path={d}/nan.npy"], "nan.npy': row 37 contains NaN"),
}


@pytest.mark.slow
def test_bad_inputs_fail_before_training(bad_files, tmp_path):
    """All cases run as concurrent processes; each exits non-zero, names the problem, writes nothing."""
    procs = {}
    for name, (overrides, _) in CASES.items():
        args = [o.format(d=bad_files) for o in overrides] + [f"hydra.run.dir={tmp_path / name}"]
        procs[name] = subprocess.Popen(
            [sys.executable, SCRIPT, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path
        )
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        expected = CASES[name][1].format(d=bad_files)
        assert proc.returncode != 0, name
        assert expected in err, (name, err[-2000:])
        assert "Traceback" not in err, (name, err[-2000:])
        assert not (tmp_path / name / "metrics.jsonl").exists(), name
