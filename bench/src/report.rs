//! The benchmark's output: a table (figure beside its peer) and target/bench/summary.json, a
//! flat object name → {value, unit, peer, peer_name}.
use std::{fs, path::Path};

use serde_json::{json, Map, Value};

#[derive(Debug, Clone)]
pub struct Metric {
    pub name: &'static str,
    pub value: f64,
    pub unit: &'static str,
    /// The peer's figure, measured in the same run or a labelled constant.
    pub peer: Option<f64>,
    /// What the peer is, and for constants where the number comes from.
    pub peer_name: String,
    /// The target, as a short phrase ("≤ 70 over the baseline").
    pub target: &'static str,
    /// Extra context printed beside the figure (e.g. the packet rate reached).
    pub note: String,
}

impl Metric {
    pub fn new(name: &'static str, value: f64, unit: &'static str) -> Self {
        Self {
            name,
            value,
            unit,
            peer: None,
            peer_name: String::new(),
            target: "",
            note: String::new(),
        }
    }
    pub fn peer(mut self, v: f64, name: impl Into<String>) -> Self {
        self.peer = Some(v);
        self.peer_name = name.into();
        self
    }
    pub fn target(mut self, t: &'static str) -> Self {
        self.target = t;
        self
    }
    pub fn note(mut self, n: impl Into<String>) -> Self {
        self.note = n.into();
        self
    }
}

fn fmt(v: f64) -> String {
    if v.abs() >= 100.0 || v == v.trunc() {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub fn print_table(metrics: &[Metric]) {
    println!(
        "\n{:<34} {:>12} {:<6} {:>12}  {:<52} target / note",
        "metric", "linkpulse", "unit", "peer", "peer is"
    );
    println!("{}", "-".repeat(150));
    for m in metrics {
        println!(
            "{:<34} {:>12} {:<6} {:>12}  {:<52} {}{}{}",
            m.name,
            fmt(m.value),
            m.unit,
            m.peer.map(fmt).unwrap_or_else(|| "-".into()),
            m.peer_name,
            m.target,
            if m.target.is_empty() || m.note.is_empty() {
                ""
            } else {
                "; "
            },
            m.note
        );
    }
}

pub fn write_summary(path: &Path, metrics: &[Metric]) -> anyhow::Result<()> {
    let mut obj = Map::new();
    for m in metrics {
        obj.insert(
            m.name.to_string(),
            json!({
                "value": m.value,
                "unit": m.unit,
                "peer": m.peer,
                "peer_name": m.peer_name,
                "target": m.target,
                "note": m.note,
            }),
        );
    }
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::write(
        path,
        serde_json::to_string_pretty(&Value::Object(obj))? + "\n",
    )?;
    Ok(())
}
