// Loaded after require.js and before the widget manager (embed-amd.js), see _config.yml.
// The widget manager finds its fonts and styles relative to the RequireJS address of its own
// module "@jupyter-widgets/html-manager/dist/libembed-amd", which by default is resolved against
// the page (lectures/@jupyter-widgets/...). Point it at the copy served from vendor/ instead,
// wherever this site is hosted and however deep the page is.
(function () {
  var here = document.currentScript.src.split("?")[0];
  var vendor = here.slice(0, here.lastIndexOf("/") + 1);
  require.config({ paths: { "@jupyter-widgets/html-manager/dist": vendor + "html-manager" } });
})();

// The widget manager typesets widget labels with MathJax 2's API (MathJax.Hub.Queue); the site
// runs MathJax 3. Once MathJax 3 has loaded (it is a deferred script, so before
// DOMContentLoaded; the widgets render later, on "load"), give it that one call.
document.addEventListener("DOMContentLoaded", function () {
  var mj = window.MathJax;
  if (!mj || !mj.version || mj.Hub) return;
  mj.Hub = {
    Queue: function () {
      for (var i = 0; i < arguments.length; i++) {
        var job = arguments[i];
        if (Array.isArray(job) && job[0] === "Typeset" && job[2]) {
          (function (element) {
            mj.startup.promise.then(function () { return mj.typesetPromise([element]); });
          })(job[2]);
        }
      }
    },
  };
});
