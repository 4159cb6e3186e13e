// yuyan playground: chat and completion over the server's OpenAI API, streamed with fetch + ReadableStream
// (server-sent events), tokens/s, and an attention heatmap of the last answer from /v1/inspect/attention.
// Plain JS, no dependencies, works offline.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { mode: "chat", model: null, history: [], controller: null, attention: null };

function apiHeaders() {
  const h = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(cls, role, text) {
  const div = document.createElement("div");
  div.className = "msg " + cls;
  const r = document.createElement("span");
  r.className = "role";
  r.textContent = role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text || "";
  div.append(r, body);
  $("messages").append(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return body;
}

async function loadModel() {
  try {
    const res = await fetch("/v1/models", { headers: apiHeaders() });
    const data = await res.json();
    if (!res.ok) throw new Error(data.error ? data.error.message : res.statusText);
    state.model = data.data[0].id;
    $("model-name").textContent = "model: " + state.model + " · context " + data.data[0].context_length;
  } catch (e) {
    $("model-name").textContent = "model list unavailable (" + e.message + ")";
  }
}

function samplingBody() {
  const num = (id) => Number($(id).value);
  const body = {
    model: state.model || "yuyan",
    temperature: num("temperature"),
    top_p: num("top_p"),
    max_tokens: Math.max(1, Math.floor(num("max_tokens"))),
    presence_penalty: num("presence_penalty"),
    frequency_penalty: num("frequency_penalty"),
    stream: true,
    stream_options: { include_usage: true },
  };
  const k = Math.floor(num("top_k"));
  if (k > 0) body.top_k = k;
  if ($("seed").value !== "") body.seed = Math.floor(num("seed"));
  const stop = $("stop_str").value.split(",").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
  if (stop.length) body.stop = stop.slice(0, 4);
  return body;
}

// Read a server-sent-event stream; call onData(obj) for each `data: {...}` line.
async function readSSE(res, onData) {
  const reader = res.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const payload = line.slice(6);
        if (payload === "[DONE]") return;
        onData(JSON.parse(payload));
      }
    }
  }
}

async function send(text) {
  const body = samplingBody();
  let url, out, promptText;
  if (state.mode === "chat") {
    addMessage("user", "user", text);
    const sys = $("system").value.trim();
    const messages = (sys ? [{ role: "system", content: sys }] : []).concat(state.history, [{ role: "user", content: text }]);
    body.messages = messages;
    url = "/v1/chat/completions";
    out = addMessage("assistant", "assistant", "");
    promptText = text;
  } else {
    body.prompt = text;
    url = "/v1/completions";
    const holder = addMessage("completion", "completion", "");
    const p = document.createElement("span");
    p.className = "prompt";
    p.textContent = text;
    out = document.createElement("span");
    out.className = "generated";
    holder.append(p, out);
    promptText = text;
  }
  state.controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  const t0 = performance.now();
  let tFirst = null, pieces = 0, usage = null, answer = "";
  try {
    const res = await fetch(url, { method: "POST", headers: apiHeaders(), body: JSON.stringify(body), signal: state.controller.signal });
    if (!res.ok) {
      const err = await res.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : res.status + " " + res.statusText);
    }
    await readSSE(res, (obj) => {
      if (obj.error) throw new Error(obj.error.message);
      if (obj.usage) usage = obj.usage;
      for (const c of obj.choices || []) {
        const piece = state.mode === "chat" ? (c.delta && c.delta.content) || "" : c.text || "";
        if (!piece) continue;
        if (tFirst === null) tFirst = performance.now();
        pieces += 1;
        answer += piece;
        out.textContent += piece;
        $("messages").scrollTop = $("messages").scrollHeight;
        const secs = (performance.now() - t0) / 1000;
        $("stats").textContent = `${pieces} pieces · ${(pieces / secs).toFixed(1)} tokens/s`;
      }
    });
    const secs = (performance.now() - t0) / 1000;
    const n = usage ? usage.completion_tokens : pieces;
    const ttft = tFirst === null ? "-" : ((tFirst - t0) / 1000).toFixed(2) + " s";
    $("stats").textContent = `${n} tokens in ${secs.toFixed(2)} s · ${(n / secs).toFixed(1)} tokens/s · first token ${ttft}`;
    if (state.mode === "chat") state.history.push({ role: "user", content: text }, { role: "assistant", content: answer });
    inspect(promptText + answer);
  } catch (e) {
    if (e.name === "AbortError") $("stats").textContent = "stopped";
    else addMessage("error", "error", e.message);
  } finally {
    $("send").disabled = false;
    $("stop").disabled = true;
    state.controller = null;
  }
}

