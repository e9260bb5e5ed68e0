// The deployment page's completion box: suggestions as you type. Without this file the
// box is a plain form (the page renders the completion of ?prefix=).
(function () {
  "use strict";

  // Wait this long after the last keystroke before asking: one request per pause, not
  // one per character.
  var DEBOUNCE_MS = 150;

  function sessionId() {
    // One id per page view: the replica keeps this session's cache between calls, so
    // each call only computes the characters typed since the last one.
    if (window.crypto && window.crypto.randomUUID) { return "page-" + window.crypto.randomUUID(); }
    return "page-" + Date.now().toString(36) + Math.random().toString(36).slice(2);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var form = document.getElementById("complete-form");
    if (!form) { return; }
    var prefix = document.getElementById("complete-prefix");
    var context = document.getElementById("complete-context");
    var typed = document.getElementById("complete-typed");
    var suggestion = document.getElementById("complete-suggestion");
    var meta = document.getElementById("complete-meta");
    var error = document.getElementById("complete-error");
    var token = form.querySelector("input[name=csrfmiddlewaretoken]").value;
    var session = sessionId();
    var timer = null;
    var sent = 0;

    function show(text, detail) {
      typed.textContent = prefix.value;
      suggestion.textContent = text;
      meta.textContent = detail;
    }

    function ask() {
      if (!prefix.value.trim()) { show("", ""); error.hidden = true; return; }
      var asked = ++sent;
      var body = new URLSearchParams();
      body.set("prefix", prefix.value);
      body.set("context", context.value);
      body.set("session", session);
      fetch(form.getAttribute("data-url"), {
        method: "POST",
        credentials: "same-origin",
        headers: { "X-CSRFToken": token, "X-Requested-With": "XMLHttpRequest" },
        body: body
      }).then(function (response) {
        return response.json().then(function (data) { return { ok: response.ok, data: data }; });
      }).then(function (reply) {
        if (asked !== sent) { return; }  // typed on since: the newer request's answer counts
        if (!reply.ok) {
          error.textContent = reply.data.error ? reply.data.error.message : "The request failed.";
          error.hidden = false;
          show("", "");
          return;
        }
        error.hidden = true;
        var first = reply.data.completions[0];
        show(first ? first.text : "",
             reply.data.latency_ms.toFixed(1) + " ms · " + reply.data.cached_tokens +
             " cached tokens");
      }).catch(function () {
        error.textContent = "The workbench did not answer.";
        error.hidden = false;
      });
    }

    function later() {
      window.clearTimeout(timer);
      timer = window.setTimeout(ask, DEBOUNCE_MS);
    }

    prefix.addEventListener("input", later);
    context.addEventListener("input", later);
    // Tab takes the suggestion (and asks for the next one); Enter never submits the page.
    prefix.addEventListener("keydown", function (event) {
      if (event.key === "Tab" && suggestion.textContent) {
        event.preventDefault();
        prefix.value += suggestion.textContent;
        show("", "");
        ask();
      } else if (event.key === "Enter") {
        event.preventDefault();
        ask();
      }
    });
    form.addEventListener("submit", function (event) { event.preventDefault(); ask(); });
  });
})();
