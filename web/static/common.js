// Shared by every page: the CSRF header, JSON POSTs, a toast, an event-stream reader.
"use strict";

const IL = {
  csrf() {
    const meta = document.querySelector('meta[name="csrf-token"]');
    return meta ? meta.content : "";
  },

  // POST a JSON body with the session's CSRF token; resolves to the JSON answer, or
  // throws an Error with .status (and .retryAfter, seconds, on 429).
  async post(url, body) {
    const res = await fetch(url, {
      method: "POST",
      credentials: "same-origin",
      headers: {"content-type": "application/json", "x-csrf-token": IL.csrf()},
      body: JSON.stringify(body || {}),
    });
    if (!res.ok) throw await IL.failure(res);
    return res.json();
  },

  async failure(res) {
    let message = res.statusText;
    try { message = (await res.json()).error || message; } catch (e) { /* not JSON */ }
    const err = new Error(message);
    err.status = res.status;
    err.retryAfter = res.headers.get("retry-after");
    if (res.status === 401) setTimeout(() => { location.href = "/signin"; }, 1500);
    return err;
  },

  toast(text, bad) {
    const el = document.getElementById("toast");
    el.textContent = text;
    el.className = bad ? "bad" : "";
    el.hidden = false;
    clearTimeout(IL._toastTimer);
    IL._toastTimer = setTimeout(() => { el.hidden = true; }, bad ? 8000 : 3500);
  },

  // True while the user types in a text field: page shortcuts are off then.
  typing(target) {
    return !!target && (target.isContentEditable ||
      ["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName));
  },

  // Server-sent events from a fetch() response body (a POST, which EventSource cannot
  // send): yields {event, data} as each block arrives. onRead(n) is called per network
  // read, so a page can see that the answer arrives in pieces.
  async *events(response, onRead) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      if (onRead) onRead();
      buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        let event = "message";
        const data = [];
        for (const line of block.split("\n")) {
          if (line.startsWith("event:")) event = line.slice(6).trim();
          else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
        }
        if (data.length) yield {event, data: JSON.parse(data.join("\n"))};
      }
    }
  },
};
