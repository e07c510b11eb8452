/* Warmstart: the little JavaScript the pages need. No framework, nothing from a CDN.
 *
 * 1. Times. The server renders <time datetime="ISO"> in UTC; here they are shown in the
 *    viewer's time zone: data-format="time" (HH:MM:SS), "relative" ("3 min ago", absolute
 *    time in the tooltip), "age" ("3 min"), default a local date and time. SVG <text
 *    data-datetime> (chart axes) gets "hm" (HH:MM). Relative times are refreshed every 15 s.
 * 2. Versioned polling. An element with data-poll-versions="<selector>" sends, with each htmx
 *    request, the versions of the pieces inside that selector (prebuilds/dashboard.py explains
 *    the protocol): layout = data-layout of the table, known = every data-version, in order.
 */
(function () {
  "use strict";

  var pad = function (n) { return String(n).padStart(2, "0"); };

  function clock(date, seconds) {
    var text = pad(date.getHours()) + ":" + pad(date.getMinutes());
    return seconds ? text + ":" + pad(date.getSeconds()) : text;
  }

  function stamp(date) {
    return date.getFullYear() + "-" + pad(date.getMonth() + 1) + "-" + pad(date.getDate()) +
      " " + clock(date, true);
  }

  function span(seconds) {
    seconds = Math.max(0, Math.round(seconds));
    if (seconds < 60) return seconds + " s";
    if (seconds < 3600) return Math.floor(seconds / 60) + " min";
    if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + pad(Math.floor(seconds % 3600 / 60)) + " min";
    return Math.floor(seconds / 86400) + " d " + Math.floor(seconds % 86400 / 3600) + " h";
  }

  function relative(date) {
    var seconds = (Date.now() - date.getTime()) / 1000;
    if (seconds < -5) return "in " + span(-seconds);
    if (seconds < 5) return "just now";
    return span(seconds) + " ago";
  }

  var zone = (Intl.DateTimeFormat().resolvedOptions().timeZone || "local time");

  function localize(root) {
    var nodes = (root || document).querySelectorAll("time[datetime], text[data-datetime]");
    nodes.forEach(function (node) {
      var iso = node.getAttribute("datetime") || node.getAttribute("data-datetime");
      var date = new Date(iso);
      if (isNaN(date.getTime())) return;
      var format = node.getAttribute("data-format");
      if (format === "time") node.textContent = clock(date, true);
      else if (format === "hm") node.textContent = clock(date, false);
      else if (format === "relative") node.textContent = relative(date);
      else if (format === "age") node.textContent = span((Date.now() - date.getTime()) / 1000);
      else node.textContent = stamp(date);
      if (node.tagName.toLowerCase() === "time") node.title = stamp(date) + " (" + zone + ")";
    });
  }

  function refreshRelative() {
    document.querySelectorAll('time[data-format="relative"], time[data-format="age"]')
      .forEach(function (node) { localize(node.parentNode); });
  }

  document.addEventListener("DOMContentLoaded", function () { localize(document); });
  // htmx:load fires for every piece of content htmx inserts, out-of-band swaps included.
  document.addEventListener("htmx:load", function (event) { localize(event.target); });
  setInterval(refreshRelative, 15000);

  document.addEventListener("htmx:configRequest", function (event) {
    var selector = event.detail.elt.getAttribute && event.detail.elt.getAttribute("data-poll-versions");
    if (!selector) return;
    var scope = document.querySelector(selector);
    if (!scope) return;
    var layout = scope.querySelector("[data-layout]");
    var versions = [];
    scope.querySelectorAll("[data-version]").forEach(function (node) {
      versions.push(node.getAttribute("data-version"));
    });
    event.detail.parameters.layout = layout ? layout.getAttribute("data-layout") : "";
    event.detail.parameters.known = versions.join(".");
  });
})();
