//! The demo's per-link table, rendered from the daemon's `/api/v1/links` JSON.
//!
//! Tolerant on purpose: the API is young, `last_second` is null until a second has been seen, and a
//! missing field shows as "-" rather than stopping the demo.

use serde_json::Value;

const HEADERS: [&str; 8] = [
    "label",
    "operator",
    "iface",
    "state",
    "down Mbit/s",
    "up Mbit/s",
    "pkts/s down",
    "pkts/s up",
];
/// Columns from "down Mbit/s" on are numbers: right-aligned.
const FIRST_NUMERIC: usize = 4;

/// Renders the table, or a one-line explanation if the JSON has no `links` array.
pub fn render(json: &Value) -> String {
    let Some(links) = json.get("links").and_then(Value::as_array) else {
        return format!("(the answer has no \"links\" array: {})\n", shorten(json));
    };
    let mut rows: Vec<[String; 8]> = vec![HEADERS.map(str::to_owned)];
    rows.extend(links.iter().map(row));
    let mut widths = [0usize; 8];
    for row in &rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in &rows {
        let cells: Vec<String> = row
            .iter()
            .zip(widths)
            .enumerate()
            .map(|(i, (cell, w))| {
                if i >= FIRST_NUMERIC {
                    format!("{cell:>w$}")
                } else {
                    format!("{cell:<w$}")
                }
            })
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if links.is_empty() {
        out.push_str("(no links configured)\n");
    }
    let mut meta = Vec::new();
    if let Some(id) = json.get("router_id").and_then(Value::as_str) {
        meta.push(format!("router {id}"));
    }
    if let Some(site) = json.get("site").and_then(Value::as_str) {
        meta.push(format!("site {site}"));
    }
    if let Some(ns) = json.get("bin_width_ns").and_then(Value::as_f64) {
        meta.push(format!("bins {} µs", ns / 1000.0));
    }
    if !meta.is_empty() {
        out.push_str(&meta.join(", "));
        out.push('\n');
    }
    out
}

fn row(link: &Value) -> [String; 8] {
    let text = |key: &str| match link.get(key) {
        Some(Value::String(s)) => s.clone(),
        Some(Value::Null) | None => "-".to_owned(),
        Some(other) => other.to_string(),
    };
    let last = link.get("last_second").filter(|v| !v.is_null());
    let dir = |name: &str| last.and_then(|l| l.get(name));
    [
        text("label"),
        text("operator"),
        text("interface"),
        text("state"),
        mbit(dir("down")),
        mbit(dir("up")),
        packets(dir("down")),
        packets(dir("up")),
    ]
}

/// Mbit/s from `bits_per_s`, else from `bytes` (the window is one second).
fn mbit(direction: Option<&Value>) -> String {
    let Some(d) = direction else {
        return "-".to_owned();
    };
    let bits = d
        .get("bits_per_s")
        .and_then(Value::as_f64)
        .or_else(|| d.get("bytes").and_then(Value::as_f64).map(|b| b * 8.0));
    bits.map_or_else(|| "-".to_owned(), |b| format!("{:.2}", b / 1e6))
}

/// Packets in the last second are packets per second.
fn packets(direction: Option<&Value>) -> String {
    direction
        .and_then(|d| d.get("packets"))
        .and_then(Value::as_f64)
        .map_or_else(|| "-".to_owned(), |p| format!("{p:.0}"))
}

fn shorten(json: &Value) -> String {
    let text = json.to_string();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{}…", &text[..cut]),
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn full_and_partial_links() {
        let answer = json!({
            "links": [
                {"interface": "wwan0", "label": "modem 1", "operator": "Verizon",
                 "modem_id": "demo-0", "state": "attached", "ifindex": 3,
                 "last_second": {"start_utc_ns": 1,
                    "down": {"packets": 1200, "bytes": 1_500_000, "bits_per_s": 12_000_000},
                    "up": {"packets": 300, "bytes": 20_000}}},
                {"interface": "wwan1", "label": "modem 2", "state": "absent", "last_second": null},
                {}
            ],
            "bin_width_ns": 100000, "router_id": "demo-router", "site": "lab"
        });
        let table = render(&answer);
        let lines: Vec<&str> = table.lines().collect();
        assert!(lines[0].starts_with("label"), "{table}");
        assert!(
            lines[1].contains("Verizon") && lines[1].contains("12.00"),
            "{table}"
        );
        // up has no bits_per_s: computed from bytes (20 kB = 0.16 Mbit).
        assert!(
            lines[1].contains("0.16") && lines[1].contains("1200"),
            "{table}"
        );
        assert!(
            lines[2].contains("absent") && lines[2].contains(" - "),
            "{table}"
        );
        assert!(
            lines[3].starts_with('-'),
            "an empty object is a row of dashes: {table}"
        );
        assert_eq!(lines[4], "router demo-router, site lab, bins 100 µs");
    }

    #[test]
    fn not_a_links_answer() {
        assert!(render(&json!({"error": "x"})).contains("no \"links\" array"));
        assert!(render(&json!({"links": []})).contains("no links configured"));
    }
}
