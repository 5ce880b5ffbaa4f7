// Sample browser filters: show the rows whose data-* attributes match every chosen value.
// The address may preselect them: report.html#attack=figstep&verdict=refusal
(function () {
  "use strict";
  var browser = document.getElementById("browser");
  if (!browser) {
    return;
  }
  var selects = Array.prototype.slice.call(browser.querySelectorAll("select[data-filter]"));
  var rows = Array.prototype.slice.call(browser.querySelectorAll("tbody tr"));
  var count = document.getElementById("browser-count");
  function apply() {
    var shown = 0;
    rows.forEach(function (row) {
      var match = selects.every(function (s) {
        return !s.value || row.getAttribute("data-" + s.getAttribute("data-filter")) === s.value;
      });
      row.hidden = !match;
      shown += match ? 1 : 0;
    });
    count.textContent = shown + " of " + rows.length + " rows";
    browser.setAttribute("data-shown", String(shown));
  }
  var wanted = new URLSearchParams(window.location.hash.slice(1));
  selects.forEach(function (s) {
    var value = wanted.get(s.getAttribute("data-filter"));
    if (value !== null) {
      s.value = value;
    }
    s.addEventListener("change", apply);
  });
  apply();
})();