async function inspect(text) {
  try {
    const res = await fetch("/v1/inspect/attention", { method: "POST", headers: apiHeaders(), body: JSON.stringify({ text }) });
    const data = await res.json();
    if (!res.ok) throw new Error(data.error ? data.error.message : res.statusText);
    state.attention = data;
    const fill = (sel, n, label) => {
      sel.innerHTML = "";
      for (let i = 0; i < n; i++) {
        const o = document.createElement("option");
        o.value = i;
        o.textContent = label + " " + i;
        sel.append(o);
      }
    };
    fill($("attn-layer"), data.n_layer, "layer");
    fill($("attn-head"), data.n_head, "head");
    $("attn-layer").value = data.n_layer - 1;
    drawAttention();
  } catch (e) {
    $("attn-info").textContent = "attention unavailable: " + e.message;
  }
}

function drawAttention(hover) {
  const data = state.attention;
  if (!data) return;
  const l = Number($("attn-layer").value), h = Number($("attn-head").value);
  const w = data.attention[l][h];
  const T = data.tokens.length;
  const cv = $("attn-canvas");
  const ctx = cv.getContext("2d");
  const cell = cv.width / T;
  ctx.fillStyle = "#fff";
  ctx.fillRect(0, 0, cv.width, cv.height);
  for (let q = 0; q < T; q++) {
    for (let k = 0; k <= q; k++) {
      const v = w[q][k] / data.scale; // 0..1
      const shade = Math.round(255 * (1 - Math.sqrt(v)));
      ctx.fillStyle = `rgb(255,${shade},${shade})`;
      ctx.fillRect(k * cell, q * cell, Math.ceil(cell), Math.ceil(cell));
    }
  }
  if (hover) {
    ctx.strokeStyle = "#1d1d1f";
    ctx.strokeRect(0, hover.q * cell, cv.width, cell);
  }
  $("attn-info").textContent = hover
    ? `query ${JSON.stringify(data.tokens[hover.q])} → key ${JSON.stringify(data.tokens[hover.k])}: ${(w[hover.q][hover.k] / data.scale).toFixed(3)}`
    : `${T} tokens (rows: queries, columns: keys); hover a cell for its weight`;
}

function init() {
  document.querySelectorAll("button.mode").forEach((b) =>
    b.addEventListener("click", () => {
      state.mode = b.dataset.mode;
      document.querySelectorAll("button.mode").forEach((x) => x.classList.toggle("active", x === b));
      $("input").placeholder = state.mode === "chat" ? "Type a message" : "Type the beginning of a text to continue";
    }));
  for (const id of ["temperature", "top_p"]) {
    $(id).addEventListener("input", () => ($(id + "-v").textContent = $(id).value));
  }
  $("api_key").value = localStorage.getItem("yuyan-api-key") || "";
  $("api_key").addEventListener("change", () => {
    localStorage.setItem("yuyan-api-key", $("api_key").value);
    loadModel();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = $("input").value;
    if (!text.trim() || state.controller) return;
    $("input").value = "";
    send(text);
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) {
      e.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("clear").addEventListener("click", () => {
    state.history = [];
    $("messages").innerHTML = "";
    $("stats").textContent = "";
  });
  $("attn-layer").addEventListener("change", () => drawAttention());
  $("attn-head").addEventListener("change", () => drawAttention());
  $("attn-canvas").addEventListener("mousemove", (e) => {
    if (!state.attention) return;
    const r = e.target.getBoundingClientRect();
    const T = state.attention.tokens.length;
    const k = Math.floor(((e.clientX - r.left) / r.width) * T), q = Math.floor(((e.clientY - r.top) / r.height) * T);
    if (q >= 0 && q < T && k >= 0 && k <= q) drawAttention({ q, k });
  });
  loadModel();
}

init();
