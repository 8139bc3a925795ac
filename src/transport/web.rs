//! The web chat page's files (`web/` in the source tree), built into the binary and served by
//! the WebSocket listeners ([`super::http`]). The page and its client module are documented in
//! docs/CLIENTS.md.

/// Path, content type and contents of every file served.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("/index.html", "text/html; charset=utf-8", include_bytes!("../../web/index.html")),
    ("/app.js", "text/javascript; charset=utf-8", include_bytes!("../../web/app.js")),
    ("/tim.js", "text/javascript; charset=utf-8", include_bytes!("../../web/tim.js")),
    ("/style.css", "text/css; charset=utf-8", include_bytes!("../../web/style.css")),
    ("/favicon.svg", "image/svg+xml", include_bytes!("../../web/favicon.svg")),
];

/// The file served at `path` (`/` is `/index.html`): its content type and bytes.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS.iter().find(|(p, _, _)| *p == path).map(|(_, t, b)| (*t, *b))
}
