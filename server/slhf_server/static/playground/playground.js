// The refinement trace viewer (docs/playground.md). Plain browser JavaScript, no build step.
//
// One streamed OpenAI chat completion with refinement.stream_rounds (every round streams, each
// chunk carries its `round`) and return_trace (the last chunk carries every round's text, usage
// and latency). Between consecutive rounds it shows a word diff: the idea of `slhf refine`'s
// diff (clients/slhf_client/render.py) -- words with their trailing whitespace, compared without
// it, removed words struck through, added words highlighted -- on a longest common subsequence.
"use strict";

const $ = (id) => document.getElementById(id);
const view = $("rounds-view");
let controller = null;

// -- word diff ---------------------------------------------------------------------------------
// Words with their trailing whitespace (and the text's leading whitespace as its own token), so
// the diff rebuilds the text exactly.
function words(text) {
  return text.match(/^\s+|\S+\s*/g) || [];
}

function wordCount(text) {
  return text.split(/\s+/).filter(Boolean).length;
}

// [{op: "equal" | "removed" | "added", text}] turning `oldText` into `newText`, word by word.
function wordDiff(oldText, newText) {
  const a = words(oldText), b = words(newText);
  const ka = a.map((w) => w.trim()), kb = b.map((w) => w.trim());
  const n = a.length, m = b.length;
  const lcs = Array.from({ length: n + 1 }, () => new Uint32Array(m + 1));
  for (let i = n - 1; i >= 0; i--) {
    for (let j = m - 1; j >= 0; j--) {
      lcs[i][j] = ka[i] === kb[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const parts = [];
  const push = (op, text) => {
    const last = parts[parts.length - 1];
    if (last && last.op === op) last.text += text;
    else parts.push({ op, text });
  };
  let i = 0, j = 0;
  while (i < n || j < m) {
    if (i < n && j < m && ka[i] === kb[j]) { push("equal", b[j]); i++; j++; }
    else if (i < n && (j === m || lcs[i + 1][j] >= lcs[i][j + 1])) { push("removed", a[i]); i++; }
    else { push("added", b[j]); j++; }
  }
  return parts;
}

function diffStats(parts) {
  const count = (op) => parts.filter((p) => p.op === op).reduce((s, p) => s + wordCount(p.text), 0);
  return { added: count("added"), removed: count("removed") };
}

function renderDiff(container, oldText, newText) {
  const parts = wordDiff(oldText, newText);
  const { added, removed } = diffStats(parts);
  const summary = el("div", "diff-summary",
    added || removed ? `+${added} −${removed} words vs the previous round` : "unchanged from the previous round");
  const body = el("div", "diff");
  parts.forEach((p, k) => {
    if (p.op === "equal") body.append(document.createTextNode(p.text));
    else if (p.op === "added") body.append(el("ins", "", p.text));
    else {
      // removed words sit before the added ones: keep a space between them (shown struck)
      const next = parts[k + 1];
      const gap = next && next.op === "added" && !/\s$/.test(p.text) ? " " : "";
      body.append(el("del", "", p.text + gap));
    }
  });
  container.replaceChildren(summary, body);
}

// -- page --------------------------------------------------------------------------------------
function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "hint error" : "hint";
}

async function loadModels() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const body = await r.json();
    if (!r.ok) throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    $("model").replaceChildren(...body.data.map((m) => el("option", "", m.id)));
    const first = body.data[0];
    if (first && first.slhf) {
      $("rounds").max = first.slhf.max_rounds;
      $("rounds").value = Math.min(first.slhf.default_rounds, first.slhf.max_rounds);
    }
    $("models-status").textContent = "";
  } catch (e) {
    $("models-status").textContent = `cannot list models: ${e.message}`;
    $("models-status").className = "hint error";
  }
}

