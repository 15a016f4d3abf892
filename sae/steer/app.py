"""`sae-probe`'s web app: one page (`static/probe.html`, inline CSS and JS) and a JSON API over a `Probe`, served
by the standard library on 127.0.0.1 only. The app only calls the Probe's operations and turns their arrays
into JSON; every request goes through the probe one at a time (a lock).

    GET  /                 the page
    GET  /api/info         {site, d_sae, d_in, n_ctx, architecture, model, run, has_browser}
    GET  /inspect/PATH     the run's feature browser (RUN/inspect/, sae-inspect's output), when there is one
    POST /api/activations  {text, features?, top?, direction?, direction_site?}
                                                              -> tokens, ids, top, features, truncated[, warning]
                                                                 [, projection: {site, values, mean}]
    POST /api/diff         {before, after, top?}              -> tokens, before_tokens, match, changes, changed, removed
    POST /api/drivers      {text, feature, position}          -> tokens, value, leave_one_out, grad_x_input
    POST /api/generate     {text, interventions, max_new_tokens?, seed?, temperature?}
                                                              -> default, steered, *_tokens, next_before, next_after

An intervention is {"feature": i, "op": "clamp"|"scale"|"ablate"|"add", "value": α} (add: α·W_dec[i]) or
{"direction": DIR, "strength": α, "site"?: SITE}, either with "positions": "all"|"prompt"|"generated"|[ints].
A bad request is answered 4xx with {"error": "one line naming the field or value"}; numbers that are not
finite (leave-one-out at the position itself) are null.
"""

from __future__ import annotations

import errno
import json
import math
import mimetypes
import signal
import sys
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib.resources import files
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np

from sae.errors import ConfigError, DataError
from sae.steer import interventions as iv
from sae.steer.directions import Direction
from sae.steer.probe import Probe, model_path, open_probe

HOST = "127.0.0.1"
MAX_NEW_TOKENS = 256
MAX_TOP = 256
MAX_BODY = 1 << 20  # bytes of a request's JSON
OPS = ("clamp", "scale", "ablate", "add")
# The page is one file: inline script and style, fetch() to its own origin, nothing else.
PAGE_CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:"
)


class BadRequest(Exception):
    """A request the app refuses: its HTTP status and a one-line message naming the field or value."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# --- fields of a request ------------------------------------------------------------------------------


def _show(value) -> str:
    """A request value as JSON, cut short for an error message."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "…"


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _text(body: dict, key: str) -> str:
    value = body.get(key)
    if key not in body:
        raise BadRequest(f"{key}: missing (a string)")
    if not isinstance(value, str):
        raise BadRequest(f"{key}: expected a string, got {type(value).__name__}")
    if not value.strip():
        raise BadRequest(f"{key}: the text is empty")
    return value


def _int(body: dict, key: str, default: int | None = None, lo: int | None = None, hi: int | None = None) -> int:
    if key not in body or (body[key] is None and default is not None):
        if default is None:
            raise BadRequest(f"{key}: missing (an integer)")
        return default
    value = body[key]
    if not _is_int(value):
        raise BadRequest(f"{key}={_show(value)}: expected an integer")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise BadRequest(f"{key}={value} is out of range: expected {lo}..{hi}")
    return value


def _number(body: dict, key: str, default: float | None = None, where: str = "") -> float:
    if key not in body or (body[key] is None and default is not None):
        if default is None:
            raise BadRequest(f"{where}{key}: missing (a number)")
        return default
    value = body[key]
    if not _is_number(value):
        raise BadRequest(f"{where}{key}={_show(value)}: expected a finite number")
    return float(value)


def _feature(probe: Probe, value, key: str) -> int:
    d_sae = probe.sae.d_sae
    if not _is_int(value):
        raise BadRequest(f"{key}={_show(value)}: expected a feature id (an integer 0..{d_sae - 1})")
    if not 0 <= value < d_sae:
        raise BadRequest(f"{key}={value} is out of range: the SAE has features 0..{d_sae - 1}")
    return value


