//! The field engineers' page: one HTML shell and its script and style, embedded in the binary
//! (no CDN, nothing fetched from elsewhere). The graphs are drawn on canvas by the page's own
//! script (assets/app.js), so no charting library ships.
use axum::{
    extract::Path,
    http::{header, StatusCode},
    response::{IntoResponse, Response},
};

const INDEX: &str = include_str!("assets/index.html");
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/app.js"),
    ),
    (
        "style.css",
        "text/css; charset=utf-8",
        include_str!("assets/style.css"),
    ),
];

/// Assets change only with the binary; the version in their URL busts caches on upgrade.
const CACHE: &str = "no-cache";

pub async fn index() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, CACHE),
            // Everything comes from this server: nothing else may load or run.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; frame-ancestors 'none'",
            ),
        ],
        INDEX,
    )
        .into_response()
}

pub async fn asset(Path(name): Path<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, ctype, body)) => (
            [
                (header::CONTENT_TYPE, *ctype),
                (header::CACHE_CONTROL, CACHE),
            ],
            *body,
        )
            .into_response(),
        None => super::api::error(
            StatusCode::NOT_FOUND,
            format!("no asset {name:?}: the page's assets are app.js and style.css"),
        ),
    }
}
