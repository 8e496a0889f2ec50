
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(t && t.tagName ? "cannot load " + t.tagName.toLowerCase() : String(e.message || "error"));
  }, true);
  window.addEventListener("load", function () {
    var imgs = document.images, bad = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (!(imgs[i].complete && imgs[i].naturalWidth > 0)) { bad++; }
    }
    var ok = bad === 0 && errors.length === 0;
    var root = document.documentElement;
    root.setAttribute("data-images", String(imgs.length));
    root.setAttribute("data-status", ok ? "ok" : "error: " + bad + " image(s) not loaded; " + errors.join("; "));
  });
})();