function roundCard(index, given) {
  let card = view.querySelector(`.round[data-round="${index}"]`);
  if (card) return card;
  card = el("section", "round");
  card.dataset.round = index;
  card.dataset.chunks = "0";
  const title = index === 0 ? (given ? "Round 0 · given answer" : "Round 0 · Leader") : `Round ${index} · Follower`;
  const h = el("h2", "", title);
  h.append(el("span", "stats"));
  card.append(h, el("div", "text"), el("div", "changes"));
  view.append(card);
  return card;
}

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

function requestBody() {
  const refinement = {
    rounds: Number($("rounds").value),
    stream_rounds: true,
    return_trace: true,
    stop_when_unchanged: $("stop-unchanged").checked,
  };
  const response = $("response").value;
  if (response.trim()) refinement.response = response;
  const body = {
    model: $("model").value || undefined,
    messages: [{ role: "user", content: $("prompt").value }],
    max_tokens: numberOrNull("max-tokens"),
    temperature: numberOrNull("temperature"),
    top_p: numberOrNull("top-p"),
    seed: numberOrNull("seed"),
    stream: true,
    stream_options: { include_usage: true },
    refinement,
  };
  for (const k of Object.keys(body)) if (body[k] === null) delete body[k];
  return body;
}

// Every `data:` object of a Server-Sent Events response, as it arrives.
async function* sseEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data && data !== "[DONE]") yield JSON.parse(data);
      }
    }
  }
}

function showTrace(trace, given) {
  const steps = [trace.leader, ...trace.rounds];
  steps.forEach((step, index) => {
    const card = roundCard(index, given);
    card.classList.remove("streaming");
    card.querySelector(".text").textContent = step.text;
    const u = step.usage;
    card.querySelector(".stats").textContent = step.source === "given"
      ? "given, not generated"
      : `${u.prompt_tokens} prompt + ${u.completion_tokens} completion tokens · ` +
        `${Math.round(step.latency_ms)} ms · ${step.finish_reason || step.source}`;
    if (index > 0) renderDiff(card.querySelector(".changes"), steps[index - 1].text, step.text);
  });
}

async function run(event) {
  event.preventDefault();
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  view.replaceChildren();
  view.dataset.state = "running";
  setStatus("refining…");
  const given = Boolean($("response").value.trim());
  const started = performance.now();
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(requestBody()), signal: controller.signal,
    });
    if (!r.ok) {
      const body = await r.json().catch(() => ({}));
      throw new Error(body.error ? body.error.message : `HTTP ${r.status}`);
    }
    let trace = null, usage = null;
    for await (const chunk of sseEvents(r)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      for (const c of chunk.choices || []) {
        if (c.index !== 0) continue;
        const text = c.delta && c.delta.content;
        if (text && c.round !== undefined) {
          view.querySelectorAll(".round.streaming").forEach((x) => x.classList.remove("streaming"));
          const card = roundCard(c.round, given);
          card.classList.add("streaming");
          card.querySelector(".text").textContent += text;
          card.dataset.chunks = String(Number(card.dataset.chunks) + 1);
        }
        if (c.refinement) trace = c.refinement;
      }
    }
    if (trace) showTrace(trace, given);
    const seconds = ((performance.now() - started) / 1000).toFixed(1);
    const total = usage ? ` · ${usage.total_tokens} tokens in all` : "";
    setStatus(`stopped: ${trace ? trace.stopped_reason : "?"} · ${seconds} s${total}`);
    view.dataset.state = "done";
  } catch (e) {
    setStatus(e.name === "AbortError" ? "stopped" : e.message, e.name !== "AbortError");
    view.dataset.state = "error";
  } finally {
    $("run").disabled = false;
    $("stop").disabled = true;
    controller = null;
  }
}

$("form").addEventListener("submit", run);
$("stop").addEventListener("click", () => controller && controller.abort());
$("api-key").addEventListener("change", () => {
  sessionStorage.setItem("slhf-api-key", $("api-key").value);
  loadModels();
});
$("api-key").value = sessionStorage.getItem("slhf-api-key") || "";
window.slhfPlayground = { wordDiff };  // for tests
loadModels();
