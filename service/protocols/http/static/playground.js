// dropout-service playground: plain JavaScript, no dependencies. Every number shown comes
// from the service's own v1 endpoints (predict, compare, predict/mc); the exact value of each
// is kept in a data-value attribute, so tests can compare the page with the API.
"use strict";

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
const OPTION_FIELDS = ["n_samples", "seed", "coverage", "n_train_passes"];
const state = { models: [], model: null };

// -- talking to the service -----------------------------------------------------------

async function api(path, body) {
  const init = body === undefined ? {} : {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  };
  const started = performance.now();
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    return { ok: false, status: 0, json: { detail: "the service did not answer: " + err }, ms: 0 };
  }
  const ms = performance.now() - started;
  let json = null;
  try {
    json = await response.json();
  } catch (err) {
    json = { detail: "the answer was not JSON (" + response.status + ")" };
  }
  return { ok: response.ok, status: response.status, json, ms,
           retryAfter: response.headers.get("retry-after") };
}

// -- helpers ----------------------------------------------------------------------------

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null) continue;
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) if (child) node.append(child);
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, value);
  return node;
}

function fmt(x) {
  if (typeof x !== "number" || !isFinite(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e6)) return x.toExponential(3);
  return x.toPrecision(6).replace(/\.?0+$/, "");
}

function fmtMs(ms) {
  return ms >= 10 ? ms.toFixed(1) : ms.toFixed(2);
}

function fmtProb(p) {
  return p < 1e-3 ? "< 0.001" : p.toFixed(3);
}

function valueSpan(value, testid, text) {
  return el("span", { "data-testid": testid, "data-value": String(value), text: text || fmt(value) });
}

function valueCell(value, testid) {
  return el("td", { class: "num", "data-testid": testid, "data-value": String(value), text: fmt(value) });
}

// -- the model and its rows -----------------------------------------------------------

function featureNames(model) {
  if (model.feature_names) return model.feature_names;
  return Array.from({ length: model.input_dim }, (_, i) => "x" + (i + 1));
}

function exampleRow(model) {
  return model.example ? model.example.slice() : new Array(model.input_dim).fill(0);
}

function addRow(values) {
  const model = state.model;
  const names = featureNames(model);
  const r = $("rows").children.length;
  const compact = model.input_dim >= 32;
  const row = el("div", { class: "row" + (compact ? " pixels" : ""), "data-row": r });
  row.append(el("p", { class: "row-title", text: "Row " + (r + 1) }));
  names.forEach((name, c) => {
    const id = `in-${r}-${c}`;
    const input = el("input", { id, type: "number", step: "any", value: String(values[c]),
                                "aria-describedby": `row-${r}-error` });
    input.addEventListener("change", () => predict());
    row.append(el("div", { class: "cell" }, el("label", { for: id, text: name }), input));
  });
  row.append(el("p", { class: "field-error", id: `row-${r}-error`, role: "alert" }));
  $("rows").append(row);
}

function resetRows() {
  $("rows").replaceChildren();
  addRow(exampleRow(state.model));
}

function readRows() {
  return Array.from($("rows").children).map((row) =>
    Array.from(row.querySelectorAll("input")).map((input) =>
      input.value.trim() === "" ? null : Number(input.value)));
}

function describeModel(model) {
  const parts = [`${model.task}, ${model.input_dim} input(s), ${model.output_dim} output(s)`,
                 `dropout ${model.dropout.join(", ")}`];
  if (model.calibration) parts.push(`calibrated on ${model.calibration.held_out_rows} held-out rows`);
  $("model-about").textContent = parts.join("; ");
}

async function pickModel(name) {
  state.model = state.models.find((m) => m.name === name);
  describeModel(state.model);
  resetRows();
  $("sweep-card").hidden = state.model.input_dim !== 1;
  await predict();
}

// -- errors next to their fields ----------------------------------------------------------

function clearErrors() {
  for (const node of document.querySelectorAll(".field-error")) node.textContent = "";
  for (const node of document.querySelectorAll("[aria-invalid]")) node.removeAttribute("aria-invalid");
}

