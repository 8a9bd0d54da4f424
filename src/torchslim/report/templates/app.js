/* Draws every figure of the page with the inlined plotly.js; the specifications come from report.json. */
(function () {
  "use strict";
  var source = document.getElementById("torchslim-figures");
  var figures = source ? JSON.parse(source.textContent) : [];
  figures.forEach(function (figure) {
    var element = document.getElementById(figure.id);
    if (element) {
      Plotly.newPlot(element, figure.data, figure.layout, figure.config);
    }
  });
})();
