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