function showError(answer) {
  const detail = answer.json && answer.json.detail;
  if (answer.status === 503) {
    const wait = answer.retryAfter ? ` Retry after ${answer.retryAfter} s.` : "";
    $("form-error").textContent = `The service is busy or still loading (503).${wait}`;
    return;
  }
  if (!Array.isArray(detail)) {
    $("form-error").textContent = `${answer.status}: ${detail || "request failed"}`;
    return;
  }
  for (const error of detail) {
    const loc = error.loc || [];
    const field = loc[1];
    if (OPTION_FIELDS.includes(field)) {
      $(field).setAttribute("aria-invalid", "true");
      $(`${field}-error`).textContent = error.msg;
    } else if (field === "inputs" && Number.isInteger(loc[2]) && $(`row-${loc[2]}-error`)) {
      $(`row-${loc[2]}-error`).textContent = error.msg;
      const cells = Number.isInteger(loc[3]) ? [$(`in-${loc[2]}-${loc[3]}`)]
        : Array.from(document.querySelectorAll(`[data-row="${loc[2]}"] input`));
      for (const cell of cells) if (cell) cell.setAttribute("aria-invalid", "true");
    } else if (field === "inputs") {
      $("rows-error").textContent = error.msg;
    } else {
      $("form-error").textContent = `${loc.join(".")}: ${error.msg}`;
    }
  }
}

function optionValue(name) {
  const raw = $(name).value.trim();
  return raw === "" ? null : Number(raw);
}

// -- one prediction -------------------------------------------------------------------

let pending = 0;

async function predict() {
  const model = state.model;
  if (!model) return;
  const ticket = ++pending;
  clearErrors();
  const inputs = readRows();
  const missing = [];
  inputs.forEach((row, r) => row.forEach((v, c) => { if (v === null) missing.push([r, c]); }));
  if (missing.length) {
    for (const [r, c] of missing) $(`in-${r}-${c}`).setAttribute("aria-invalid", "true");
    $(`row-${missing[0][0]}-error`).textContent = "every field needs a number";
    return;
  }
  const base = `/v1/models/${encodeURIComponent(model.name)}`;
  const seed = optionValue("seed");
  const options = { n_samples: optionValue("n_samples"), n_train_passes: optionValue("n_train_passes") };
  if (seed !== null) options.seed = seed;
  $("status").textContent = "Asking the service...";
  document.body.dataset.state = "busy";

  const evalAnswer = await api(`${base}/predict`, { inputs });
  if (!evalAnswer.ok) return failed(ticket, evalAnswer);
  const compare = await api(`${base}/compare`, { inputs, ...options });
  if (!compare.ok) return failed(ticket, compare);
  const mcBody = { inputs, n_samples: compare.json.n_samples, seed: compare.json.seed,
                   coverage: optionValue("coverage") };
  const mc = await api(`${base}/predict/mc`, mcBody);
  if (!mc.ok) return failed(ticket, mc);
  if (ticket !== pending) return;  // a later request is on its way
  render(model, inputs, evalAnswer, compare, mc);
  if (model.input_dim === 1) await sweep(model, mcBody);
  document.body.dataset.state = "done";
}

function failed(ticket, answer) {
  if (ticket !== pending) return;
  showError(answer);
  $("status").textContent = "The service refused this request: see the message by the field.";
  document.body.dataset.state = "error";
}

// -- rendering ---------------------------------------------------------------------------

function render(model, inputs, evalAnswer, compare, mc) {
  const answer = mc.json;
  const results = $("results");
  results.replaceChildren();
  $("status").textContent = "";
  if (model.task === "classification") renderClassifier(model, evalAnswer.json, answer, results);
  else renderRegression(model, evalAnswer.json, answer, results);
  const t = compare.json.timing_ms;
  results.append(el("p", { class: "timings", "data-testid": "timings",
    text: `Round trips: predict ${fmtMs(evalAnswer.ms)} ms, compare ${fmtMs(compare.ms)} ms, ` +
          `predict/mc ${fmtMs(mc.ms)} ms. Server compute: eval ${fmtMs(t.eval)} ms, ` +
          `one train-mode pass ${fmtMs(t.train_passes[0])} ms, MC with ${answer.n_samples} passes ` +
          `${fmtMs(t.mc)} ms: the price of uncertainty.` }));
  const replay = model.replay;
  $("replay-note").textContent =
    `MC: ${answer.n_samples} passes from seed ${answer.seed}. Send the seed back and the ` +
    `answer replays bit for bit on this server (torch ${replay.torch_version}, ` +
    `${replay.cpu_capability}, ${replay.device}, ${replay.mask_mode} masks); ` +
    `another CPU kind may differ in the last digits.`;
  $("replay-note").dataset.seed = String(answer.seed);
  histogram(model, evalAnswer.json, compare.json, answer);
}

