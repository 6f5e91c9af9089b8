// The interactive page's script, inlined by arraygpt.viz.page into one self-contained HTML file.
// It reads the page's inline JSON (id "data") and draws everything; it makes no request.
"use strict";
const D = JSON.parse(document.getElementById("data").textContent);
const label = (id) => (D.labels[String(id)] !== undefined ? D.labels[String(id)] : "#" + id);

// ---- the sampler math: mirrors arraygpt.generation.sampling.Sampler and arraygpt.plugins.samplers ----
function softmaxT(logits, T) {            // layers.softmax_forward; T = 0: one-hot at the first max
  const n = logits.length;
  let m = -Infinity, best = 0;
  for (let i = 0; i < n; i++) if (logits[i] > m) { m = logits[i]; best = i; }
  const out = new Array(n).fill(0);
  if (T === 0) { out[best] = 1; return out; }
  let s = 0;
  for (let i = 0; i < n; i++) { let z = logits[i] - m; if (T !== 1) z /= T; out[i] = Math.exp(z); s += out[i]; }
  for (let i = 0; i < n; i++) out[i] /= s;
  return out;
}
function normalize(w) {                  // sampling.normalize: a row of zeros stays zeros
  let s = 0; for (const v of w) s += v;
  return s > 0 ? w.map((v) => v / s) : w;
}
const desc = (p) => p.slice().sort((a, b) => b - a);
function topK(p, k) {                    // keep p_i >= the k-th largest (ties kept)
  if (k >= p.length) return p;
  const kth = desc(p)[k - 1];
  return p.map((v) => (v >= kth ? v : 0));
}
function topP(p, q) {                    // keep tokens whose mass before them (descending) is < q
  if (q >= 1) return p;
  const d = desc(p);
  let before = 0, smallest = d[0];
  for (let i = 0; i < d.length; i++) { if (before < q) smallest = d[i]; else break; before += d[i]; }
  return p.map((v) => (v >= smallest ? v : 0));
}
function minP(p, mp) {                   // keep p_i >= min_p * max p
  let m = -Infinity; for (const v of p) if (v > m) m = v;
  const cut = mp * m;
  return p.map((v) => (v >= cut ? v : 0));
}
// make_sampler(["top_k", "top_p", "min_p"], temperature=T, top_k=k or V, top_p=p, min_p=mp)
function distribution(logits, s) {
  let p = softmaxT(logits, s.temperature);
  p = normalize(topK(p, s.top_k > 0 ? s.top_k : logits.length));
  p = normalize(topP(p, s.top_p));
  p = normalize(minP(p, s.min_p));
  return p;
}
window.arraygpt = { data: D, softmaxT, topK, topP, minP, normalize, distribution,
  probs: (step, s) => distribution(D.steps[step].logits, s) };

// ---- state and controls ----
const state = Object.assign({}, D.settings, { step: 0, layer: 0, head: 0 });
const sliders = ["temperature", "top_k", "top_p", "min_p"];
const shownVocab = D.steps.length ? D.steps[0].ids.length : 1;
document.getElementById("top_k").max = String(Math.min(shownVocab, Math.max(200, state.top_k)));
document.getElementById("temperature").max = String(Math.max(2, state.temperature));
document.getElementById("sampler").textContent = "Generated with " + D.sampler + "; the sliders start at its settings" +
  (D.page_settings_exact ? "." : ", but the page knows only temperature, top-k, top-p and min-p (in that order).");
for (const name of sliders) {
  const el = document.getElementById(name);
  el.value = String(state[name]);
  el.addEventListener("input", () => { state[name] = Number(el.value); render(); });
}

function renderText() {
  const box = document.getElementById("text");
  box.textContent = "";
  for (const id of D.prompt) {
    const sp = document.createElement("span"); sp.className = "prompt"; sp.textContent = label(id); box.appendChild(sp);
  }
  D.generated.forEach((id, i) => {
    const sp = document.createElement("span");
    sp.className = "gen" + (i === state.step ? " sel" : "");
    sp.textContent = label(id); sp.dataset.step = String(i);
    sp.addEventListener("click", () => { state.step = i; render(); });
    box.appendChild(sp);
  });
}

