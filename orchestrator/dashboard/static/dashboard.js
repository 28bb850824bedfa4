/* studyq dashboard: live refresh of a page's [data-refresh] part, without reloading the page.
   Every data-interval seconds the element's fragment URL is fetched from this server and
   swapped in; a failed fetch is shown in the header and retried at the next tick. No
   dependencies, no network beyond this origin. */
"use strict";
(function () {
  var state = document.getElementById("live-state");

  function say(text, bad) {
    if (!state) return;
    state.textContent = text;
    state.className = bad ? "live-state bad" : "live-state";
  }

  function refresh(el) {
    if (el.dataset.busy === "1" || document.hidden) return;
    el.dataset.busy = "1";
    fetch(el.dataset.refresh, { cache: "no-store", credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.text();
      })
      .then(function (html) {
        el.innerHTML = html;
        el.dataset.refreshes = String(Number(el.dataset.refreshes || "0") + 1);
        say("live · updated " + new Date().toLocaleTimeString(), false);
      })
      .catch(function (error) {
        say("not updated (" + error.message + "); retrying", true);
      })
      .then(function () {
        el.dataset.busy = "0";
      });
  }

  document.querySelectorAll("[data-refresh]").forEach(function (el) {
    var seconds = Math.max(1, Number(el.dataset.interval || "3"));
    say("live · every " + seconds + " s", false);
    window.setInterval(function () { refresh(el); }, seconds * 1000);
  });

  /* The outcome select swaps the plotted metric in place. */
  document.querySelectorAll("select[data-live]").forEach(function (select) {
    var target = document.getElementById(select.dataset.live);
    var button = select.form && select.form.querySelector("button.nojs");
    if (button) button.hidden = true;
    select.addEventListener("change", function () {
      var query = "?metric=" + encodeURIComponent(select.value);
      if (target) {
        target.dataset.refresh = select.dataset.base + query;
        refresh(target);
      }
      window.history.replaceState(null, "", window.location.pathname + query);
    });
  });
})();
