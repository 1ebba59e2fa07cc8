window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"], ["$", "$"]],
    displayMath: [["\\[", "\\]"], ["$$", "$$"]],
    processEscapes: true,
    processEnvironments: true
  },
  // arithmatex output on Markdown pages; the Markdown cells of the tutorials
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex|jp-RenderedMarkdown" }
};