function renderRegression(model, evalJson, answer, parent) {
  const outputs = model.output_dim;
  const interval = answer.interval;
  const head = el("tr", {}, el("th", { text: "row" }),
    outputs > 1 ? el("th", { text: "output" }) : null,
    el("th", { text: "eval (dropout off)" }), el("th", { text: "MC mean +- std" }),
    el("th", { text: interval ? `${Math.round(interval.coverage * 100)}% interval (${interval.method})` : "interval" }),
    el("th", { text: "out of distribution" }));
  const body = el("tbody");
  evalJson.outputs.forEach((row, r) => {
    for (let o = 0; o < outputs; o++) {
      const mean = el("td", { class: "num" }, valueSpan(answer.mean[r][o], `mean-${r}-${o}`), " +- ",
                      valueSpan(answer.std[r][o], `std-${r}-${o}`));
      const tr = el("tr", {}, el("td", { text: String(r + 1) }),
        outputs > 1 ? el("td", { text: String(o + 1) }) : null,
        valueCell(row[o], `eval-${r}-${o}`), mean);
      if (interval) {
        const lo = interval.lower[r][o], hi = interval.upper[r][o];
        tr.append(el("td", { class: "num", "data-testid": `interval-${r}-${o}`,
                             "data-lower": String(lo), "data-upper": String(hi),
                             text: `${fmt(lo)} to ${fmt(hi)}` }));
      } else tr.append(el("td", { text: "-" }));
      tr.append(oodCell(answer, r));
      body.append(tr);
    }
  });
  parent.append(el("div", { class: "scroll" }, el("table", {}, el("thead", {}, head), body)));
}

function oodCell(answer, r) {
  if (!answer.ood_score) return el("td", { text: "-" });
  const flagged = answer.out_of_distribution[r];
  return el("td", { class: flagged ? "flag" : "", "data-testid": `ood-${r}`,
                    "data-value": String(answer.ood_score[r]),
                    text: `${flagged ? "yes" : "no"} (${answer.ood_score[r].toFixed(2)})` });
}

function renderClassifier(model, evalJson, answer, parent) {
  const labels = model.labels;
  const probabilities = answer.calibrated_probabilities || answer.mean;
  evalJson.outputs.forEach((row, r) => {
    const best = row.indexOf(Math.max(...row));
    const box = el("div", { class: "class-row", "data-testid": `class-row-${r}` });
    box.append(el("h3", { text: `Row ${r + 1}` }));
    const evalLine = el("p", {}, "Eval (dropout off): ");
    evalLine.append(el("strong", { "data-testid": `eval-class-${r}`, "data-value": String(row[best]),
                                   text: `${labels[best]} (p = ${fmt(row[best])})` }));
    box.append(evalLine);
    const set = answer.prediction_sets ? new Set(answer.prediction_sets[r]) : new Set();
    const caption = answer.calibrated_probabilities ? "MC mean probabilities, temperature-scaled"
      : "MC mean probabilities";
    box.append(el("p", { class: "muted", text: caption +
      (answer.prediction_sets ? `; the prediction set (coverage ${optionValue("coverage")}) is highlighted` : "") }));
    probabilities[r].forEach((p, k) => {
      const bar = el("div", { class: "prob" + (set.has(k) ? " in-set" : ""), "data-testid": `prob-${r}-${k}`,
                              "data-value": String(p) },
        el("span", { text: labels[k] }),
        el("span", { class: "track", role: "img", "aria-label": `${labels[k]}: ${fmt(p)}` },
           el("span", { class: "fill", style: `width: ${Math.max(0, Math.min(1, p)) * 100}%; display: block;` })),
        el("span", { class: "num", text: fmtProb(p) }));
      box.append(bar);
    });
    const facts = el("table", {}, el("tbody", {},
      el("tr", {}, el("th", { text: "predictive entropy (nats)" }), valueCell(answer.entropy[r], `entropy-${r}`)),
      el("tr", {}, el("th", { text: "mutual information (nats)" }), valueCell(answer.mutual_information[r], `mi-${r}`)),
      el("tr", {}, el("th", { text: "out of distribution" }), oodCell(answer, r))));
    box.append(facts);
    parent.append(box);
  });
}

