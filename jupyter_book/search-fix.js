// Search results without raw TeX. Sphinx's search page builds each result's snippet from the page's
// text, where math is still its TeX source (MathJax typesets it later, and only on the page), so a
// snippet read "... the projections \(W^Q\), \(W^K\) ..." and a title "... over
// $[\text{memory};\ \text{segment}]$". texToPlain turns that into "W^Q", "[memory; segment]":
// delimiters dropped, \text{x}-like wrappers unwrapped, Greek letters and common symbols written
// as characters, any other command as its name.
(function () {
  var GREEK = {
    alpha: "α", beta: "β", gamma: "γ", delta: "δ", epsilon: "ε", zeta: "ζ", eta: "η", theta: "θ",
    iota: "ι", kappa: "κ", lambda: "λ", mu: "μ", nu: "ν", xi: "ξ", pi: "π", rho: "ρ", sigma: "σ",
    tau: "τ", upsilon: "υ", phi: "φ", chi: "χ", psi: "ψ", omega: "ω", varpi: "ϖ", vartheta: "ϑ",
    Gamma: "Γ", Delta: "Δ", Theta: "Θ", Lambda: "Λ", Xi: "Ξ", Pi: "Π", Sigma: "Σ", Phi: "Φ",
    Psi: "Ψ", Omega: "Ω", top: "ᵀ", times: "×", cdot: "·", le: "≤", ge: "≥", leq: "≤", geq: "≥",
    to: "→", infty: "∞", approx: "≈", sum: "∑", in: "∈", ell: "ℓ", sim: "~", sqrt: "√", ll: "≪",
    gg: "≫", circ: "∘", log: "log ", exp: "exp ", max: "max ", min: "min ", quad: " ", dots: "…",
    ldots: "…", cdots: "⋯", mid: "|", lvert: "|", rvert: "|", neq: "≠", pm: "±"
  };
  function texToPlain(text) {
    if (!text) { return text; }
    return text
      .replace(/\\[()[\]]|\$\$?/g, "")  // \( \) \[ \] $ $$
      .replace(/\\(?:text|mathrm|mathsf|mathcal|mathbf|mathbb|boldsymbol|operatorname|bar|hat|tilde)\s*\{([^{}]*)\}/g, "$1")
      // the same wrappers on a single letter (\mathcal N), and sizing commands: dropped
      .replace(/\\(?:text|mathrm|mathsf|mathcal|mathbf|mathbb|boldsymbol|operatorname|bar|hat|tilde|left|right|big|Big)(?![A-Za-z])\s*/g, "")
      .replace(/\\([A-Za-z]+)/g, function (whole, name) { return GREEK[name] || name + " "; })
      .replace(/\\[,;:! ]/g, " ")  // TeX spaces
      .replace(/[{}]/g, "");
  }
  window.transformerLabTexToPlain = texToPlain;  // for the browser test

  function patch() {
    if (typeof Search === "undefined" || Search.__texPlain) { return; }
    var toText = Search.htmlToText;
    Search.htmlToText = function (html, anchor) { return texToPlain(toText(html, anchor)); };
    Search.__texPlain = true;
    var results = document.getElementById("search-results");
    if (!results || !window.MutationObserver) { return; }
    // result titles come from the search index, not the page: rewrite them as they are added
    new MutationObserver(function () {
      results.querySelectorAll("li > a").forEach(function (a) {
        if (/[\\$]/.test(a.textContent)) { a.textContent = texToPlain(a.textContent); }
      });
    }).observe(results, { childList: true, subtree: true });
  }
  patch();
  document.addEventListener("DOMContentLoaded", patch);
})();
