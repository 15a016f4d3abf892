"""`inspect_run`: statistics, examples, neighbours, ground truth, plots and the browser for one run directory.

An SAE or per-layer transcoder is inspected by its encoder on its input rows; a cross-layer transcoder's L·F
features (sae/inspect/dictionary.py) each on its layer's input, with its decoder norm into every layer it
writes to (`decoder_layer_norms`) and neighbours by its decoders into all layers side by side. Ground truth
(directions in the output space) is matched for SAEs and per-layer transcoders only.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sae.data import DataError
from sae.errors import ConfigError
from sae.export import CFG_FILENAME
from sae.export_clt import CONFIG
from sae.inspect import config as inspect_config
from sae.inspect.config import InspectConfig
from sae.inspect.dictionary import (
    CLTFeatures,
    Dictionary,
    decoder_rows,
    describe,
    is_transcoder,
    load_dictionary,
    run_config,
)
from sae.inspect.examples import example_context
from sae.inspect.report import Inspection
from sae.inspect.rows import Rows, data_config, load_vocab, open_layer_rows, open_rows
from sae.inspect.site import write_site
from sae.inspect.stats import accumulate, decoder_neighbours, ground_truth_match
from sae.interrupts import Interrupted, StopSignals, signal_name
from sae.outputs import check_writable, disk_errors
from sae.progress import Progress


def _load_labels(path: str | None, run: Path, d_sae: int) -> dict[int, str]:
    """Feature labels from a .json {feature: label} (default RUN/labels.json when it exists)."""
    if path is None:
        if not (run / "labels.json").is_file():
            return {}
        path = run / "labels.json"
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        labels = {int(k): str(v) for k, v in raw.items()}
    except (OSError, ValueError, AttributeError) as err:
        raise DataError(f"labels='{path}': expected a JSON object {{feature id: label}} ({err})") from err
    bad = [k for k in labels if not 0 <= k < d_sae]
    if bad:
        raise DataError(f"labels='{path}': feature ids {bad[:5]} are outside 0..{d_sae - 1}")
    return labels


def _on_rows(total: int, stop: StopSignals, out: Path):
    """The pass's callback: a progress line every ~5% (rows, rows/s, ETA) and, on Ctrl-C or SIGTERM, a clean
    stop (nothing is written before the pass ends)."""
    progress = Progress(total, 0, "inspect", "rows")

    def report(done: int) -> None:
        progress.update(done)
        if stop.requested:
            raise Interrupted(
                f"stopped by {signal_name(stop.requested)} after {done:,} of {total:,} rows: nothing written to "
                f"{out}; run the same command again to start over",
                stop.requested,
            )

    return report


def _check_stop(stop: StopSignals, out: Path, where: str) -> None:
    if stop.requested:
        raise Interrupted(
            f"stopped by {signal_name(stop.requested)} {where}: nothing written to {out}; "
            "run the same command again to start over",
            stop.requested,
        )


def _files(directory: Path) -> set[Path]:
    return {p for p in directory.rglob("*") if p.is_file()} if directory.is_dir() else set()


@contextlib.contextmanager
def _whole_or_removed(out: Path) -> Iterator[None]:
    """On any failure inside (a full disk, a second Ctrl-C), remove the files and empty folders it added to `out`."""
    before, existed = _files(out), out.is_dir()
    folders = {p for p in out.rglob("*") if p.is_dir()} if existed else set()
    try:
        yield
    except BaseException:
        for path in _files(out) - before:
            path.unlink(missing_ok=True)
        made = {p for p in out.rglob("*") if p.is_dir()} - folders if out.is_dir() else set()
        for folder in sorted(made, key=lambda p: len(p.parts), reverse=True) + ([] if existed else [out]):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        raise


def inspect_run(cfg: InspectConfig | str | Path, **overrides) -> Inspection:
    """Inspect a sae-train run directory; writes OUT/inspect (or cfg.out) and returns the Inspection.

    cfg: an InspectConfig, or the run directory with InspectConfig fields as keyword overrides
    (`inspect_run("OUT", rows=100_000, data={"path": "other_store"})`). Raises ConfigError / DataError
    with one line naming the field or file for user mistakes.
    """
    if not isinstance(cfg, InspectConfig):
        cfg = InspectConfig(run=str(cfg), **overrides)
    inspect_config.check(cfg)
    run = Path(cfg.run)
    out = Path(cfg.out) if cfg.out else run / "inspect"
    check_writable(out, "out")  # before any work: not a traceback once the pass is done
    try:
        sae = load_dictionary(run / "sae")
    except DataError:
        raise  # a truncated or damaged export, or neither layout: the message names the file
    except (FileNotFoundError, ValueError) as err:
        raise DataError(f"run='{run}': not a sae-train output directory ({err})") from None
    rows = _open_rows(cfg, sae, run)
    d_in, d_sae = sae.d_in, sae.d_sae
    if rows.d_in != d_in:
        raise DataError(f"{rows.description}: rows have d_in={rows.d_in}; the SAE in '{run / 'sae'}' expects {d_in}")
    with_context = rows.tokens is not None and rows.takes is not None
    vocab = load_vocab(cfg.vocab, rows.store_path) if with_context else None  # user files are read up front
    labels = _load_labels(cfg.labels, run, d_sae)
    t0 = time.perf_counter()
    print(f"inspect: {describe(sae)} d_in={d_in} d_sae={d_sae} on {rows.description} -> {out}", flush=True)
    with StopSignals(what="sae-inspect") as stop:
        insp, timings = _inspect(cfg, sae, rows, run, out, vocab, labels, stop, t0)
        line = (
            f"inspect: {rows.n_rows:,} rows in {timings['total_s']:.1f} s; {len(insp.dead)} dead, "
            f"{len(insp.ultra_low_density)} below density {cfg.ultra_low_density}"
        )
        if insp.has_ground_truth:
            line += " | " + " ".join(f"{k} {v:.4g}" for k, v in insp.mmcs().items())
        print(line + f" -> {out / 'index.html'}", flush=True)
        if stop.requested:
            raise Interrupted(
                f"stopped by {signal_name(stop.requested)} once the inspection was complete: {out} holds all of it",
                stop.requested,
            )
    _log_plots(run, run_config(sae), insp.plots)
    return insp


def _open_rows(cfg: InspectConfig, sae: Dictionary, run: Path) -> Rows:
    """The rows of the run's saved data config with cfg.data's overrides: a CLT's layer stores side by side,
    else the input rows (a per-layer transcoder's data.path; its target store is not read)."""
    saved = run_config(sae).get("data")
    if saved is None and "name" not in cfg.data:
        name = CONFIG if isinstance(sae, CLTFeatures) else CFG_FILENAME
        raise ConfigError(f"run='{run}': its sae/{name} records no data config; give data.name=... and data.path=...")
    data = data_config(saved or {}, dict(cfg.data))
    if isinstance(sae, CLTFeatures):
        return open_layer_rows(data, sae.input_sites, cfg.rows)
    return open_rows(data, cfg.rows, cfg.seed, cfg.batch_size)


def _ground_truth(sae: Dictionary, run: Path, rows: Rows) -> np.ndarray | None:
    """True directions in the output space [n_features, d_out] (RUN/ground_truth.npy, else the rows'), or None;
    None for a CLT (its decoder rows span every layer). DataError naming the file for another width."""
    truth_path = run / "ground_truth.npy"
    truth = np.load(truth_path) if truth_path.is_file() else rows.ground_truth
    if truth is None or isinstance(sae, CLTFeatures):
        return None
    if truth.ndim != 2 or truth.shape[1] != sae.d_out:
        where = f"'{truth_path}'" if truth_path.is_file() else rows.description
        raise DataError(f"{where}: ground truth of shape {truth.shape}; expected [n_features, {sae.d_out}]")
    return truth


def _dictionary_meta(sae: Dictionary) -> dict:
    """What meta.json and the browser say of the dictionary: kind, description, widths, a CLT's layers."""
    kind = "clt" if isinstance(sae, CLTFeatures) else "transcoder" if is_transcoder(sae) else "sae"
    meta = {"kind": kind, "dictionary": describe(sae), "architecture": sae.architecture, "d_out": sae.d_out}
    if isinstance(sae, CLTFeatures):
        meta.update(n_layers=sae.n_layers, features_per_layer=sae.features_per_layer)
        meta.update(input_sites=sae.input_sites, output_sites=sae.output_sites)
    return meta


def _inspect(cfg: InspectConfig, sae, rows, run: Path, out: Path, vocab, labels, stop: StopSignals, t0: float):
    """The pass over the rows, the context pass and the outputs (written whole, or removed on a failure);
    returns (the Inspection, its timings). A stop request before the outputs raises Interrupted."""
    d_in, d_sae = sae.d_in, sae.d_sae
    with_context = rows.tokens is not None and rows.takes is not None
    arrays = accumulate(
        sae,
        rows.batches(cfg.batch_size),
        cfg.batch_size,
        cfg.bins_per_octave,
        cfg.hist_min,
        cfg.hist_max,
        cfg.top_k,
        cfg.n_random,
        cfg.random_stride,
        cfg.seed,
        _on_rows(rows.n_rows, stop, out),
    )
    timings = {"stats_s": time.perf_counter() - t0}
    row_floor = arrays.pop("row_floor")  # [n_rows, layers]: needed for the context pass only, not saved
    w_dec = decoder_rows(sae)
    arrays["neighbours"], arrays["neighbour_cosines"] = decoder_neighbours(w_dec, cfg.n_neighbours)
    if isinstance(sae, CLTFeatures):
        arrays["decoder_layer_norms"] = sae.decoder_layer_norms()
    truth = _ground_truth(sae, run, rows)
    if truth is not None:
        arrays.update(ground_truth_match(w_dec, truth))
    if with_context:
        t1 = time.perf_counter()
        examples = np.concatenate([arrays["top_rows"], arrays["random_rows"]], axis=1)
        arrays.update(
            example_context(
                sae,
                rows.takes,
                rows.tokens[0],
                rows.tokens[1],
                examples,
                cfg.context_before,
                cfg.context_after,
                row_floor,
            )
        )
        timings["context_s"] = time.perf_counter() - t1
    _check_stop(stop, out, "after the pass over the rows")
    meta = {
        "run": str(run.absolute()),
        "description": rows.description,
        **_dictionary_meta(sae),
        "d_in": d_in,
        "d_sae": d_sae,
        "context_before": cfg.context_before,
        "context_after": cfg.context_after,
        "ultra_low_density": cfg.ultra_low_density,
        "config": {k: v for k, v in vars(cfg).items() if k != "data"},
        "data": dict(cfg.data),
    }
    insp = Inspection(arrays, meta, vocab, labels)
    with disk_errors(out, kept=f"removed what this run had written to {out}"), _whole_or_removed(out):
        insp.summary_plots(out)
        write_site(insp, out, cfg.page_size, cfg.chunk_features)
        timings["total_s"] = time.perf_counter() - t0
        insp.meta["timings"] = timings
        insp.save(out)
        (out / "summary.json").write_text(json.dumps({**insp.summary(), "timings": timings}, indent=1))
    return insp, timings


def _log_plots(run: Path, config: dict, plots: dict[str, Path]) -> None:
    """The summary plots into the run's own W&B run, when it was tracked with logger=wandb (config: the run's)."""
    logger = config.get("logger") or {}
    metrics = json.loads((run / "metrics.json").read_text()) if (run / "metrics.json").is_file() else {}
    run_id = metrics.get("wandb_run_id")
    if logger.get("name") != "wandb" or not run_id or not plots:
        return
    from sae.tracking import LoggerConfig, make_tracker

    fields = {k: v for k, v in logger.items() if k in LoggerConfig.__dataclass_fields__}
    with make_tracker(LoggerConfig(**fields), run, config, run_id=run_id) as tracker:
        tracker.log_images(None, {f"inspect/{name}": path for name, path in plots.items()})
