"""Static files of the web dashboard (index.html, app.js, app.css, vendored Chart.js), served by streams.api."""
