//! Retention of the local store by age and by disk quota, and the lost-range log: when a trim
//! removes rows some destination never acknowledged, each (destination, link) range is appended
//! (fsync'ed) to `lost-ranges.log` in the store's data dir, counted for `/metrics` and logged as
//! an event, before the rows go.
use std::{
    fs::{File, OpenOptions},
    io::{BufRead, BufReader, Write},
    path::{Path, PathBuf},
    sync::atomic::Ordering,
};

use linkpulse_sink::store::{Store, StoreError};
use serde::{Deserialize, Serialize};

use crate::{clock, config::StoreConfig, shared::Shared};

/// File name of the lost-range log in the store's data dir.
pub const LOST_LOG: &str = "lost-ranges.log";

/// Rows of one link that retention removed before `destination` acknowledged them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LostRange {
    pub destination: String,
    pub link_id: u32,
    /// Window starts (UTC ns) of the first and last row removed.
    pub from_ns: u64,
    pub to_ns: u64,
    pub rows: u64,
    pub at_unix_s: u64,
}

/// The append-only log, one JSON object per line.
pub struct LostLog {
    path: PathBuf,
    pub rows: u64,
    pub ranges: u64,
}

impl LostLog {
    /// Opens (and counts) the log; `None` (logged) when the data dir is not readable.
    pub fn open(dir: &Path) -> Option<LostLog> {
        let path = dir.join(LOST_LOG);
        let mut log = LostLog {
            path,
            rows: 0,
            ranges: 0,
        };
        for r in read_lost(dir).ok()? {
            log.rows += r.rows;
            log.ranges += 1;
        }
        Some(log)
    }

    fn append(&mut self, r: &LostRange) -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
        line.push(b'\n');
        f.write_all(&line)?;
        f.sync_data()?;
        self.rows += r.rows;
        self.ranges += 1;
        Ok(())
    }
}

/// Every lost range recorded in `dir` (empty when there is no log). A torn last line (a crash
/// while appending) is skipped.
pub fn read_lost(dir: &Path) -> std::io::Result<Vec<LostRange>> {
    let f = match File::open(dir.join(LOST_LOG)) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for line in BufReader::new(f).lines() {
        if let Ok(r) = serde_json::from_str::<LostRange>(&line?) {
            out.push(r);
        }
    }
    Ok(out)
}

/// Rows in the store (vinyl keeps the count in its statistics: no scan).
pub fn row_count(s: &Store) -> Result<u64, StoreError> {
    let (n,): (u64,) = s
        .client()
        .eval("return box.space.rollups.index.primary:len()", &[(); 0])
        .map_err(|source| StoreError::Request {
            request: "row count",
            source,
        })?;
    Ok(n)
}

/// The backlog of `destination`: rows after its cursor (a `seq` distance, an upper bound as
/// `seq` has gaps where a row was put again) and the seconds since the window start of the
/// oldest of them (0, 0 when it has everything).
pub fn backlog(s: &Store, destination: &str) -> Result<(u64, u64), StoreError> {
    let cursor = s.get_cursor(destination)?.unwrap_or(0);
    let rows = s.read_after(cursor, 1)?;
    let Some(oldest) = rows.first() else {
        return Ok((0, 0));
    };
    let (top,): (u64,) = s
        .client()
        .eval(
            "local t = box.space.rollups.index.primary:max() return t and t[1] or 0",
            &[(); 0],
        )
        .map_err(|source| StoreError::Request {
            request: "top seq",
            source,
        })?;
    let age = clock::realtime_ns().saturating_sub(oldest.window_start_ns) / 1_000_000_000;
    Ok((top.max(oldest.seq) - cursor, age))
}

/// Per link: first and last window start and the row count of the rows after `after_seq` that
/// a trim before `before_ns` removes (it deletes in seq order and stops at the first newer row).
const LOST_SCAN_LUA: &str = r#"
local after, before = ...
local agg, out = {}, {}
for _, t in box.space.rollups.index.primary:pairs({after}, {iterator = 'GT'}) do
    if t[3] >= before then break end
    local a = agg[t[2]]
    if a == nil then a = {t[3], t[3], 0}; agg[t[2]] = a end
    if t[3] < a[1] then a[1] = t[3] end
    if t[3] > a[2] then a[2] = t[3] end
    a[3] = a[3] + 1
