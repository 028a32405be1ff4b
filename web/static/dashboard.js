// The operations dashboard: actions behind a reason and a confirmation, live updates
// from the registry's events (server-sent events), a periodic refresh for the canary's
// counts and the replicas.
"use strict";

const $ = (id) => document.getElementById(id);
const dash = $("dash");
let pending = null;
let refreshTimer = null;

function busy() {
  return document.querySelector("dialog[open]") ||
    (document.activeElement && document.activeElement.closest("#canary-form"));
}

async function refresh() {
  if (busy()) return;
  const res = await fetch("/dashboard/body", {credentials: "same-origin"});
  if (res.status === 401) { location.href = "/signin?next=/dashboard"; return; }
  if (res.ok && !busy()) dash.innerHTML = await res.text();  // rendered by the server's templates
}

function soon() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(refresh, 150);
}

function confirmAction(action) {
  pending = action;
  $("confirm-title").textContent = `${action.label}?`;
  $("confirm-what").textContent = action.what || "";
  $("confirm-ok").textContent = `Confirm ${action.action}`;
  $("confirm-reason").value = "";
  $("confirm-error").hidden = true;
  $("confirm").showModal();
  $("confirm-reason").focus();
}

dash.addEventListener("click", (e) => {
  const button = e.target.closest("[data-action]");
  if (!button) return;
  confirmAction({action: button.dataset.action, label: button.textContent.trim(),
                 what: button.dataset.what, body: {version: button.dataset.version || ""}});
});

dash.addEventListener("submit", (e) => {
  if (e.target.id !== "canary-form") return;
  e.preventDefault();
  const body = Object.fromEntries(new FormData(e.target));
  confirmAction({action: "canary", label: `Start canary ${body.version}`, body,
                 what: `Route ${Math.round(body.share * 100)}% of traffic to ${body.version}; ` +
                       `promote at a win rate of ${body.promote_at}, end at ${body.rollback_at}, ` +
                       `after ${body.min_comparisons} judgements by ${body.min_users} users.`});
});

$("confirm-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const reason = $("confirm-reason").value.trim();
  if (!reason) return;
  try {
    const change = await IL.post(`/api/${pending.action}`, {...pending.body, reason});
    $("confirm").close();
    IL.toast(change.alias ? `${change.alias}: ${change.from_version || "–"} → ${change.to_version || "–"} (by ${change.actor})`
      : `${pending.action}: done`);
    soon();
  } catch (err) {
    $("confirm-error").textContent = err.message;
    $("confirm-error").hidden = false;
  }
});
$("confirm-cancel").addEventListener("click", () => $("confirm").close());

const events = new EventSource("/api/events");
events.addEventListener("open", () => { $("live").textContent = "live"; $("live").className = "live on"; });
events.addEventListener("error", () => { $("live").textContent = "reconnecting…"; $("live").className = "live"; });
events.addEventListener("registry", (e) => {
  const ev = JSON.parse(e.data);
  if (ev.action !== "watching") IL.toast(`${ev.action}${ev.alias ? ` ${ev.alias}` : ""}${ev.version ? ` → ${ev.version}` : ""}`);
  soon();
});
setInterval(() => { if (!document.hidden) refresh(); }, 10000);
