// The ranking board: samples in tiers, best first; samples in one tier are tied.
// By keyboard (Ranker.handleKey) and by drag. Used by the labeler page and the playground.
"use strict";

const LETTERS = "ABCDEFGHIJKLMNOP";

class Ranker {
  // root: the element holding #tiers, #flagged-row, #pool, #newtier (templates/_ranker.html).
  // samples: [{id, index, version, html}] (html is sanitised by the server).
  // onUse(sample): "edit as demonstration" for a sample.
  constructor(root, samples, onUse) {
    this.root = root;
    this.samples = new Map(samples.map((s) => [s.id, s]));
    this.tiers = [];
    this.flagged = [];
    this.pool = samples.map((s) => s.id);
    this.focusId = this.pool[0] || null;
    this.onUse = onUse;
    this.cards = new Map();
    const template = document.getElementById("card-template");
    for (const s of samples) {
      const card = template.content.firstElementChild.cloneNode(true);
      card.dataset.id = s.id;
      card.querySelector(".letter").textContent = LETTERS[s.index] || String(s.index);
      card.querySelector(".meta").textContent = s.version ? `${s.version}` : "";
      card.querySelector(".md").innerHTML = s.html;
      card.setAttribute("aria-label", `sample ${LETTERS[s.index] || s.index}`);
      card.addEventListener("focus", () => { this.focusId = s.id; });
      card.addEventListener("dragstart", (e) => {
        e.dataTransfer.setData("text/plain", s.id);
        e.dataTransfer.effectAllowed = "move";
      });
      card.querySelector(".flag").addEventListener("click", () => { this.toggleFlag(s.id); });
      card.querySelector(".use").addEventListener("click", () => { this.onUse(s); });
      this.cards.set(s.id, card);
    }
    if (!root.dataset.wired) {  // one set of drop listeners per board element
      root.dataset.wired = "1";
      root.addEventListener("dragover", (e) => {
        if (e.target.closest("[data-tier]")) e.preventDefault();
      });
      root.addEventListener("drop", (e) => {
        const zone = e.target.closest("[data-tier]");
        const id = e.dataTransfer.getData("text/plain");
        if (!zone || !root.ranker || !root.ranker.samples.has(id)) return;
        e.preventDefault();
        root.ranker.dropOn(id, zone.dataset.tier);
      });
    }
    root.ranker = this;
    this.render();
  }

  // ---- the model ------------------------------------------------------------------------

  where(id) {
    const i = this.tiers.findIndex((t) => t.includes(id));
    if (i >= 0) return {kind: "tier", i};
    return {kind: this.flagged.includes(id) ? "flagged" : "pool"};
  }

  // Take id out of where it is; returns true if that emptied (and removed) its tier.
  take(id) {
    const w = this.where(id);
    if (w.kind === "tier") {
      this.tiers[w.i] = this.tiers[w.i].filter((x) => x !== id);
      if (!this.tiers[w.i].length) { this.tiers.splice(w.i, 1); return true; }
    } else if (w.kind === "flagged") {
      this.flagged = this.flagged.filter((x) => x !== id);
    } else {
      this.pool = this.pool.filter((x) => x !== id);
    }
    return false;
  }

  // Put id in tier n (0-based, as shown before the move); n past the last makes a new tier.
  moveToTier(id, n) {
    const w = this.where(id);
    if (w.kind === "tier" && w.i === n) return;
    const emptied = this.take(id);
    if (emptied && w.i < n) n -= 1;
    if (n >= this.tiers.length) this.tiers.push([id]);
    else this.tiers[n].push(id);
    this.render();
  }

  newTierBelow(id) {
    const w = this.where(id);
    const emptied = this.take(id);
    if (w.kind === "tier") this.tiers.splice(emptied ? w.i : w.i + 1, 0, [id]);
    else this.tiers.push([id]);
    this.render();
  }

