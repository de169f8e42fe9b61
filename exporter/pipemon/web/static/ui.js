// pipemon UI: times in the browser's zone and a refresh that keeps the URL (so the filters) and the focus.
// Filters apply with their button or Enter, not on change: arrowing through a select must not reload the page.
// Without JavaScript every page still works: times read in UTC, refresh by reloading.
"use strict";
(function () {
  const fmt = new Intl.DateTimeFormat(undefined, { dateStyle: "medium", timeStyle: "medium" });
  const rel = new Intl.RelativeTimeFormat(undefined, { numeric: "auto" });
  function relative(seconds) {
    const units = [["year", 31536000], ["month", 2592000], ["day", 86400], ["hour", 3600], ["minute", 60]];
    for (const [unit, size] of units) {
      if (Math.abs(seconds) >= size) return rel.format(-Math.round(seconds / size), unit);
    }
    return rel.format(-Math.round(seconds), "second");
  }
  function localTimes(root) {
    const now = Date.now() / 1000;
    for (const el of root.querySelectorAll("time[data-ts]")) {
      const ts = parseFloat(el.dataset.ts);
      const local = fmt.format(new Date(ts * 1000));
      el.title = el.dataset.absolute ? relative(now - ts) : local;
      el.textContent = el.dataset.absolute ? local : relative(now - ts);
    }
  }
  async function refresh() {
    const active = document.activeElement;
    if (active && (active.tagName === "INPUT" || active.tagName === "SELECT")) return; // typing: not now
    try {
      const resp = await fetch(location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } });
      if (!resp.ok || resp.redirected) return;
      const doc = new DOMParser().parseFromString(await resp.text(), "text/html");
      const fresh = doc.getElementById("main");
      if (!fresh) return;
      document.getElementById("main").replaceWith(fresh);
      localTimes(fresh);
      document.body.dataset.refreshed = String(Date.now());
    } catch (err) { /* offline for a moment: the next round tries again */ }
  }
  window.pipemonRefresh = refresh; // for the browser tests, and a console
  document.addEventListener("DOMContentLoaded", () => {
    localTimes(document);
    const every = parseInt(document.body.dataset.refresh || "0", 10);
    if (every > 0) setInterval(refresh, every * 1000);
  });
})();
