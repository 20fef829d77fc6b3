//! HTTP: `GET /api/v1/events` (JSON) and `GET /metrics` (Prometheus text) here; the page, the
//! rest of the API, auth and the live feed in the submodules (`web::app` assembles them).
//! Served by a single-threaded tokio runtime on its own thread, away from the data path.
pub mod api;
pub mod auth;
pub mod live;
pub mod page;
pub mod tls;
pub mod web;

use std::{fmt::Write as _, net::SocketAddr, sync::Arc};

use axum::{
    extract::State,
    http::{header, StatusCode, Uri},
    response::{IntoResponse, Response},
    routing::get,
    Json, Router,
};
use linkpulse_common::DIRS;
use serde_json::json;
use std::sync::atomic::Ordering;

use crate::shared::{LinkState, Shared};

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("cannot listen on {addr} ({source}): another linkpulse or service uses it? set [http] listen to a free address")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// The basic routes; `web::app` adds the page and the rest of the API and gives the state.
pub fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/api/v1/events", get(events))
        .route("/metrics", get(metrics))
        .fallback(not_found)
}

pub async fn bind(addr: SocketAddr) -> Result<tokio::net::TcpListener, HttpError> {
    tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HttpError::Bind { addr, source })
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({
            "error": format!("no such endpoint: {}", uri.path()),
            "hint": "the page is at /; the API (GET /api/v1/links, /api/v1/events, /api/v1/series, /api/v1/live, /metrics) is described by GET /api/v1/openapi.json",
        })),
    )
        .into_response()
}

async fn events(State(s): State<Arc<Shared>>) -> Response {
    Json(json!({ "events": s.events() })).into_response()
}

/// Escapes a Prometheus label value.
fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