def _num(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# --- the operations -----------------------------------------------------------------------------------


class App:
    """The API over one probe (what the request handler calls); `inspect_dir`: the feature browser's files."""

    def __init__(self, probe: Probe, inspect_dir=None, run=None, model=None):
        self.probe = probe
        self.inspect_dir = Path(inspect_dir).resolve() if inspect_dir else None
        self.run, self.model = run, model
        self.lock = threading.Lock()
        self.page = (files("sae.steer") / "static" / "probe.html").read_bytes()

    @property
    def has_browser(self) -> bool:
        return self.inspect_dir is not None and (self.inspect_dir / "index.html").is_file()

    def info(self) -> dict:
        p = self.probe
        return {
            "site": p.site,
            "d_sae": p.sae.d_sae,
            "d_in": p.sae.d_in,
            "n_ctx": p.n_ctx,
            "architecture": p.sae.architecture,
            "model": "" if self.model is None else str(self.model),
            "run": "" if self.run is None else str(self.run),
            "has_browser": self.has_browser,
        }

    def activations(self, body: dict) -> dict:
        text = _text(body, "text")
        top = _int(body, "top", 8, 1, MAX_TOP)
        chosen = body.get("features")
        if chosen is None:
            chosen = []
        if not isinstance(chosen, list):
            raise BadRequest(f"features={_show(chosen)}: expected a list of feature ids")
        chosen = [_feature(self.probe, f, f"features[{j}]") for j, f in enumerate(chosen)]
        monitor = None
        if body.get("direction"):
            monitor = self._direction({"direction": body["direction"], "site": body.get("direction_site")})
        with self.lock:
            reading = self.probe.activations(text)
            if monitor is not None:
                direction, site = monitor
                along = self.probe.projection(text, direction.vector(site), site)
        idx, values = reading.top(top)
        out = {
            "tokens": list(reading.strings),
            "ids": [int(t) for t in reading.ids],
            "top": [[[int(i), _num(v)] for i, v in zip(row_i, row_v)] for row_i, row_v in zip(idx, values)],
            "features": {str(f): [_num(v) for v in reading.codes[:, f]] for f in chosen},
            "truncated": int(reading.truncated),
        }
        if monitor is not None:
            out["projection"] = {"site": site, "values": [_num(v) for v in along], "mean": _num(along.mean())}
        if reading.truncated:
            out["warning"] = (
                f"the text is {reading.truncated} tokens longer than the model's context of {self.probe.n_ctx} "
                f"tokens: its last {reading.truncated} tokens were cut off"
            )
        return out

    def diff(self, body: dict) -> dict:
        before, after = _text(body, "before"), _text(body, "after")
        top = _int(body, "top", 8, 1, MAX_TOP)
        with self.lock:
            d = self.probe.diff(before, after)
        changes, changed = [], []
        for t in range(len(d.match)):
            delta = d.delta[t]
            order = np.argsort(-np.abs(delta), kind="stable")[:top]
            row = [[int(i), _num(delta[i]), _num(d.after.codes[t, i])] for i in order if delta[i] != 0]
            changes.append(row)
            changed.append(bool(d.match[t] < 0 or np.any(delta != 0)))
        matched = set(int(m) for m in d.match if m >= 0)
        return {
            "tokens": list(d.after.strings),
            "before_tokens": list(d.before.strings),
            "match": [int(m) for m in d.match],
            "changes": changes,
            "changed": changed,
            "removed": [j for j in range(len(d.before.ids)) if j not in matched],
        }

    def drivers(self, body: dict) -> dict:
        text = _text(body, "text")
        if "feature" not in body:
            raise BadRequest("feature: missing (a feature id)")
        feature = _feature(self.probe, body["feature"], "feature")
        position = _int(body, "position")
        with self.lock:
            got = self.probe.drivers(text, feature, position)
            ids, _ = self.probe.tokens(text)
        body_ids = ids[len(self.probe.prefix) :][: position + 1]
        return {
            "tokens": [self.probe.string(int(t)) for t in body_ids],
            "value": _num(got.value),
            "leave_one_out": [_num(v) for v in got.leave_one_out],
            "grad_x_input": [_num(v) for v in got.grad_x_input],
        }

    def _intervention(self, item, j: int, n_prompt: int) -> tuple[iv.Intervention, float]:
        """One request intervention -> (the Intervention, its strength)."""
        p, where = self.probe, f"interventions[{j}]."
        if not isinstance(item, dict):
            raise BadRequest(f"interventions[{j}]: expected an object with 'feature' or 'direction'")
        mask = self._positions(item.get("positions", "all"), f"{where}positions", n_prompt)
        if "feature" in item:
            feature = _feature(p, item["feature"], f"{where}feature")
            op = item.get("op", "clamp")
            if op not in OPS:
                raise BadRequest(f"{where}op={_show(op)} is not one of {list(OPS)}")
            site = item.get("site")
            if site is not None and site != p.site:
                raise BadRequest(
                    f"{where}site={_show(site)}: the SAE was trained on {p.site!r}; its features act there only"
                )
            value = 0.0 if op == "ablate" else _number(item, "value", where=where)
            if op == "add":
                vector = np.asarray(p.sae.params["W_dec"][feature], np.float32)
                return iv.Add(p.site, vector, mask), value
            return iv.Feature(p.site, p.sae, feature, op, mask), value
        if "direction" in item:
            direction, site = self._direction(item, where)
            strength = _number(item, "strength", where=where)
            return iv.Add(site, np.asarray(direction.vector(site), np.float32), mask), strength
        raise BadRequest(f"interventions[{j}]: expected a 'feature' or a 'direction' key")

    def _direction(self, item: dict, where: str = "") -> tuple[Direction, str]:
        """The direction saved at item["direction"] and its site (item["site"], else the SAE's when the
        direction has it, else its first)."""
        p, path = self.probe, item["direction"]
        if not isinstance(path, str) or not path.strip():
            raise BadRequest(f"{where}direction={_show(path)}: expected a direction directory (a string)")
        try:
            direction = Direction.load(path)
        except DataError as err:
            raise BadRequest(f"{where}direction={path!r}: {err}") from None
        except Exception as err:  # a damaged direction.json / .safetensors
            raise BadRequest(f"{where}direction={path!r} cannot be loaded ({type(err).__name__}: {err})") from None
        site = item.get("site")
        if site is None:
            site = p.site if p.site in direction.sites else direction.sites[0]
        if not isinstance(site, str) or site not in direction.sites:
            raise BadRequest(f"{where}site={_show(site)}: the direction has the sites {direction.sites}")
        if site not in p.model.sites:
            raise BadRequest(f"{where}site={site!r} is not a site of this model")
        return direction, site

    def _positions(self, kind, key: str, n_prompt: int) -> np.ndarray | None:
        if isinstance(kind, str):
            if kind not in ("all", "prompt", "generated"):
                raise BadRequest(f"{key}={_show(kind)}: expected 'all', 'prompt', 'generated' or a list")
        elif not (isinstance(kind, list) and all(_is_int(i) for i in kind)):
            raise BadRequest(f"{key}={_show(kind)}: expected 'all', 'prompt', 'generated' or a list of ints")
        try:
            return iv.positions(kind, n_prompt, self.probe.model.config.n_ctx)
        except DataError as err:  # indices outside the context (a ModelError)
            raise BadRequest(f"{key}: {err}") from None

    def generate(self, body: dict) -> dict:
        text = _text(body, "text")
        items = body.get("interventions", [])
        if items is None:
            items = []
        if not isinstance(items, list):
            raise BadRequest(f"interventions={_show(items)}: expected a list")
        max_new = _int(body, "max_new_tokens", 32, 1, MAX_NEW_TOKENS)
        seed = _int(body, "seed", 0, 0, 2**31 - 1)
        temperature = _number(body, "temperature", 0.0)
        if temperature < 0:
            raise BadRequest(f"temperature={temperature}: expected a number >= 0")
        with self.lock:
            n_prompt = len(self.probe.tokens(text)[0])
            parsed = [self._intervention(item, j, n_prompt) for j, item in enumerate(items)]
            steer = [a for a, _ in parsed]
            strengths = np.asarray([s for _, s in parsed], np.float32)
            got = self.probe.generate(text, steer, strengths, max_new, temperature, seed)
        decode = self.probe.tokenizer.decode
        pairs = lambda dist: [[self.probe.string(int(t)), _num(q)] for t, q in zip(*dist)]
        return {
            "default": decode(got.default),
            "steered": decode(got.steered),
            "default_tokens": [self.probe.string(int(t)) for t in got.default],
            "steered_tokens": [self.probe.string(int(t)) for t in got.steered],
            "next_before": pairs(got.next_before),
            "next_after": pairs(got.next_after),
        }

    def inspect_file(self, rest: str) -> Path | None:
        """The browser's file at `rest` (URL-decoded, relative), or None (none there, or outside RUN/inspect)."""
        if self.inspect_dir is None:
            return None
        rest = unquote(rest).lstrip("/") or "index.html"
        if "\0" in rest:
            return None
        path = (self.inspect_dir / rest).resolve()
        if not path.is_relative_to(self.inspect_dir) or not path.is_file():
            return None
        return path


POSTS = {
    "/api/activations": App.activations,
    "/api/diff": App.diff,
    "/api/drivers": App.drivers,
    "/api/generate": App.generate,
}
GETS = ("/", "/index.html", "/api/info")


class Handler(BaseHTTPRequestHandler):
    server_version = "sae-probe"
    protocol_version = "HTTP/1.1"

    @property
    def app(self) -> App:
        return self.server.app

    def log_message(self, format, *args):
        pass  # quiet: a request is not news; failures of the app itself are printed in _fail

    def _send(self, status: int, payload: bytes, content_type: str, extra: dict | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _json(self, status: int, obj, extra: dict | None = None) -> None:
        payload = json.dumps(obj, allow_nan=False, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
        self._send(status, payload, "application/json; charset=utf-8", extra)

    def _error(self, status: int, message: str, extra: dict | None = None) -> None:
        self._json(status, {"error": " ".join(str(message).split())}, extra)

    def _path(self) -> str:
        return urlsplit(self.path).path

    def do_GET(self):
        path = self._path()
        try:
            if path in ("/", "/index.html"):
                self._send(200, self.app.page, "text/html; charset=utf-8", {"Content-Security-Policy": PAGE_CSP})
            elif path == "/api/info":
                self._json(200, self.app.info())
            elif path == "/inspect" or path.startswith("/inspect/"):
                file = self.app.inspect_file(path[len("/inspect") :])
                if file is None:
                    what = "no feature browser (RUN/inspect/)" if self.app.inspect_dir is None else "no such file"
                    self._error(404, f"{path}: {what}")
                    return
                kind = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                if kind.startswith("text/") or kind in ("application/javascript", "application/json"):
                    kind += "; charset=utf-8"
                self._send(200, file.read_bytes(), kind)
            elif path in POSTS:
                self._error(405, f"GET {path}: use POST", {"Allow": "POST"})
            else:
                self._error(404, f"{path}: no such page or API (see GET /)")
        except Exception as err:  # the app's own failure: reported, and the server keeps serving
            self._fail(err)

    do_HEAD = do_GET

    def do_POST(self):
        path = self._path()
        op = POSTS.get(path)
        if op is None:
            self._discard()
            if path in GETS or path.startswith("/inspect"):
                self._error(405, f"POST {path}: use GET", {"Allow": "GET"})
            else:
                self._error(404, f"{path}: no such API (the APIs: {sorted(POSTS)})")
            return
        try:
            body = self._body()
            self._json(200, op(self.app, body))
        except BadRequest as err:
            self._error(err.status, str(err))
        except (DataError, ConfigError) as err:  # the Probe's refusals (ModelError is a DataError)
            self._error(400, str(err))
        except Exception as err:
            self._fail(err)

    def _other(self):
        path = self._path()
        allow = "POST" if path in POSTS else "GET"
        self._discard()
        if path in POSTS or path in GETS or path.startswith("/inspect"):
            self._error(405, f"{self.command} {path}: use {allow}", {"Allow": allow})
        else:
            self._error(404, f"{path}: no such page or API")

    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _other

    def _length(self) -> int:
        if self.headers.get("Transfer-Encoding"):  # a chunked body would be read as the next request
            self.close_connection = True
            raise BadRequest("Transfer-Encoding: send the JSON with a Content-Length instead", 411)
        try:
            return max(0, int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True
            raise BadRequest("Content-Length: not a number") from None

    def _discard(self) -> None:
        try:
            n = self._length()
        except BadRequest:
            return
        if n > MAX_BODY:
            self.close_connection = True
        elif n:
            self.rfile.read(n)

    def _body(self) -> dict:
        n = self._length()
        if n > MAX_BODY:
            self.close_connection = True
            raise BadRequest(f"the request body is {n} bytes; at most {MAX_BODY}", 413)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
            raise BadRequest(f"the request body is not JSON ({err})") from None
        if not isinstance(body, dict):
            raise BadRequest(f"the request body is JSON {type(body).__name__}; expected an object")
        return body

    def _fail(self, err: Exception) -> None:
        """An error of the app itself (not the user's): one line to the client, the traceback to stderr."""
        if isinstance(err, ConnectionError):  # the client went away mid-reply
            self.close_connection = True
            return
        print(f"sae-probe: {self.command} {self.path} failed:", file=sys.stderr)
        traceback.print_exception(err, file=sys.stderr)
        try:
            self._error(500, f"internal error: {type(err).__name__}: {err}")
        except OSError:
            pass


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_port = False  # a port another process listens on is refused, not shared

    def handle_error(self, request, client_address):
        exc = sys.exc_info()[1]
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return  # a client that went away
        super().handle_error(request, client_address)


def make_server(probe: Probe, port: int = 0, inspect_dir=None, run=None, model=None) -> ThreadingHTTPServer:
    """The app's server on 127.0.0.1:port (0: any free port; server.server_address[1] says which), not yet
    serving. DataError naming the port when it is in use."""
    server = _bind(port)
    server.app = App(probe, inspect_dir, run, model)
    return server


def _bind(port: int) -> Server:
    try:
        return Server((HOST, port), Handler)
    except OSError as err:
        if err.errno == errno.EADDRINUSE:
            raise DataError(f"port={port} is in use on {HOST}; give another with port=N") from None
        raise


def serve(run, lm=None, port: int = 8765) -> None:
    """Open the probe of an SAE run and serve the app on 127.0.0.1:port until Ctrl-C."""
    run = Path(run)
    server = _bind(port)  # a port in use is refused before the model is loaded
    try:
        probe = open_probe(run, lm)
    except BaseException:
        server.server_close()
        raise
    model = Path(lm) if lm else model_path(run)
    inspect_dir = run / "inspect"
    server.app = App(probe, inspect_dir if inspect_dir.is_dir() else None, run, model)
    url = f"http://{HOST}:{server.server_address[1]}/"
    print(f"sae-probe: {url} (site {probe.site}, d_sae {probe.sae.d_sae}); Ctrl-C stops", flush=True)
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler) if main else None  # `kill` stops it too
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("sae-probe: stopped", file=sys.stderr)
    finally:
        server.server_close()
        if main:
            signal.signal(signal.SIGTERM, previous)
