//! The web chat page's files (`web/` in the source tree), built into the binary and served by
//! the WebSocket listeners ([`super::http`]).

/// Path, content type and contents of every file served.
const ASSETS: &[(&str, &str, &[u8])] = &[];

/// The file served at `path` (`/` is `/index.html`): its content type and bytes.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    let path = if path == "/" { "/index.html" } else { path };
    ASSETS.iter().find(|(p, _, _)| *p == path).map(|(_, t, b)| (*t, *b))
}
