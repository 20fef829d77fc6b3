//! The web side of the HTTP server: the page, the API beyond the basics, auth, the live feed.
//! `app` assembles the whole router (the basics stay in `http::router`).
use std::sync::Arc;

use axum::{
    http::{header, StatusCode},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, post},
    Router,
};

use super::{api, auth, live, page};
use crate::shared::Shared;

/// What the web handlers share.
pub struct Web {
    pub shared: Arc<Shared>,
    /// Set when a token is configured: every non-public path then needs it.
    pub auth: Option<auth::Auth>,
    pub live: Arc<live::LiveHub>,
    /// Rollup width of the local store; None when the store is disabled.
    pub window_ns: Option<u64>,
}

/// The OpenAPI document, embedded at build time.
pub const OPENAPI: &str = include_str!("openapi.json");

async fn openapi() -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        OPENAPI,
    )
        .into_response()
}

/// Every route of the server, (method, path): the OpenAPI test checks each is documented.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/"),
    ("get", "/assets/{name}"),
    ("get", "/metrics"),
    ("get", "/api/v1/links"),
    ("get", "/api/v1/events"),
    ("get", "/api/v1/series"),
    ("get", "/api/v1/series.csv"),
    ("get", "/api/v1/live"),
    ("get", "/api/v1/openapi.json"),
    ("post", "/api/v1/login"),
    ("post", "/api/v1/logout"),
];

/// The whole application: `basics` (links, events, metrics) plus the page and the web API,
/// behind the auth middleware.
pub fn app(basics: Router<Arc<Shared>>, web: Arc<Web>) -> Router {
    let extra = Router::new()
        .route("/", get(page::index))
        .route("/assets/{name}", get(page::asset))
        .route("/api/v1/links", get(api::links))
        .route("/api/v1/series", get(api::series))
        .route("/api/v1/series.csv", get(api::series_csv))
        .route("/api/v1/live", get(live::sse))
        .route("/api/v1/openapi.json", get(openapi))
        .route("/api/v1/login", post(auth::login))
        .route("/api/v1/logout", post(auth::logout))
        .with_state(Arc::clone(&web));
    basics
        .with_state(Arc::clone(&web.shared))
        .merge(extra)
        .layer(middleware::from_fn_with_state(web, auth::require))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_route_is_documented_and_nothing_else() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        assert!(doc["openapi"].as_str().is_some_and(|v| v.starts_with("3.")));
        let paths = doc["paths"].as_object().expect("paths");
        for (method, path) in ROUTES {
            assert!(
                paths.get(*path).and_then(|p| p.get(*method)).is_some(),
                "{method} {path} is served but not in openapi.json"
            );
        }
        for (path, ops) in paths {
            for method in ops.as_object().expect("operations").keys() {
                assert!(
                    ROUTES.contains(&(method.as_str(), path.as_str())),
                    "openapi.json documents {method} {path}, which is not served"
                );
            }
        }
    }

    #[test]
    fn the_document_names_the_schemas_it_uses() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json parses");
        let text = OPENAPI;
        let mut at = 0;
        while let Some(i) = text[at..].find("#/components/schemas/") {
            let start = at + i + "#/components/schemas/".len();
            let end = start + text[start..].find('"').expect("closing quote");
            let name = &text[start..end];
            assert!(
                doc["components"]["schemas"].get(name).is_some(),
                "schema {name} is referenced but not defined"
            );
            at = end;
        }
    }
}
