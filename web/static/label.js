// The labeler page: take a task (NextTask), rank it, skip it, write a demonstration.
"use strict";

const $ = (id) => document.getElementById(id);
const page = {task: null, ranker: null, busy: false, retryTimer: null, leaseTimer: null, skipMode: null};

function showError(message) {
  const el = $("task-error");
  el.textContent = message;
  el.hidden = !message;
}

function showProgress(p, task) {
  if (p) {
    $("p-judged").textContent = p.judged;
    $("p-skipped").textContent = p.skipped;
    if ($("p-today")) { $("p-today").textContent = p.today; $("p-meter").value = p.today; }
  }
  if (task) $("p-waiting").textContent = task.queue_waiting;
}

function leaseCountdown(expires) {
  clearInterval(page.leaseTimer);
  const tick = () => {
    const left = Math.max(0, Math.round(expires - Date.now() / 1000));
    $("p-lease").textContent = left ? `${Math.floor(left / 60)}:${String(left % 60).padStart(2, "0")} left` : "expired";
  };
  tick();
  page.leaseTimer = setInterval(tick, 1000);
}

async function loadTask() {
  clearTimeout(page.retryTimer);
  showError("");
  try {
    const task = await IL.post("/api/task/next", {});
    page.task = task;
    $("empty").hidden = true;
    $("task").hidden = false;
    $("task").dataset.promptId = task.prompt_id;
    $("prompt").innerHTML = task.prompt_html;  // sanitised by the server (render.markdown)
    $("demo").value = "";
    page.ranker = new Ranker($("ranker"), task.samples, useSample);
    page.ranker.focus(task.samples[0].id);
    showProgress(task.progress, task);
    leaseCountdown(task.lease_expires);
  } catch (err) {
    page.task = null;
    $("task").hidden = true;
    $("empty").hidden = false;
    $("empty-why").textContent = err.status === 404 ? err.message
      : err.status === 429 ? `${err.message} (quota: try again in ${err.retryAfter || "a few"} s)`
      : `The server said: ${err.message}`;
    page.retryTimer = setTimeout(loadTask, (Number(err.retryAfter) || 15) * 1000);
  }
}

function useSample(sample) {
  const demo = $("demo");
  demo.value = sample.text;
  demo.focus();
}

async function submit() {
  if (!page.task || page.busy) return;
  const r = page.ranker.result();
  const demonstration = $("demo").value.trim();
  if (!r.complete) {
    showError("Put every sample in a tier (or flag it) before you submit.");
    return;
  }
  page.busy = true;
  try {
    const out = await IL.post("/api/feedback", {
      prompt_id: page.task.prompt_id, task_id: page.task.task_id,
      tiers: r.tiers, flagged: r.flagged, demonstration,
    });
    showProgress(out.progress);
    IL.toast(out.demonstration_error ? `Judgement stored; demonstration refused: ${out.demonstration_error}`
      : `Stored (${out.kind}${out.demonstration_id ? " and demonstration" : ""})`, !!out.demonstration_error);
    await loadTask();
  } catch (err) {
    showError(err.message);
  } finally {
    page.busy = false;
  }
}

function openSkip(cannotRank) {
  if (!page.task) return;
  page.skipMode = cannotRank;
  $("skip-title").textContent = cannotRank ? "I cannot rank this task" : "Skip this task";
  $("skip-hint").textContent = cannotRank ? "(required: what makes it impossible?)" : "(optional)";
  $("skip-ok").textContent = cannotRank ? "Cannot rank" : "Skip";
  $("skip-reason").value = "";
  $("skip-reason").required = cannotRank;
  $("skip-dialog").showModal();
  $("skip-reason").focus();
}

$("skip-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const reason = $("skip-reason").value.trim();
  if (page.skipMode && !reason) return;
  $("skip-dialog").close();
  try {
    const out = await IL.post("/api/task/skip", {task_id: page.task.task_id, reason, cannot_rank: page.skipMode});
    showProgress(out.progress);
    IL.toast(page.skipMode ? "Marked as cannot rank" : "Skipped");
    await loadTask();
  } catch (err) {
    showError(err.message);
  }
});
$("skip-cancel").addEventListener("click", () => $("skip-dialog").close());
$("submit").addEventListener("click", submit);
$("skip").addEventListener("click", () => openSkip(false));
$("cannot").addEventListener("click", () => openSkip(true));
$("retry").addEventListener("click", loadTask);

document.addEventListener("keydown", (e) => {
  if (document.querySelector("dialog[open]")) return;  // the dialog's own keys
  if (IL.typing(e.target)) {
    if (e.key === "Escape") { e.target.blur(); if (page.ranker) page.ranker.focus(page.ranker.focusId); }
    else if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(); }
    return;  // shortcuts are off while typing
  }
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  let handled = true;
  if (!page.task) {
    if (e.key === "r") loadTask(); else handled = false;
  } else if (page.ranker.handleKey(e)) {
    // the board moved a sample or the focus
  } else if (e.key === "Enter") submit();
  else if (e.key === "s") openSkip(false);
  else if (e.key === "c") openSkip(true);
  else if (e.key === "d") $("demo").focus();
  else handled = false;
  if (handled) e.preventDefault();
});

loadTask();
