"use strict";
var LIST = SAE_LIST_DATA, CHUNKS = {}, WAITING = {};
function SAE_CHUNK(d) {
  CHUNKS[d.chunk] = d;
  (WAITING[d.chunk] || []).forEach(function (f) { f(); });
  delete WAITING[d.chunk];
}
function el(tag, attrs, children) {
  var e = document.createElement(tag);
  for (var k in attrs || {}) {
    if (k === "text") e.textContent = attrs[k]; else if (k === "html") e.innerHTML = attrs[k];
    else e.setAttribute(k, attrs[k]);
  }
  (children || []).forEach(function (c) { e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
  return e;
}
function fmt(x) {
  if (x === null || x === undefined) return "";
  if (x === 0) return "0";
  var a = Math.abs(x);
  return a >= 1e4 || a < 1e-3 ? x.toExponential(2) : (+x.toPrecision(3)).toString();
}
function parseHash() {
  var h = location.hash.replace(/^#/, ""), out = {};
  h.split("&").forEach(function (kv) {
    if (!kv) return;
    var i = kv.indexOf("=");
    out[decodeURIComponent(i < 0 ? kv : kv.slice(0, i))] = i < 0 ? "" : decodeURIComponent(kv.slice(i + 1));
  });
  return out;
}
function setHash(state) {
  var parts = [];
  for (var k in state) if (state[k] !== "" && state[k] !== undefined && state[k] !== null)
    parts.push(encodeURIComponent(k) + "=" + encodeURIComponent(state[k]));
  var h = "#" + parts.join("&");
  if (location.hash !== h) history.replaceState(null, "", h);
}
var COLS = [["id", "#"], ["density", "density"], ["mean", "mean act."], ["max", "max act."]];
var VIEW = {q: "", sort: "density", dir: "desc", page: 0};

function rowsMatching(q) {
  var C = LIST.columns, n = LIST.meta.d_sae, out = [];
  q = q.trim().toLowerCase();
  for (var i = 0; i < n; i++) {
    if (q) {
      var hit = String(i) === q || (C.label[i] && C.label[i].toLowerCase().indexOf(q) >= 0) ||
        (C.token && C.token[i] && C.token[i].toLowerCase().indexOf(q) >= 0) ||
        (q === "dead" && C.density[i] === 0);
      if (!hit) continue;
    }
    out.push(i);
  }
  return out;
}
function sortRows(rows) {
  var C = LIST.columns, key = VIEW.sort, sign = VIEW.dir === "asc" ? 1 : -1;
  var col = key === "id" ? null : C[key];
  rows.sort(function (a, b) {
    var x = col ? col[a] : a, y = col ? col[b] : b;
    if (x === y) return a - b;
    if (x === null || x === "") return 1;
    if (y === null || y === "") return -1;
    return (x < y ? -1 : 1) * sign;
  });
  return rows;
}
function renderList() {
  var root = document.getElementById("list-view"), M = LIST.meta, C = LIST.columns;
  document.getElementById("feature-view").hidden = true;
  root.hidden = false;
  if (!root.firstChild) buildList(root);
  var search = document.getElementById("search");
  if (search.value !== VIEW.q) search.value = VIEW.q;
  var rows = sortRows(rowsMatching(VIEW.q)), size = M.page_size;
  var pages = Math.max(1, Math.ceil(rows.length / size));
  VIEW.page = Math.min(Math.max(0, VIEW.page | 0), pages - 1);
  var body = document.getElementById("features-body");
  body.textContent = "";
  rows.slice(VIEW.page * size, (VIEW.page + 1) * size).forEach(function (i) {
    var tr = el("tr", {"class": "feature-row", "data-id": i}, [el("td", {text: i})]);
    if (C.layer) tr.appendChild(el("td", {text: C.layer[i]}));
    [C.density[i], C.mean[i], C.max[i]].forEach(function (v) { tr.appendChild(el("td", {text: fmt(v)})); });
    if (C.token) tr.appendChild(el("td", {"class": "l", text: JSON.stringify(C.token[i] || "")}));
    if (M.has_gt) tr.appendChild(el("td", {text: C.gt[i] + " (" + fmt(C.gt_cos[i]) + ")"}));
    tr.appendChild(el("td", {"class": "l", text: C.label[i] || ""}));
    tr.onclick = function () { location.hash = "f=" + i; };
    body.appendChild(tr);
  });
  document.getElementById("count").textContent = rows.length + " of " + M.d_sae + " features";
  document.getElementById("page").textContent = "page " + (VIEW.page + 1) + " / " + pages;
  document.querySelectorAll("th[data-key]").forEach(function (th) {
    var k = th.getAttribute("data-key");
    th.textContent = th.getAttribute("data-name") + (k === VIEW.sort ? (VIEW.dir === "asc" ? " \u25B2" : " \u25BC") : "");
  });
  setHash({q: VIEW.q, sort: VIEW.sort, dir: VIEW.dir, page: VIEW.page || ""});
}
function buildList(root) {
  var M = LIST.meta;
  var layers = M.n_layers ? " (" + M.n_layers + " layers \u00D7 " + M.features_per_layer + ")" : "";
  var info = el("p", {id: "info"}, [(M.dictionary ? M.dictionary + ". " : "") + M.d_sae + " latents" + layers + ", " +
    M.n_rows.toLocaleString() + " rows (" + M.description + "). " +
    M.dead + " dead, " + M.ultra_low + " fire on < " + M.ultra_low_density + " of rows. Type \"dead\" to list dead latents."]);
  if (M.recovery) info.appendChild(document.createTextNode(" Ground truth: MMCS " + fmt(M.recovery.mmcs) +
    ", recovered " + fmt(M.recovery.recovered_fraction) + "."));
  root.appendChild(info);
  var plots = el("div", {"class": "plots"});
  M.plots.forEach(function (p) { plots.appendChild(el("img", {src: p, alt: p})); });
  root.appendChild(plots);
  var search = el("input", {id: "search", type: "search", placeholder: "search: feature id, top token or label"});
  search.oninput = function () { VIEW.q = search.value; VIEW.page = 0; renderList(); };
  var prev = el("button", {id: "prev", text: "\u2190 prev"}), next = el("button", {id: "next", text: "next \u2192"});
  prev.onclick = function () { VIEW.page--; renderList(); };
  next.onclick = function () { VIEW.page++; renderList(); };
  root.appendChild(el("p", {}, [search, " ", el("span", {id: "count"}), " ",
    el("span", {"class": "pager"}, [prev, el("span", {id: "page"}), next])]));
  var head = el("tr");
  var cols = COLS.slice();
  if (LIST.columns.layer) cols.splice(1, 0, ["layer", "layer"]);
  if (LIST.columns.token) cols.push(["token", "top token"]);
  if (M.has_gt) cols.push(["gt_cos", "true feature (cos)"]);
  cols.push(["label", "label"]);
  cols.forEach(function (c) {
    var th = el("th", {"data-key": c[0], "data-name": c[1], "class": c[0] === "token" || c[0] === "label" ? "l" : ""});
    th.onclick = function () {
      if (VIEW.sort === c[0]) VIEW.dir = VIEW.dir === "asc" ? "desc" : "asc"; else { VIEW.sort = c[0]; VIEW.dir = "desc"; }
      renderList();
    };
    head.appendChild(th);
  });
  root.appendChild(el("table", {id: "features"}, [el("thead", {}, [head]), el("tbody", {id: "features-body"})]));
}

function loadChunk(c, then) {
  if (CHUNKS[c]) return then();
  if (WAITING[c]) { WAITING[c].push(then); return; }
  WAITING[c] = [then];
  var s = document.createElement("script");
  s.src = "data/chunk_" + String(c).padStart(5, "0") + ".js";
  s.onerror = function () { document.getElementById("feature-view").textContent = "could not load " + s.src; };
  document.head.appendChild(s);
}
function histogram(f) {
  var E = LIST.meta.edges, lo = f.hist[0], counts = f.hist[1], W = 520, H = 140, pad = 24;
  var svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("width", W); svg.setAttribute("height", H + pad); svg.setAttribute("id", "histogram");
  if (!counts.length) { svg.appendChild(svgEl("text", {x: 10, y: 20}, "never fired")); return svg; }
  var top = Math.max.apply(null, counts), bw = (W - 2 * pad) / counts.length;
  counts.forEach(function (c, j) {
    var h = c ? Math.max(1, (H - 10) * c / top) : 0;
    var r = svgEl("rect", {"class": "bar", x: pad + j * bw, y: H - h, width: Math.max(bw - 1, 1), height: h});
    r.appendChild(svgEl("title", {}, fmt(E[lo + j]) + "\u2013" + fmt(E[lo + j + 1]) + ": " + c + " rows"));
    svg.appendChild(r);
  });
  svg.appendChild(svgEl("text", {x: pad, y: H + 14}, fmt(E[lo])));
  svg.appendChild(svgEl("text", {x: W - pad - 30, y: H + 14}, fmt(E[lo + counts.length])));
  svg.appendChild(svgEl("text", {x: W / 2 - 60, y: H + 14}, "activation (log scale)"));
  return svg;
}
function svgEl(tag, attrs, text) {
  var e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (var k in attrs) e.setAttribute(k, attrs[k]);
  if (text) e.textContent = text;
  return e;
}
function exampleLine(ex, tokens, maxAct) {
  var line = el("div", {"class": "example ex"}, [el("span", {"class": "v", text: fmt(ex[1])})]);
  if (ex.length > 3) {
    ex[3].forEach(function (t, j) {
      var v = ex[4][j] || 0, a = maxAct > 0 ? Math.min(1, v / maxAct) : 0;
      var span = el("span", {"class": "tok" + (j === ex[5] ? " c" : ""), title: "activation " + fmt(v),
        text: tokens[t]});
      if (a > 0) span.style.background = "rgba(255,120,0," + (0.15 + 0.85 * a).toFixed(3) + ")";
      line.appendChild(span);
    });
  } else {
    line.appendChild(el("span", {"class": "muted", text: "row " + ex[0] + " (no token ids in these activations)"}));
  }
  return line;
}
function decoderNorms(norms, layer) {
  var top = Math.max.apply(null, norms) || 1, head = el("tr", {}, [el("th", {"class": "l", text: "layer"})]);
  var row = el("tr", {"class": "norms"}, [el("th", {"class": "l", text: "\u2016W_dec\u2016"})]);
  norms.forEach(function (v, m) {
    head.appendChild(el("th", {text: m}));
    if (m < layer) { row.appendChild(el("td", {"class": "muted", text: "\u2013"})); return; }
    var bar = el("div", {"class": "dnbar"});
    bar.style.width = (100 * v / top).toFixed(1) + "%";
    row.appendChild(el("td", {title: "into layer " + m}, [fmt(v), bar]));
  });
  return el("table", {id: "decoder-norms", "class": "dn"}, [el("thead", {}, [head]), el("tbody", {}, [row])]);
}
function renderFeature(id) {
  var M = LIST.meta, C = LIST.columns, view = document.getElementById("feature-view");
  document.getElementById("list-view").hidden = true;
  view.hidden = false;
  if (!(id >= 0 && id < M.d_sae)) { view.textContent = "no feature " + id; return; }
  view.textContent = "loading feature " + id + "\u2026";
  loadChunk(Math.floor(id / M.chunk), function () {
    var f = CHUNKS[Math.floor(id / M.chunk)].features[id % M.chunk], tokens = CHUNKS[Math.floor(id / M.chunk)].tokens;
    view.textContent = "";
    var nav = el("p", {}, [el("a", {href: "#", text: "\u2190 all features"}), " "]);
    if (id > 0) nav.appendChild(el("a", {href: "#f=" + (id - 1), text: "\u2039 " + (id - 1)}));
    nav.appendChild(document.createTextNode(" "));
    if (id + 1 < M.d_sae) nav.appendChild(el("a", {href: "#f=" + (id + 1), text: (id + 1) + " \u203A"}));
    view.appendChild(nav);
    view.appendChild(el("h2", {id: "feature-title", text: "Feature " + id + (C.label[id] ? ": " + C.label[id] : "")}));
    var stats = el("p", {}, [
      el("span", {"class": "stat", text: "density " + fmt(C.density[id]) + " (" + f.fires + " rows)"}),
      el("span", {"class": "stat", text: "mean act. " + fmt(C.mean[id])}),
      el("span", {"class": "stat", text: "max act. " + fmt(C.max[id])})]);
    if (M.has_gt) stats.appendChild(el("span", {"class": "stat", id: "gt",
      text: "best true feature " + C.gt[id] + " (cos " + fmt(C.gt_cos[id]) + ")"}));
    if (C.layer) stats.appendChild(el("span", {"class": "stat", id: "layer",
      text: "layer " + C.layer[id] + " (feature " + (id % M.features_per_layer) + " of " + M.features_per_layer + ")"}));
    view.appendChild(stats);
    if (f.dn) {
      view.appendChild(el("h2", {text: "Decoder norm into each layer"}));
      view.appendChild(decoderNorms(f.dn, C.layer[id]));
    }
    view.appendChild(el("h2", {text: "Activation histogram"}));
    view.appendChild(histogram(f));
    var maxAct = C.max[id] || 0;
    view.appendChild(el("h2", {text: "Top activations"}));
    var top = el("div", {id: "top-examples"});
    if (!f.top.length) top.appendChild(el("p", {"class": "muted", text: "never fired in these rows"}));
    f.top.forEach(function (ex) { top.appendChild(exampleLine(ex, tokens, maxAct)); });
    view.appendChild(top);
    view.appendChild(el("h2", {text: "Random firing rows, by activation quantile"}));
    var rnd = el("div", {id: "random-examples"}), bands = [[0.75, 1.01], [0.5, 0.75], [0.25, 0.5], [0, 0.25]];
    bands.forEach(function (b) {
      var inBand = f.rnd.filter(function (ex) { return ex[2] >= b[0] && ex[2] < b[1]; });
      if (!inBand.length) return;
      rnd.appendChild(el("div", {"class": "muted", text: "quantile " + b[0] + "\u2013" + Math.min(b[1], 1)}));
      inBand.forEach(function (ex) { rnd.appendChild(exampleLine(ex, tokens, maxAct)); });
    });
    view.appendChild(rnd);
    view.appendChild(el("h2", {text: "Decoder neighbours (cosine)"}));
    var nb = el("p", {"class": "nb", id: "neighbours"});
    f.nb.forEach(function (n) { nb.appendChild(el("a", {href: "#f=" + n[0], text: n[0] + " (" + fmt(n[1]) + ")"})); });
    view.appendChild(nb);
    document.title = "Feature " + id;
  });
}
function route() {
  var h = parseHash();
  if (h.f !== undefined) { renderFeature(parseInt(h.f, 10)); return; }
  VIEW.q = h.q || ""; VIEW.sort = h.sort || "density"; VIEW.dir = h.dir || "desc"; VIEW.page = parseInt(h.page || "0", 10) || 0;
  document.title = "SAE features";
  renderList();
}
window.addEventListener("hashchange", route);
document.getElementById("subtitle").textContent = (LIST.meta.dictionary || LIST.meta.architecture) + " \u00B7 " +
  LIST.meta.run;
route();
