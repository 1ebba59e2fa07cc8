// MathJax 3 configuration for the Markdown pages (pymdownx.arithmatex, generic
// mode: \( \) and \[ \] inside elements of class "arithmatex") and for the
// tutorials (notebook Markdown cells render to class-less paragraphs inside
// "jp-RenderedMarkdown", with $ and $$ delimiters).
// Only MathJax's default ignore classes are ignored: an ignore pattern that
// matches every class, the empty one included, would also skip the notebooks'
// class-less paragraphs. Code (pre, code) is never processed.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: "tex2jax_ignore|mathjax_ignore",
    processHtmlClass: "arithmatex|jp-RenderedMarkdown|tex2jax_process|mathjax_process"
  }
};

