// gridgate: live pages. A page whose <body> has data-live="URL" listens to
// that event stream (server-sent events) and, on each update, fetches the
// page again and swaps its <main>, keeping open <details> open. Without
// JavaScript the pages work the same, only without updating themselves.
(function () {
  "use strict";
  var url = document.body && document.body.getAttribute("data-live");
  if (!url || !window.EventSource) { return; }
  var busy = false, again = false;
  function refresh() {
    if (busy) { again = true; return; }
    busy = true;
    fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : null; })
      .then(function (text) {
        if (text === null) { return; }
        var doc = new DOMParser().parseFromString(text, "text/html");
        var fresh = doc.getElementById("live"), old = document.getElementById("live");
        if (!fresh || !old) { return; }
        var open = {};
        old.querySelectorAll("details[open] summary").forEach(function (s) { open[s.textContent] = true; });
        fresh.querySelectorAll("details summary").forEach(function (s) {
          if (open[s.textContent]) { s.parentNode.setAttribute("open", ""); }
        });
        old.replaceWith(fresh);
        var live = doc.body.getAttribute("data-live");
        if (!live) { source.close(); document.body.removeAttribute("data-live"); }
      })
      .catch(function () {})
      .then(function () { busy = false; if (again) { again = false; refresh(); } });
  }
  var source = new EventSource(url);
  source.addEventListener("update", refresh);
  source.addEventListener("done", function () { source.close(); refresh(); });
})();