async fn metrics(State(s): State<Arc<Shared>>) -> Response {
    let mut o = String::with_capacity(8192);
    let c = &s.counters;
    let links = s.links();
    let counter = |o: &mut String, name: &str, help: &str, v: u64| {
        let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
    };
    counter(
        &mut o,
        "linkpulse_frames_total",
        "Aligned frames published (one per bin).",
        c.frames.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_ring_records_total",
        "Per-CPU bins read from the kernel ring buffer.",
        c.ring_records.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_bins_late_total",
        "Data arriving for a bin already published (carried into the next bin).",
        c.bins_late.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_late_packets_total",
        "Packets carried into a later bin because they arrived late.",
        c.late_packets.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_probe_frame_late_total",
        "Probe samples and sent probes whose bin was already published when lp-ingest got them (carried into the next frame, flagged).",
        c.rtt_late.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_ring_full_total",
        "Bin ends at which the kernel found the ring buffer full (the slot kept counting; the data arrives late, nothing is lost).",
        c.ring_full.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_skipped_bins_total",
        "Bins skipped because the daemon fell behind or the clock jumped.",
        c.skipped_bins.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_malformed_packets_total",
        "GSO packets whose headers could not be read.",
        c.malformed_packets.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_attach_errors_total",
        "Failed attachments to modem interfaces.",
        c.attach_errors.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_attaches_total",
        "Attachments to modem interfaces (hot-plug re-attachments included).",
        c.attaches.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_clock_steps_total",
        "Steps of the real-time clock detected.",
        c.clock_steps.load(Ordering::Relaxed),
    );
    let t = &c.tcp_rtt;
    counter(
        &mut o,
        "linkpulse_tcp_rtt_samples_total",
        "Passive TCP RTT samples (a stored TSval echoed back in a TSecr), all links.",
        t.samples.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_tcp_rtt_tsvals_stored_total",
        "First departures of a TCP timestamp (flow, link, TSval) stored in the kernel's table.",
        t.inserts.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_tcp_rtt_evicted_total",
        "At least this many stored TSvals left the table unmatched (inserts - samples - table size): TSvals never echoed (delayed ACKs) and, if the table is too small, ones that would have matched.",
        t.evicted.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_tcp_rtt_bad_options_total",
        "TCP segments whose option list could not be parsed (no RTT sample).",
        t.bad_options.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_tcp_rtt_insert_errors_total",
        "Stores into the kernel's TSval table that failed (no RTT sample for that TSval).",
        t.insert_errors.load(Ordering::Relaxed),
    );
    let _ = writeln!(o, "# HELP linkpulse_tcp_rtt_table_entries Size of the kernel's TSval table ([tcp_rtt] table_entries).\n# TYPE linkpulse_tcp_rtt_table_entries gauge\nlinkpulse_tcp_rtt_table_entries {}", t.table_entries.load(Ordering::Relaxed));
    let _ = writeln!(o, "# HELP linkpulse_consumer_frames_dropped_total Frames a consumer lost because its queue was full.\n# TYPE linkpulse_consumer_frames_dropped_total counter");
    for (name, dropped) in s
        .fanout_dropped
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        let total: u64 = dropped.iter().map(|d| d.load(Ordering::Relaxed)).sum();
        let _ = writeln!(
            o,
            "linkpulse_consumer_frames_dropped_total{{consumer=\"{}\"}} {total}",
            esc(name)
        );
    }
    let st = &s.store;
    counter(
        &mut o,
        "linkpulse_rollups_written_total",
        "Rollups written to the local store.",
        st.written.load(Ordering::Relaxed),
    );
    counter(&mut o, "linkpulse_rollups_dropped_total", "Rollups dropped because the store was unavailable longer than the in-memory queue holds (ranges in /api/v1/events).", st.dropped.load(Ordering::Relaxed));
    counter(
        &mut o,
        "linkpulse_store_errors_total",
        "Failed writes to the local store.",
        st.errors.load(Ordering::Relaxed),
    );
    let _ = writeln!(o, "# HELP linkpulse_store_up 1 while the local store accepts rollups.\n# TYPE linkpulse_store_up gauge\nlinkpulse_store_up {}", u8::from(st.up.load(Ordering::Relaxed)));
    let _ = writeln!(o, "# HELP linkpulse_rollups_pending Rollups waiting in memory for the store.\n# TYPE linkpulse_rollups_pending gauge\nlinkpulse_rollups_pending {}", st.pending.load(Ordering::Relaxed));
    crate::forward::write_metrics(&mut o, &s);
    let sm = &s.stream;
    let _ = writeln!(o, "# HELP linkpulse_stream_clients Controllers subscribed to the stream.\n# TYPE linkpulse_stream_clients gauge\nlinkpulse_stream_clients {}", sm.clients.load(Ordering::Relaxed));
    counter(
        &mut o,
        "linkpulse_stream_frames_sent_total",
        "Frames sent to stream clients.",
        sm.frames_sent.load(Ordering::Relaxed),
    );
    counter(
        &mut o,
        "linkpulse_stream_frames_dropped_total",
        "Frames a stream client lost because it did not keep up (it sees the gap).",
        sm.frames_dropped.load(Ordering::Relaxed),
    );
    let _ = writeln!(o, "# HELP linkpulse_stream_cpu_wakeup_latency_held 1 while the daemon holds idle CPUs to [stream] cpu_wakeup_latency_us (clients subscribed); 0 with clients means the request is off or was refused (see the log).\n# TYPE linkpulse_stream_cpu_wakeup_latency_held gauge\nlinkpulse_stream_cpu_wakeup_latency_held {}", sm.wakeup_latency_held.load(Ordering::Relaxed));
    live::write_metrics(&mut o, &s.live);
    counter(
        &mut o,
        "linkpulse_stream_bad_requests_total",
        "Stream clients refused for a malformed request.",
        sm.bad_requests.load(Ordering::Relaxed),
    );
    let clock = s.clock();
    let _ = writeln!(o, "# HELP linkpulse_clock_synced 1 if the kernel reports the clock synchronised.\n# TYPE linkpulse_clock_synced gauge\nlinkpulse_clock_synced {}", u8::from(clock.synced));
    let _ = writeln!(o, "# HELP linkpulse_clock_max_error_seconds The kernel's maximum clock error bound.\n# TYPE linkpulse_clock_max_error_seconds gauge\nlinkpulse_clock_max_error_seconds {}", clock.max_error_us as f64 / 1e6);
    let _ = writeln!(o, "# HELP linkpulse_bin_width_seconds Width of a bin.\n# TYPE linkpulse_bin_width_seconds gauge\nlinkpulse_bin_width_seconds {}", s.bin_width_ns as f64 / 1e9);

    let labels = |l: &crate::shared::LinkInfo| {
        format!(
            "router=\"{}\",site=\"{}\",link=\"{}\",interface=\"{}\",operator=\"{}\"",
            esc(&s.router_id),
            esc(&s.site),
            esc(&l.config.label),
            esc(&l.config.interface),
            esc(&l.config.operator)
        )
    };
    let _ = writeln!(o, "# HELP linkpulse_link_up 1 while linkpulse counts on the link's interface (0: missing or attach error).\n# TYPE linkpulse_link_up gauge");
    for l in &links {
        let _ = writeln!(
            o,
            "linkpulse_link_up{{{}}} {}",
            labels(l),
            u8::from(l.state == LinkState::Attached)
        );
    }
    for (metric, help) in [
        (
            "linkpulse_link_packets_total",
            "Wire packets (GSO segments) counted on the link.",
        ),
        (
            "linkpulse_link_bytes_total",
            "L3 bytes (IP header onward) counted on the link.",
        ),
    ] {
        let _ = writeln!(o, "# HELP {metric} {help}\n# TYPE {metric} counter");
        for l in &links {
            let lc = &s.link_counters[l.index];
            for d in 0..DIRS {
                let v = if metric.contains("packets") {
                    &lc.packets[d]
                } else {
                    &lc.bytes[d]
                };
                let dir = if d == 0 { "down" } else { "up" };
                let _ = writeln!(
                    o,
                    "{metric}{{{},direction=\"{dir}\"}} {}",
                    labels(l),
                    v.load(Ordering::Relaxed)
                );
            }
        }
    }
    let _ = writeln!(o, "# HELP linkpulse_link_ring_full_total Bin ends at which the kernel found the ring buffer full on this link (the data arrives late, nothing is lost).\n# TYPE linkpulse_link_ring_full_total counter");
    for l in &links {
        let v = s.link_counters[l.index].ring_full.load(Ordering::Relaxed);
        let _ = writeln!(o, "linkpulse_link_ring_full_total{{{}}} {v}", labels(l));
    }
    let _ = writeln!(o, "# HELP linkpulse_link_bins_missing_total Bins in which the link was not attached (missing data, not zeros).\n# TYPE linkpulse_link_bins_missing_total counter");
    for l in &links {
        let v = s.link_counters[l.index]
            .bins_missing
            .load(Ordering::Relaxed);
        let _ = writeln!(o, "linkpulse_link_bins_missing_total{{{}}} {v}", labels(l));
    }
    let _ = writeln!(o, "# HELP linkpulse_link_throughput_bits_per_second Throughput over the last complete second.\n# TYPE linkpulse_link_throughput_bits_per_second gauge");
    for l in &links {
        if let Some(sec) = l.last_second {
            let _ = writeln!(
                o,
                "linkpulse_link_throughput_bits_per_second{{{},direction=\"down\"}} {}",
                labels(l),
                sec.down.bits_per_s
            );
            let _ = writeln!(
                o,
                "linkpulse_link_throughput_bits_per_second{{{},direction=\"up\"}} {}",
                labels(l),
                sec.up.bits_per_s
            );
        }
    }
    s.probe.write_metrics(&mut o, &links, &labels);
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        o,
    )
        .into_response()
}