  mergeUp(id) {
    const w = this.where(id);
    if (w.kind !== "tier" || w.i === 0) return false;
    this.tiers[w.i - 1] = this.tiers[w.i - 1].concat(this.tiers[w.i]);
    this.tiers.splice(w.i, 1);
    this.render();
    return true;
  }

  unrank(id) {
    this.take(id);
    this.pool.push(id);
    this.pool.sort((a, b) => this.samples.get(a).index - this.samples.get(b).index);
    this.render();
  }

  toggleFlag(id) {
    if (this.where(id).kind === "flagged") { this.unrank(id); return; }
    this.take(id);
    this.flagged.push(id);
    this.render();
  }

  dropOn(id, zone) {
    if (zone === "new") this.moveToTier(id, this.tiers.length);
    else if (zone === "pool") this.unrank(id);
    else if (zone === "flagged") this.toggleFlag(id);
    else this.moveToTier(id, Number(zone));
  }

  order() { return [...this.tiers.flat(), ...this.flagged, ...this.pool]; }

  result() {
    return {
      tiers: this.tiers.map((t) => t.slice()),
      flagged: this.flagged.slice(),
      complete: this.pool.length === 0,
    };
  }

  // ---- the view ---------------------------------------------------------------------------

  render() {
    const hadFocus = this.root.contains(document.activeElement);
    const tiersEl = this.root.querySelector("#tiers");
    tiersEl.replaceChildren();
    this.tiers.forEach((tier, i) => {
      const section = document.createElement("section");
      section.className = "tier";
      section.dataset.tier = String(i);
      const h = document.createElement("h3");
      h.textContent = `Tier ${i + 1}${i === 0 ? " · best" : ""}${tier.length > 1 ? " · tied" : ""}`;
      const cards = document.createElement("div");
      cards.className = "cards";
      for (const id of tier) cards.append(this.cards.get(id));
      section.append(h, cards);
      tiersEl.append(section);
    });
    const flaggedRow = this.root.querySelector("#flagged-row");
    flaggedRow.hidden = !this.flagged.length;
    flaggedRow.querySelector(".cards").replaceChildren(...this.flagged.map((id) => this.cards.get(id)));
    for (const [id, card] of this.cards) card.classList.toggle("is-flagged", this.flagged.includes(id));
    const pool = this.root.querySelector("#pool");
    pool.hidden = !this.pool.length;
    pool.querySelector(".cards").replaceChildren(...this.pool.map((id) => this.cards.get(id)));
    if (hadFocus || document.activeElement === document.body) this.focus(this.focusId);
  }

  focus(id) {
    if (!id || !this.cards.has(id)) return;
    this.focusId = id;
    this.cards.get(id).focus({preventScroll: false});
  }

  step(delta) {
    const order = this.order();
    const at = Math.max(0, order.indexOf(this.focusId));
    this.focus(order[(at + delta + order.length) % order.length]);
  }

  // Page keys the board owns; true if the key was handled (the caller prevents its default).
  handleKey(e) {
    const id = this.focusId;
    const k = e.key;
    if (k === "ArrowDown" || k === "j") { this.step(1); return true; }
    if (k === "ArrowUp" || k === "k") { this.step(-1); return true; }
    if (!id) return false;
    if (/^[1-9]$/.test(k)) {
      this.moveToTier(id, Math.min(Number(k) - 1, this.tiers.length));
      if (this.pool.length) this.focus(this.pool[0]);  // on to the next unranked sample
      else this.focus(id);
      return true;
    }
    if (k === "n") { this.newTierBelow(id); return true; }
    if (k === "m") { if (!this.mergeUp(id)) IL.toast("already in the best tier"); return true; }
    if (k === "0" || k === "u") { this.unrank(id); return true; }
    if (k === "f") { this.toggleFlag(id); return true; }
    if (k === "e") { this.onUse(this.samples.get(id)); return true; }
    return false;
  }
}
