// Colony's dashboard works without this file: it only keeps a page current.
// A page whose <main> says data-live="events" (a task) follows the audit
// trail of that task over Server-Sent Events; data-live="poll" pages (the
// overview, lists) are fetched again every few seconds. Either way the new
// <main> comes from the server, already escaped, and replaces the old one;
// a refresh waits while someone is typing into a form, or has typed into
// one and not sent it.
(function () {
  "use strict";
  var main = document.querySelector("main[data-live]");
  if (!main) return;

  var busy = false;
  function typing() {
    var el = document.activeElement;
    if (el && main.contains(el) && /^(INPUT|TEXTAREA|SELECT)$/.test(el.tagName)) return true;
    // A note typed and left unsent (the focus moved on) was wiped by the
    // next refresh.
    var fields = main.querySelectorAll("textarea, input[type=text]");
    for (var i = 0; i < fields.length; i++) {
      if (fields[i].value !== fields[i].defaultValue) return true;
    }
    return false;
  }
  function refresh() {
    if (busy) return;
    if (typing()) { setTimeout(refresh, 2000); return; }
    busy = true;
    fetch(location.href, { headers: { Accept: "text/html" }, credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (html) {
        if (!html) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.querySelector("main[data-live]");
        if (!fresh) return;
        main.replaceChildren.apply(main, Array.prototype.slice.call(fresh.childNodes));
        main.dataset.refreshed = String(Date.now());
      })
      .catch(function () {})
      .then(function () { busy = false; });
  }

  if (main.dataset.live === "events" && window.EventSource) {
    var url = "/api/events?since=" + encodeURIComponent(main.dataset.since || "0");
    if (main.dataset.task) url += "&task=" + encodeURIComponent(main.dataset.task);
    var timer = null;
    new EventSource(url).onmessage = function () {
      if (!timer) timer = setTimeout(function () { timer = null; refresh(); }, 300);
    };
  } else {
    setInterval(function () { if (!document.hidden) refresh(); }, 3000);
  }
})();
