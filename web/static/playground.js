// The playground: ask, watch the K samples stream in, then rank them.
"use strict";

const $ = (id) => document.getElementById(id);
const play = {result: null, ranker: null, busy: false};
// What the last generation looked like on the wire (read by tests/test_web.py).
window.playgroundStats = null;

async function generate(e) {
  if (e) e.preventDefault();
  if (play.busy) return;
  const prompt = $("prompt-input").value.trim();
  if (!prompt) return;
  const n = Number($("n").value);
  play.busy = true;
  play.result = null;
  const stats = {reads: 0, readsBeforeFinal: 0, deltas: 0, firstDeltaAt: null, finalAt: null,
                 textSeenBeforeFinal: false, start: performance.now()};
  window.playgroundStats = stats;
  $("result").hidden = false;
  if ($("rank-area")) $("rank-area").hidden = true;
  const stream = $("stream");
  stream.replaceChildren();
  const pres = [];
  for (let i = 0; i < n; i++) {
    const box = document.createElement("div");
    box.className = "streaming";
    const label = document.createElement("h3");
    label.textContent = `Sample ${LETTERS[i]}`;
    const pre = document.createElement("pre");
    pre.className = "sample-text";
    box.append(label, pre);
    stream.append(box);
    pres.push(pre);
  }
  $("gen-status").textContent = "streaming…";
  $("result-meta").textContent = "";
  try {
    const res = await fetch("/api/generate", {
      method: "POST", credentials: "same-origin",
      headers: {"content-type": "application/json", "x-csrf-token": IL.csrf()},
      body: JSON.stringify({prompt, n, max_tokens: Number($("max-tokens").value),
                            temperature: Number($("temperature").value)}),
    });
    if (!res.ok) throw await IL.failure(res);
    const onRead = () => { stats.reads++; if (stats.finalAt === null) stats.readsBeforeFinal++; };
    for await (const ev of IL.events(res, onRead)) {
      if (ev.event === "delta") {
        pres[ev.data.i].textContent += ev.data.t;
        stats.deltas++;
        if (stats.firstDeltaAt === null) stats.firstDeltaAt = performance.now() - stats.start;
        if (pres[ev.data.i].textContent && $("gen-status").textContent === "streaming…") {
          stats.textSeenBeforeFinal = true;
        }
      } else if (ev.event === "final") {
        stats.finalAt = performance.now() - stats.start;
        showFinal(ev.data);
      } else if (ev.event === "failed") {
        throw new Error(ev.data.error);
      }
    }
  } catch (err) {
    $("gen-status").textContent = "";
    IL.toast(err.message, true);
  } finally {
    play.busy = false;
  }
}

function showFinal(result) {
  play.result = result;
  $("gen-status").textContent = "done";
  $("result-meta").textContent = `${result.prompt_id} · ${result.version}` + (result.logged ? "" : " · not logged: cannot be judged");
  if (!$("rank-area") || !result.logged) return;
  $("stream").replaceChildren();
  $("rank-area").hidden = false;
  $("demo").value = "";
  play.ranker = new Ranker($("ranker"), result.samples, (s) => { $("demo").value = s.text; $("demo").focus(); });
  play.ranker.focus(result.samples[0].id);
}

async function submit() {
  if (!play.result || !play.ranker || play.busy) return;
  const r = play.ranker.result();
  if (!r.complete) { $("task-error").hidden = false; $("task-error").textContent = "Put every sample in a tier (or flag it) first."; return; }
  $("task-error").hidden = true;
  play.busy = true;
  try {
    const out = await IL.post("/api/feedback", {prompt_id: play.result.prompt_id, tiers: r.tiers,
                                                flagged: r.flagged, demonstration: $("demo").value.trim()});
    IL.toast(`Stored (${out.kind}${out.demonstration_id ? " and demonstration" : ""})`);
    $("rank-area").hidden = true;
    play.result = null;
    $("prompt-input").focus();
  } catch (err) {
    $("task-error").hidden = false;
    $("task-error").textContent = err.message;
  } finally {
    play.busy = false;
  }
}

$("ask").addEventListener("submit", generate);
if ($("submit")) $("submit").addEventListener("click", submit);
document.addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    if (play.result && play.ranker) submit(); else generate();
    return;
  }
  if (IL.typing(e.target)) {
    if (e.key === "Escape") e.target.blur();
    return;
  }
  if (!play.ranker || !play.result || e.ctrlKey || e.metaKey || e.altKey) return;
  let handled = play.ranker.handleKey(e);
  if (!handled && e.key === "Enter") { submit(); handled = true; }
  if (!handled && e.key === "d") { $("demo").focus(); handled = true; }
  if (handled) e.preventDefault();
});
