"""`sae-probe` and `sae-steer`: key=value command lines (no Hydra: a handful of keys, no config groups).

    sae-probe run=SAE_RUN [lm=LM_DIR] [port=8765]
    sae-steer extract lm=LM_DIR positive=A.txt negative=B.txt [pooling=response_mean] [method=mean_difference]
              [sites=all] out=DIR
    sae-steer sweep lm=LM_DIR direction=DIR 'alphas=[-8,-4,-2,0,2,4,8]' prompts=P.txt score=test_code out=DIR

A user mistake ends the command with one line naming the key, file or value (exit status 2).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from sae.cli import run_job
from sae.errors import ConfigError

PROBE_USAGE = "sae-probe run=SAE_RUN [lm=LM_DIR] [port=8765]"


def key_values(argv: list[str], defaults: dict, usage: str) -> dict:
    """key=value items over `defaults` (None: required); ConfigError naming a bad, unknown or missing key."""
    args = dict(defaults)
    for item in argv:
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ConfigError(f"{item!r} is not key=value with a key in {sorted(defaults)}: {usage}")
        args[key] = value
    missing = [k for k, v in args.items() if v is None]
    if missing:
        raise ConfigError(f"{', '.join(missing)} required: {usage}")
    return args


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise ConfigError(f"port={value!r}: expected a port number 0..65535")
    return int(value)


def _help(items: list[str]) -> None:
    if any(a in ("-h", "--help") for a in items):
        print(__doc__.strip())
        sys.exit(0)


def probe(argv: list[str] | None = None) -> None:
    """sae-probe: serve the probe app for an SAE run on 127.0.0.1."""
    items = sys.argv[1:] if argv is None else argv
    _help(items)

    def job():
        from sae.steer.app import serve

        args = key_values(items, {"run": None, "lm": "", "port": "8765"}, PROBE_USAGE)
        serve(args["run"], args["lm"] or None, _port(args["port"]))

    sys.exit(run_job(job))


STEER_USAGE = (
    "sae-steer extract lm=LM_DIR positive=A.txt negative=B.txt [pooling=response_mean] [method=mean_difference] "
    "[sites=resid] out=DIR | sae-steer sweep lm=LM_DIR direction=DIR 'alphas=[-8,-4,-2,0,2,4,8]' prompts=P.txt "
    "score=test_code [site=auto] [max_new_tokens=48] [temperature=0] [seed=0] [eval=TEXTS] out=DIR"
)
EXTRACT = {
    "lm": None,
    "positive": None,
    "negative": None,
    "pooling": "response_mean",
    "method": "mean_difference",
    "sites": "resid",
    "out": None,
}
SWEEP = {
    "lm": None,
    "direction": None,
    "alphas": "[-8,-4,-2,0,2,4,8]",
    "prompts": None,
    "score": "test_code",
    "site": "auto",
    "max_new_tokens": "48",
    "temperature": "0",
    "seed": "0",
    "eval": "",
    "out": None,
}


def _list(key: str, value: str) -> list[str]:
    """'[a,b]' or 'a,b' -> ['a', 'b']."""
    items = [v.strip().strip("'\"") for v in value.strip().removeprefix("[").removesuffix("]").split(",")]
    if not all(items):
        raise ConfigError(f"{key}={value!r}: expected a list such as [a,b]")
    return items


def _number(key: str, value: str, kind=float):
    try:
        return kind(value)
    except ValueError:
        raise ConfigError(f"{key}={value!r}: expected a{'n integer' if kind is int else ' number'}") from None


def _sites(value: str, model) -> list[str]:
    """resid: every hook_resid_* site; all: every d_model-wide site; or a list of site names."""
    if value in ("resid", "all"):
        wide = [s for s in model.sites if model.site_dim(s) == model.config.d_model]
        return [s for s in wide if ".hook_resid_" in s] if value == "resid" else wide
    sites = _list("sites", value)
    for s in sites:
        if s not in model.sites:
            raise ConfigError(f"sites: {s!r} is not a site of the model; e.g. {model.sites[:4]}")
    return sites


def extract(args: dict) -> None:
    from sae.data.hf import template
    from sae.models import load
    from sae.steer import directions, texts

    model, tokenizer = load(args["lm"])
    prefix, n_ctx = template(tokenizer, model.config.bos_token_id)[0], model.config.n_ctx
    sides = {k: texts.read_records(args[k], k) for k in ("positive", "negative")}
    examples = {k: texts.examples(v, tokenizer, prefix, n_ctx, k) for k, v in sides.items()}
    sites = _sites(args["sites"], model)
    source = {"lm": str(args["lm"]), **{k: str(args[k]) for k in sides}, **{f"n_{k}": len(v) for k, v in sides.items()}}
    d = directions.contrast(
        model, sites, examples["positive"], examples["negative"], args["pooling"], args["method"], source
    )
    out = d.save(args["out"])
    norms = ", ".join(f"{s} {n:.3g}" for s, n in zip(sites, np.linalg.norm(d.vectors, axis=1)))
    print(f"sae-steer extract: {len(sites)} sites ({args['method']}, {args['pooling']}; ‖v‖: {norms}) -> {out}")


def sweep(args: dict) -> None:
    import json

    from sae.data.hf import template
    from sae.models import load
    from sae.steer import texts
    from sae.steer.directions import Direction
    from sae.steer.sweep import SCORES, Steerer, choose_site, monitoring

    if args["score"] not in SCORES:
        raise ConfigError(f"score={args['score']!r} is not one of {sorted(SCORES)}")
    alphas = [_number("alphas", a) for a in _list("alphas", args["alphas"])]
    model, tokenizer = load(args["lm"])
    direction = Direction.load(args["direction"])
    for s in direction.sites:
        if s not in model.sites or model.site_dim(s) != direction.vectors.shape[1]:
            raise ConfigError(f"direction='{args['direction']}': its site {s!r} does not fit the model in {args['lm']}")
    prefix = template(tokenizer, model.config.bos_token_id)[0]
    prompts = texts.prompts(texts.read_records(args["prompts"], "prompts"), tokenizer, prefix)
    evals = texts.prompts(texts.read_records(args["eval"], "eval"), tokenizer, prefix) if args["eval"] else prompts
    steerer = Steerer(
        model,
        tokenizer,
        prompts,
        evals,
        SCORES[args["score"]],
        _number("max_new_tokens", args["max_new_tokens"], int),
        _number("temperature", args["temperature"]),
        _number("seed", args["seed"], int),
    )
    if args["site"] == "auto":
        site, table = choose_site(steerer, direction, max(abs(a) for a in alphas))
    else:
        site, table = args["site"], {}
    v = direction.vector(site)  # a site the direction lacks fails here, naming its sites
    result = steerer.sweep(site, v, alphas)
    clean = result.continuations[alphas.index(0.0)] if 0.0 in alphas else steerer.at(site, v, 0.0)[2]
    clean_scores = [steerer.score(t) for t in clean]
    report = {
        "site": site,
        "site_choice": table,
        "score": args["score"],
        "spearman": result.spearman,
        "alphas": [
            {"alpha": a, "score": s, "loss": lo, "examples": c[:4]}
            for a, s, lo, c in zip(result.alphas, result.scores, result.losses, result.continuations)
        ],
        "monitoring": monitoring(model, direction, steerer.prompts, clean_scores, len(prefix)),
        "settings": {k: args[k] for k in SWEEP},
        "n_prompts": len(prompts),
    }
    out = Path(args["out"])
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(report, indent=1) + "\n")
    _plot(report, out / "sweep.png")
    line = " ".join(f"α={a:g}: {s:.3f}" for a, s in zip(result.alphas, result.scores))
    mon = report["monitoring"]
    watch = "; ".join(f"{s} {mon[s]['last']['pearson']:.2f} / {mon[s]['mean']['pearson']:.2f}" for s in direction.sites)
    print(
        f"sae-steer sweep at {site}: {args['score']} {line}; Spearman {result.spearman:.3f}; monitoring (Pearson r "
        f"over {len(prompts)} prompts, prompt's last token / mean): {watch} -> {out / 'sweep.json'}"
    )


def _plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in report["alphas"]]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(alphas, [r["score"] for r in report["alphas"]], "o-")
    axes[0].set(xlabel="α", ylabel=report["score"], title=f"score at {report['site']} (ρ = {report['spearman']:.2f})")
    axes[1].plot(alphas, [r["loss"] for r in report["alphas"]], "o-", color="C1")
    axes[1].set(xlabel="α", ylabel="loss (nats/token)", title="validation loss")
    mon, site = report["monitoring"], report["site"]
    for name, marker in (("last", "o"), ("mean", "x")):
        r = mon[site][name]["pearson"]
        label = f"{name} (r = {r:.2f})"
        axes[2].scatter(mon[site][name]["projections"], mon["scores"], s=12, marker=marker, label=label)
    axes[2].legend(fontsize=8)
    axes[2].set(xlabel="projection on v (prompt's last token / mean)", ylabel=f"{report['score']} (α = 0)")
    axes[2].set_title(f"monitoring, {mon['n']} prompts")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def steer(argv: list[str] | None = None) -> None:
    """sae-steer extract | sweep."""
    items = sys.argv[1:] if argv is None else argv
    _help(items)

    def job():
        if not items or items[0] not in ("extract", "sweep"):
            raise ConfigError(f"the first word must be extract or sweep: {STEER_USAGE}")
        spec = EXTRACT if items[0] == "extract" else SWEEP
        args = key_values(items[1:], spec, STEER_USAGE)
        (extract if items[0] == "extract" else sweep)(args)

    sys.exit(run_job(job))


if __name__ == "__main__":  # python -m sae.steer.cli extract|sweep ... (what the walkthrough scripts run)
    steer()