end
for link, a in pairs(agg) do table.insert(out, {link, a[1], a[2], a[3]}) end
return out
"#;

/// Size of the files under `dir` in bytes.
fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => stack.push(e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

const HOUR_NS: u64 = 3_600_000_000_000;

/// The cut of one retention pass (rows with an older window start go; 0: nothing to trim): by
/// age, then (supervised store only) by disk quota, one hour of the oldest data per pass (vinyl
/// gives space back when it compacts, so the size is measured again at the next pass rather
/// than trimmed in a loop). Pass it to [`trim`] while the forwarders are paused.
pub fn cutoff(s: &Store, cfg: &StoreConfig) -> u64 {
    let mut before = 0;
    if cfg.retention_days > 0 {
        before = clock::realtime_ns().saturating_sub(u64::from(cfg.retention_days) * 24 * HOUR_NS);
    }
    if cfg.max_disk_mb > 0 && cfg.external.is_none() {
        let used = dir_bytes(&cfg.data_dir.join("db"));
        if used > cfg.max_disk_mb * 1024 * 1024 {
            match s.read_after(0, 1) {
                Ok(rows) => {
                    if let Some(r) = rows.first() {
                        before = before.max(r.window_start_ns + HOUR_NS);
                        tracing::warn!(
                            used_mb = used >> 20,
                            quota_mb = cfg.max_disk_mb,
                            "store over its disk quota: dropping the oldest hour"
                        );
                    }
                }
                Err(e) => tracing::warn!(error = %e, "retention: cannot read the oldest row"),
            }
        }
    }
    before
}

/// Records what each destination loses, then deletes every row before `before_ns`. The
/// destinations' forwarders must be paused with nothing on the wire (`ForwarderHandle::pause`):
/// then a cursor says exactly what its destination has, and the rows after it that go here are
/// exactly the ones it never gets.
pub fn trim(
    s: &Store,
    before_ns: u64,
    destinations: &[String],
    shared: &Shared,
    mut lost: Option<&mut LostLog>,
) -> Result<u64, StoreError> {
    let now_s = clock::realtime_ns() / 1_000_000_000;
    for d in destinations {
        let cursor = s.get_cursor(d)?.unwrap_or(0);
        let (ranges,): (Vec<(u32, u64, u64, u64)>,) = s
            .client()
            .eval(LOST_SCAN_LUA, &(cursor, before_ns))
            .map_err(|source| StoreError::Request {
                request: "lost-range scan",
                source,
            })?;
        for (link_id, from_ns, to_ns, rows) in ranges {
            let r = LostRange {
                destination: d.clone(),
                link_id,
                from_ns,
                to_ns,
                rows,
                at_unix_s: now_s,
            };
            tracing::warn!(destination = %d, link_id, from_ns, to_ns, rows,
                "retention removes rows this destination never acknowledged");
            shared.event(
                "rollups_lost",
                None,
                format!("retention removed {rows} rollups of link {link_id} (windows {from_ns}..={to_ns}) before destination {d} had them"),
            );
            if let Some(l) = lost.as_deref_mut() {
                if let Err(e) = l.append(&r) {
                    tracing::error!(error = %e, "cannot append to the lost-range log");
                }
                shared.forward.lost_rows.store(l.rows, Ordering::Relaxed);
                shared
                    .forward
                    .lost_ranges
                    .store(l.ranges, Ordering::Relaxed);
            } else {
                shared.forward.lost_rows.fetch_add(rows, Ordering::Relaxed);
                shared.forward.lost_ranges.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let t = s.trim(before_ns)?;
    let buckets = s.trim_tiers(before_ns)?;
    if buckets > 0 {
        tracing::info!(buckets, before_ns, "retention trimmed the aggregate tiers");
    }
    shared
        .forward
        .trimmed_rows
        .fetch_add(t.rows, Ordering::Relaxed);
    if t.rows > 0 {
        tracing::info!(rows = t.rows, before_ns, "retention trimmed the store");
    }
    Ok(t.rows)
}
