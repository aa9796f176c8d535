// Starts Swagger UI on /docs. A file of its own, not an inline <script>: the broker's
// Content-Security-Policy allows scripts from the broker only (docs/security.md).
"use strict";

document.addEventListener("DOMContentLoaded", () => {
  const root = document.getElementById("swagger-ui");
  window.ui = SwaggerUIBundle({
    url: root.dataset.openapiUrl,
    dom_id: "#swagger-ui",
    layout: "BaseLayout",
    presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
    deepLinking: true,
    showExtensions: true,
    showCommonExtensions: true,
    // The default badge is an image from validator.swagger.io: no third-party host on the broker's pages.
    validatorUrl: null,
  });
});
