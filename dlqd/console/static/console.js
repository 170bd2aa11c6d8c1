// dlqd console: live refresh, "load more" and confirmations. Hand-written, no
// dependencies; every page works without it.
"use strict";

(function () {
  var REFRESH_MS = 5000;
  var loadedMore = false;

  // A form is "open" while one of its fields has focus or holds what someone typed.
  function busy() {
    if (document.hidden) return true;
    if (document.querySelector("input[type=checkbox][name=id]:checked")) return true;
    var active = document.activeElement;
    if (active && /^(INPUT|SELECT|TEXTAREA|BUTTON)$/.test(active.tagName) && active.closest("[data-live]")) return true;
    var typed = document.querySelectorAll("[data-live] form[method=post] input:not([type=hidden]):not([type=checkbox])");
    for (var i = 0; i < typed.length; i++) if (typed[i].value) return true;
    if (document.querySelector("details[data-opened]")) return true;
    return loadedMore;
  }

  function refresh() {
    var live = document.querySelector("[data-live]");
    if (!live || busy()) return;
    var url = new URL(window.location.href);
    url.searchParams.delete("done");
    fetch(url.toString(), { headers: { "Accept": "text/html" }, credentials: "same-origin" })
      .then(function (response) {
        if (response.redirected || !response.ok) return null;
        return response.text();
      })
      .then(function (html) {
        if (!html || busy()) return;
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.querySelector("[data-live]");
        if (!fresh) return;
        var open = {};
        live.querySelectorAll("details").forEach(function (d, i) { open[i] = d.open; });
        live.innerHTML = fresh.innerHTML;
        live.querySelectorAll("details").forEach(function (d, i) { if (i in open) d.open = open[i]; });
        wire(live);
        document.dispatchEvent(new CustomEvent("dlqd:refreshed"));
      })
      .catch(function () { /* the next round tries again */ });
  }

  function confirmations(root) {
    root.querySelectorAll("[data-confirm]").forEach(function (button) {
      button.addEventListener("click", function (event) {
        if (!window.confirm(button.getAttribute("data-confirm"))) event.preventDefault();
      });
    });
  }

  // "Load more" appends the next page's rows in place (the link still works without this).
  function loadMore(root) {
    root.querySelectorAll("a[data-more]").forEach(function (link) {
      link.addEventListener("click", function (event) {
        event.preventDefault();
        fetch(link.href, { headers: { "Accept": "text/html" }, credentials: "same-origin" })
          .then(function (response) { return response.ok ? response.text() : null; })
          .then(function (html) {
            if (!html) { window.location.href = link.href; return; }
            var doc = new DOMParser().parseFromString(html, "text/html");
            var rows = doc.querySelector("[data-rows]");
            var target = document.querySelector("[data-rows]");
            if (rows && target) {
              while (rows.firstElementChild) target.appendChild(rows.firstElementChild);
            }
            var next = doc.querySelector("a[data-more]");
            if (next) { link.href = next.href; } else { link.parentNode.replaceChild(document.createTextNode("No more rows."), link); }
            loadedMore = true;
          });
      });
    });
  }

  function wire(root) {
    confirmations(root);
    loadMore(root);
    root.querySelectorAll("details").forEach(function (d) {
      d.addEventListener("toggle", function () {
        if (d.closest("form") && d.open) d.setAttribute("data-opened", ""); else d.removeAttribute("data-opened");
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    wire(document);
    document.documentElement.setAttribute("data-js", "on");
    window.setInterval(refresh, REFRESH_MS);
  });
})();