// -- charts -------------------------------------------------------------------------------

function histogram(model, evalJson, compare, answer) {
  const box = $("histogram");
  box.replaceChildren();
  const row = evalJson.outputs[0];
  const o = model.task === "classification" ? row.indexOf(Math.max(...row)) : 0;
  const passes = compare.train_passes.map((p) => p[0][o]);
  const marks = [{ value: row[o], label: "eval", color: "var(--eval)" },
                 { value: answer.mean[0][o], label: "MC mean", color: "var(--mc)" }];
  const all = passes.concat(marks.map((m) => m.value));
  let lo = Math.min(...all), hi = Math.max(...all);
  if (hi - lo < 1e-12) { lo -= 0.5; hi += 0.5; }
  const pad = (hi - lo) * 0.05; lo -= pad; hi += pad;
  const bins = 16, counts = new Array(bins).fill(0);
  for (const v of passes) counts[Math.min(bins - 1, Math.floor((v - lo) / (hi - lo) * bins))] += 1;
  const W = 480, H = 200, L = 36, B = 28, T = 10, R = 10;
  const x = (v) => L + (v - lo) / (hi - lo) * (W - L - R);
  const top = Math.max(...counts);
  const y = (c) => H - B - c / top * (H - B - T);
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-testid": "histogram",
    "aria-label": `Histogram of ${passes.length} single train-mode passes` });
  counts.forEach((c, i) => {
    const x0 = x(lo + (hi - lo) * i / bins), x1 = x(lo + (hi - lo) * (i + 1) / bins);
    chart.append(svg("rect", { x: x0 + 1, y: y(c), width: Math.max(0, x1 - x0 - 2),
                               height: H - B - y(c), fill: "var(--bar)", "data-count": c }));
  });
  chart.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "var(--line)" }));
  for (const m of marks) {
    chart.append(svg("line", { x1: x(m.value), x2: x(m.value), y1: T, y2: H - B, stroke: m.color,
                               "stroke-width": 2, "stroke-dasharray": m.label === "eval" ? "" : "5 3" }));
  }
  for (const [v, anchor] of [[lo + pad, "start"], [hi - pad, "end"]]) {
    const t = svg("text", { x: x(v), y: H - 8, "text-anchor": anchor });
    t.textContent = fmt(v);
    chart.append(t);
  }
  const count = svg("text", { x: 4, y: T + 10 });
  count.textContent = String(top);
  chart.append(count);
  box.append(chart);
  const spread = Math.max(...passes) - Math.min(...passes);
  box.append(el("p", { class: "legend" },
    el("span", {}, el("span", { class: "swatch", style: "background: var(--bar)" }),
       `${passes.length} train-mode passes (spread ${fmt(spread)})`),
    el("span", {}, el("span", { class: "swatch", style: "background: var(--eval)" }), `eval ${fmt(row[o])}`),
    el("span", {}, el("span", { class: "swatch", style: "background: var(--mc)" }),
       `MC mean ${fmt(answer.mean[0][o])}`)));
}

