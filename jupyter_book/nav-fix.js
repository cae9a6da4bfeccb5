// The sidebar toggle of sphinx-book-theme 1.3 with pydata-sphinx-theme 0.17: both themes render a
// button of class "primary-toggle" and pydata-sphinx-theme listens on the first one only (a hidden
// header button; pydata/pydata-sphinx-theme#2451), so the visible one did nothing: on a phone the
// other lectures could not be reached, on a desktop the sidebar never collapsed. Every other
// primary toggle now clicks the first one, which opens the navigation drawer on a narrow screen
// and collapses the sidebar on a wide one. Remove when the themes agree on one button.
document.addEventListener("DOMContentLoaded", function () {
  var toggles = document.querySelectorAll(".primary-toggle");
  if (toggles.length < 2) { return; }
  var first = toggles[0];
  Array.prototype.slice.call(toggles, 1).forEach(function (button) {
    button.addEventListener("click", function (event) {
      event.preventDefault();
      event.stopImmediatePropagation();
      first.click();
    }, true);
  });
});
