// Small progressive enhancements. Every page works without this file.
(function () {
  "use strict";

  // <form data-confirm="..."> asks before submitting.
  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
      return;
    }
    // A button with data-busy-label shows progress and is not clicked twice.
    var button = form.querySelector("button[data-busy-label]");
    if (button) {
      button.textContent = button.getAttribute("data-busy-label");
      window.setTimeout(function () { button.disabled = true; }, 0);
    }
  });

  // <button data-copy="#selector"> copies the text of the element it names.
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("button[data-copy]").forEach(function (button) {
      if (!navigator.clipboard) { return; }
      button.hidden = false;
      button.addEventListener("click", function () {
        var source = document.querySelector(button.getAttribute("data-copy"));
        navigator.clipboard.writeText(source.textContent.trim()).then(function () {
          button.textContent = "Copied";
        });
      });
    });
  });

  // The tenant switcher's search finds tenants as you type: the server renders the
  // matching entries (the same list the search page shows, ?partial=1).
  document.addEventListener("DOMContentLoaded", function () {
    var form = document.querySelector("form[data-switcher-search]");
    if (!form) { return; }
    var results = form.parentNode.querySelector("[data-switcher-results]");
    var input = form.querySelector("input[type=search]");
    var timer = null;
    var asked = 0;
    input.addEventListener("input", function () {
      window.clearTimeout(timer);
      timer = window.setTimeout(function () {
        var ticket = ++asked;
        var params = new URLSearchParams(new FormData(form));
        params.set("partial", "1");
        fetch(form.getAttribute("action") + "?" + params.toString(), {
          credentials: "same-origin",
          headers: { "X-Requested-With": "XMLHttpRequest" }
        }).then(function (response) {
          return response.ok ? response.text() : null;
        }).then(function (html) {
          if (html !== null && ticket === asked) { results.innerHTML = html; }
        });
      }, 150);
    });
    form.closest("details").addEventListener("toggle", function (event) {
      if (event.target.open) { input.focus(); }
    });
  });

  // Close the tenant switcher when clicking elsewhere.
  document.addEventListener("click", function (event) {
    document.querySelectorAll("details.switcher[open]").forEach(function (details) {
      if (!details.contains(event.target)) { details.removeAttribute("open"); }
    });
  });
})();

// Live regions: <div id="..." data-live-url="?partial=1" data-live-active="true"> is
// replaced by a fresh copy from the server every data-live-every ms for as long as the
// copy says it is still active (runs queued or running). Ticked checkboxes survive.
(function () {
  "use strict";

  function schedule(id, delay) {
    window.setTimeout(function () { refresh(id); }, delay);
  }

  function refresh(id) {
    var region = document.getElementById(id);
    if (!region || region.getAttribute("data-live-active") !== "true") { return; }
    var every = parseInt(region.getAttribute("data-live-every"), 10) || 2000;
    if (document.hidden) { schedule(id, every); return; }
    fetch(region.getAttribute("data-live-url"), {
      credentials: "same-origin",
      headers: { "X-Requested-With": "XMLHttpRequest" }
    }).then(function (response) {
      if (!response.ok) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (html) {
      var current = document.getElementById(id);
      if (!current) { return; }
      var template = document.createElement("template");
      template.innerHTML = html;
      var fresh = template.content.getElementById(id);
      if (!fresh) { return; }
      var ticked = {};
      current.querySelectorAll("input[type=checkbox]:checked").forEach(function (box) {
        ticked[box.name + "=" + box.value] = true;
      });
      fresh.querySelectorAll("input[type=checkbox]").forEach(function (box) {
        if (ticked[box.name + "=" + box.value]) { box.checked = true; }
      });
      current.replaceWith(fresh);
      schedule(id, every);
    }).catch(function () {
      schedule(id, every * 5);  // the server is busy or restarting: back off, keep trying
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live-url][data-live-active=true]").forEach(function (region) {
      if (region.id) {
        schedule(region.id, parseInt(region.getAttribute("data-live-every"), 10) || 2000);
      }
    });
  });
})();

// The launch form's LoRA fields show only while an adapter base model is chosen:
// <select data-adapter-bases="id ..."> and a [data-lora-fields] block in the same form; a
// block with data-for-bases="id ..." shows only while one of its own bases is chosen.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("select[data-adapter-bases]").forEach(function (select) {
      var block = select.form && select.form.querySelector("[data-lora-fields]");
      if (!block) { return; }
      var adapters = select.getAttribute("data-adapter-bases").split(" ");
      var only = select.form.querySelectorAll("[data-for-bases]");
      function sync() {
        block.hidden = adapters.indexOf(select.value) < 0;
        only.forEach(function (el) {
          el.hidden = el.getAttribute("data-for-bases").split(" ").indexOf(select.value) < 0;
        });
      }
      select.addEventListener("change", sync);
      sync();
    });
  });
})();
