//! The web console at `/ui/`: its HTML, CSS and ES modules, compiled into
//! the binary from `ui/`, served without a token (they hold no data: the
//! console reads everything through the API after sign-in) under a strict
//! Content-Security-Policy.

use axum::extract::Path;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

/// Everything the page may load: its own scripts, styles and API, nothing
/// inline, from nowhere else, in no frame.
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

/// One asset: its name under `/ui/`, its media type, its bytes.
type Asset = (&'static str, &'static str, &'static [u8]);

macro_rules! asset {
    ($name:literal, $mime:literal) => {
        (
            $name,
            $mime,
            include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/ui/", $name)),
        )
    };
}

/// The console's files.
pub const ASSETS: &[Asset] = &[
    asset!("index.html", "text/html; charset=utf-8"),
    asset!("console.css", "text/css; charset=utf-8"),
    asset!("main.js", "text/javascript; charset=utf-8"),
    asset!("api.js", "text/javascript; charset=utf-8"),
    asset!("store.js", "text/javascript; charset=utf-8"),
    asset!("format.js", "text/javascript; charset=utf-8"),
    asset!("dom.js", "text/javascript; charset=utf-8"),
    asset!("views.js", "text/javascript; charset=utf-8"),
    asset!("migrations.js", "text/javascript; charset=utf-8"),
    asset!("actions.js", "text/javascript; charset=utf-8"),
    asset!("operations.js", "text/javascript; charset=utf-8"),
    asset!("rolling.js", "text/javascript; charset=utf-8"),
];

/// Whether `method path` asks for the console's files, which take no
/// token: reads of exactly its routes and files, nothing else.
pub(super) fn exempt(method: &axum::http::Method, path: &str) -> bool {
    use axum::http::Method;
    let reads = *method == Method::GET || *method == Method::HEAD;
    let file = path
        .strip_prefix("/ui/")
        .is_some_and(|f| ASSETS.iter().any(|a| a.0 == f));
    reads && (file || matches!(path, "/" | "/ui" | "/ui/" | "/favicon.ico"))
}

/// `/ui`: the console is at `/ui/`.
pub(super) async fn to_console() -> Redirect {
    Redirect::permanent("/ui/")
}

/// `GET /ui/`: the console's page.
pub(super) async fn index() -> Response {
    serve("index.html")
}

/// `GET /ui/{file}`: one of its assets.
pub(super) async fn asset(Path(file): Path<String>) -> Response {
    serve(&file)
}

fn serve(file: &str) -> Response {
    let Some((_, mime, body)) = ASSETS.iter().find(|(name, _, _)| *name == file) else {
        return (StatusCode::NOT_FOUND, "no such file in the console").into_response();
    };
    let mut resp = (*body).into_response();
    let h = resp.headers_mut();
    let set = |h: &mut axum::http::HeaderMap, k, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(h, header::CONTENT_TYPE, mime);
    set(h, header::CONTENT_SECURITY_POLICY, CSP);
    set(h, header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(h, header::REFERRER_POLICY, "no-referrer");
    set(h, header::X_FRAME_OPTIONS, "DENY");
    // A new agent's console is loaded whole, never a mix of two versions.
    set(h, header::CACHE_CONTROL, "no-cache");
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_reads_of_the_consoles_own_files_take_no_token() {
        use axum::http::Method;
        for p in ["/", "/ui", "/ui/", "/ui/main.js", "/favicon.ico"] {
            assert!(exempt(&Method::GET, p), "{p}");
            assert!(!exempt(&Method::POST, p), "{p}");
        }
        for p in [
            "/uix",
            "/ui/../v1/node",
            "/ui/..%2Fv1%2Fnode",
            "/ui/x/main.js",
            "/v1/node",
            "/ui/nope.js",
        ] {
            assert!(!exempt(&Method::GET, p), "{p}");
        }
    }

    #[test]
    fn every_asset_the_page_and_its_modules_name_is_served() {
        let text = |name: &str| {
            let (_, _, b) = ASSETS.iter().find(|a| a.0 == name).expect(name);
            std::str::from_utf8(b).expect("utf-8").to_string()
        };
        let mut named = vec![];
        let html = text("index.html");
        let after = |marker: &str| html.split(marker).skip(1).collect::<Vec<_>>();
        for part in after("href=\"").into_iter().chain(after("src=\"")) {
            named.push(part.split('"').next().unwrap().to_string());
        }
        for (name, _, _) in ASSETS.iter().filter(|a| a.0.ends_with(".js")) {
            for part in text(name).split("\"./").skip(1) {
                named.push(part.split('"').next().unwrap().to_string());
            }
        }
        assert!(named.len() >= ASSETS.len() - 1, "{named:?}");
        for n in named.iter().filter(|n| !n.starts_with('#')) {
            assert!(
                ASSETS.iter().any(|a| a.0 == n),
                "{n} is named but not served"
            );
        }
        // No inline script or style: the CSP would refuse them.
        assert!(
            !html.contains("<script>") && !html.contains(" style=") && !html.contains("onclick")
        );
    }
}