async function sweep(model, mcBody) {
  const box = $("sweep");
  const center = exampleRow(model)[0];
  const n = 161, from = center - 10, to = center + 10;
  const xs = Array.from({ length: n }, (_, i) => from + (to - from) * i / (n - 1));
  const inputs = xs.map((v) => [v]);
  const base = `/v1/models/${encodeURIComponent(model.name)}`;
  const [evalAnswer, mc] = await Promise.all([
    api(`${base}/predict`, { inputs }),
    api(`${base}/predict/mc`, { ...mcBody, inputs }),
  ]);
  box.replaceChildren();
  if (!evalAnswer.ok || !mc.ok) {
    box.append(el("p", { class: "field-error", text: "The sweep failed: " +
      JSON.stringify((evalAnswer.ok ? mc : evalAnswer).json.detail) }));
    return;
  }
  const ev = evalAnswer.json.outputs.map((r) => r[0]);
  const mean = mc.json.mean.map((r) => r[0]);
  const lower = mc.json.interval ? mc.json.interval.lower.map((r) => r[0])
    : mean.map((m, i) => m - 2 * mc.json.std[i][0]);
  const upper = mc.json.interval ? mc.json.interval.upper.map((r) => r[0])
    : mean.map((m, i) => m + 2 * mc.json.std[i][0]);
  const all = ev.concat(lower, upper);
  const lo = Math.min(...all), hi = Math.max(...all);
  const W = 480, H = 240, L = 36, B = 28, T = 10, R = 10;
  const x = (v) => L + (v - from) / (to - from) * (W - L - R);
  const y = (v) => H - B - (v - lo) / (hi - lo || 1) * (H - B - T);
  const line = (values) => values.map((v, i) => `${i ? "L" : "M"}${x(xs[i]).toFixed(1)},${y(v).toFixed(1)}`).join("");
  const chart = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "data-testid": "sweep",
    "aria-label": `Eval and MC mean with the band over x from ${fmt(from)} to ${fmt(to)}` });
  const band = upper.map((v, i) => `${i ? "L" : "M"}${x(xs[i]).toFixed(1)},${y(v).toFixed(1)}`).join("") +
    lower.slice().reverse().map((v, i) => `L${x(xs[n - 1 - i]).toFixed(1)},${y(v).toFixed(1)}`).join("") + "Z";
  chart.append(svg("path", { d: band, fill: "var(--band)", stroke: "none", "data-series": "band" }));
  chart.append(svg("path", { d: line(mean), fill: "none", stroke: "var(--mc)", "stroke-width": 2,
                             "data-series": "mc-mean", "data-points": n }));
  chart.append(svg("path", { d: line(ev), fill: "none", stroke: "var(--eval)", "stroke-width": 1.5,
                             "stroke-dasharray": "5 3", "data-series": "eval", "data-points": n }));
  chart.append(svg("line", { x1: L, x2: W - R, y1: H - B, y2: H - B, stroke: "var(--line)" }));
  for (const [v, anchor] of [[from, "start"], [to, "end"]]) {
    const t = svg("text", { x: x(v), y: H - 8, "text-anchor": anchor });
    t.textContent = "x = " + fmt(v);
    chart.append(t);
  }
  box.append(chart);
  const what = mc.json.interval ? `${Math.round(mc.json.interval.coverage * 100)}% ${mc.json.interval.method} interval`
    : "mean +- 2 std";
  box.append(el("p", { class: "legend" },
    el("span", {}, el("span", { class: "swatch", style: "background: var(--eval)" }), "eval"),
    el("span", {}, el("span", { class: "swatch", style: "background: var(--mc)" }), "MC mean"),
    el("span", {}, el("span", { class: "swatch", style: "background: var(--band)" }), what)));
}

// -- start ----------------------------------------------------------------------------------

async function start() {
  $("add-row").addEventListener("click", () => addRow(exampleRow(state.model)));
  $("remove-row").addEventListener("click", () => {
    if ($("rows").children.length > 1) $("rows").lastElementChild.remove();
  });
  $("reset-rows").addEventListener("click", () => { resetRows(); predict(); });
  $("ask").addEventListener("submit", (event) => { event.preventDefault(); predict(); });
  for (const name of OPTION_FIELDS) $(name).addEventListener("change", () => predict());
  $("model").addEventListener("change", (event) => pickModel(event.target.value));
  const listed = await api("/v1/models");
  if (!listed.ok) {
    showError(listed);
    $("status").textContent = "No models to show yet.";
    return;
  }
  state.models = listed.json.models;
  for (const m of state.models) $("model").append(el("option", { value: m.name, text: m.name }));
  const wanted = new URLSearchParams(location.search).get("model");
  const first = state.models.find((m) => m.name === wanted) || state.models[0];
  if (!first) {
    $("status").textContent = "The server serves no model.";
    return;
  }
  $("model").value = first.name;
  await pickModel(first.name);
}

start();