function renderBars() {
  const bars = document.getElementById("bars");
  bars.textContent = "";
  if (!D.steps.length) { bars.textContent = "no token was generated"; return; }
  const st = D.steps[state.step];
  const pm = softmaxT(st.logits, 1), ps = distribution(st.logits, state);
  document.getElementById("step-title").textContent =
    "before token " + (state.step + 1) + " (" + label(st.token) + "; drawn with p=" + st.p_sampler.toFixed(3) + ")";
  const kept = ps.filter((v) => v > 0).length;
  document.getElementById("kept").textContent = kept + " of " + ps.length + " tokens kept by these settings";
  const order = ps.map((v, i) => i).sort((a, b) => ps[b] - ps[a] || pm[b] - pm[a] || a - b).slice(0, D.k);
  for (const h of ["token", "grey: model, blue: sampler", "model", "sampler"]) {
    const el = document.createElement("div"); el.className = "head"; el.textContent = h; bars.appendChild(el);
  }
  for (const j of order) {
    const id = st.ids[j];
    const lab = document.createElement("div");
    lab.className = "lab" + (id === st.token ? " chosen" : ""); lab.textContent = label(id) + (id === st.token ? " \u25c0" : "");
    const bar = document.createElement("div"); bar.className = "bar prob";
    bar.dataset.id = String(id); bar.dataset.p = String(ps[j]); bar.dataset.pm = String(pm[j]);
    const m = document.createElement("div"); m.className = "m"; m.style.width = (100 * pm[j]) + "%";
    const s = document.createElement("div"); s.className = "s"; s.style.width = (100 * ps[j]) + "%";
    bar.append(m, s);
    const n1 = document.createElement("div"); n1.className = "num"; n1.textContent = pm[j].toFixed(4);
    const n2 = document.createElement("div"); n2.className = "num"; n2.textContent = ps[j].toFixed(4);
    bars.append(lab, bar, n1, n2);
  }
  document.getElementById("trunc").textContent = D.truncated
    ? "The vocabulary has " + D.vocab_size + " tokens; this page keeps each step's " + st.ids.length +
      " largest logits, so its distributions are over those." : "";
}

function selectedRow() {                 // the query row of the selected token's prediction
  const w = D.window, pos = D.prompt.length + state.step - 1 - w.start;
  return pos >= 0 && pos < w.tokens.length ? pos : -1;
}

function renderAttention() {
  const grid = document.getElementById("grid");
  grid.textContent = "";
  const pat = D.attention[state.layer][state.head], T = pat.length, row = selectedRow();
  grid.style.gridTemplateColumns = "max-content repeat(" + T + ", 22px)";
  for (let t = 0; t < T; t++) {
    const lab = document.createElement("div"); lab.className = "lab"; lab.textContent = label(D.window.tokens[t]);
    grid.appendChild(lab);
    for (let s = 0; s < T; s++) {
      const c = document.createElement("div");
      if (s > t) { c.className = "masked"; }
      else {
        const v = pat[t][s];
        c.className = "cell" + (t === row ? " row-sel" : "");
        c.dataset.v = String(v);
        c.style.background = "rgba(47,111,181," + Math.max(0.04, v) + ")";
        c.title = label(D.window.tokens[t]) + " \u2192 " + label(D.window.tokens[s]) + ": " + v.toFixed(4);
      }
      c.dataset.t = String(t); c.dataset.s = String(s);
      grid.appendChild(c);
    }
  }
  const corner = document.createElement("div"); grid.appendChild(corner);
  for (let s = 0; s < T; s++) {
    const lab = document.createElement("div"); lab.className = "lab"; lab.style.textAlign = "center";
    lab.textContent = label(D.window.tokens[s]); grid.appendChild(lab);
  }
}

function renderLens() {
  const box = document.getElementById("lens"), L = D.lens, row = selectedRow();
  const table = document.createElement("table"); table.className = "lens";
  const head = document.createElement("tr"); head.appendChild(document.createElement("th"));
  for (const id of D.window.tokens) { const th = document.createElement("th"); th.textContent = label(id); head.appendChild(th); }
  table.appendChild(head);
  L.layers.forEach((name, l) => {
    const tr = document.createElement("tr");
    const th = document.createElement("th"); th.textContent = name; tr.appendChild(th);
    L.ids[l].forEach((ids, t) => {
      const td = document.createElement("td"), p = L.probs[l][t][0];
      td.textContent = label(ids[0]);
      td.style.background = "rgba(47,111,181," + (0.85 * p) + ")";
      if (p > 0.6) td.style.color = "#fff";
      if (t === row) td.className = "sel";
      td.title = ids.map((id, j) => label(id) + " " + L.probs[l][t][j].toFixed(3)).join("\n");
      tr.appendChild(td);
    });
    table.appendChild(tr);
  });
  box.textContent = ""; box.appendChild(table);
}

function fillSelect(id, n, prefix, key) {
  const sel = document.getElementById(id);
  for (let i = 0; i < n; i++) { const o = document.createElement("option"); o.value = String(i); o.textContent = prefix + (i + 1); sel.appendChild(o); }
  sel.addEventListener("change", () => { state[key] = Number(sel.value); renderAttention(); });
}
fillSelect("layer", D.attention.length, "layer ", "layer");
fillSelect("head", D.attention.length ? D.attention[0].length : 0, "head ", "head");

function render() {
  for (const name of sliders) document.getElementById(name + "-out").textContent = String(state[name]);
  renderText(); renderBars(); renderAttention(); renderLens();
}
render();
