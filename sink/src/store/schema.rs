//! The store's schema: the rollup tuple, the migrations that create it, and the stored functions
//! all data access goes through.
//!
//! Schema v3 = v2 + the aggregate tiers (`tiers`, `tiers_build`; see tiers.rs). With them a put
//! costs ~32k rows/s (100k rows of 16 links in batches of 500, the store test) instead of ~40k;
//! the migration builds tiers from existing rows at ~67k rows/s (5.7 M rows in 86 s, measured on
//! the bench's 30-day store) while the store starts: the daemon's 2-minute rollup queue covers a
//! store of ~8 M rows; rollups beyond that are dropped and counted as usual.
//!
//! Schema v1:
//! - `_linkpulse_meta` (memtx): `{key string, value any}`: `schema_version`, `boots` (starts of the
//!   supervised instance), `seq_hwm` (see [`Rollup::seq`]), `trimmed_upto` (the highest seq
//!   retention deleted).
//! - `rollups` (vinyl, so RAM does not grow with history): one tuple per link and window, fields in
//!   [`FIELDS`]. The identity of a row is `(link_id, window_start_ns, boot_tag)` (index `identity`);
//!   `lp_put_rollups` keeps it unique by replacing the row stored under it.
//!   The primary key is `seq`, the insertion order, because the forwarder scans by it: a cursor
//!   over the identity would miss rows of a link that sorts before the cursor, and windows written
//!   after a backward clock step. Measured on this machine (100k rows, vinyl, 8 MiB cache): a scan
//!   by a secondary `seq` index runs at ~28k rows/s (one primary lookup per row), a primary scan at
//!   ~300k rows/s; puts cost ~40k rows/s either way (vinyl reads on each write).
//! - `cursors` (memtx): `{destination string, seq unsigned}`, the last `seq` a destination
//!   acknowledged.
//!
//! Schema v2 (RAM): vinyl keeps the page index and the bloom filters of every run on disk in
//! memory, so they grow with history. The primary index (`seq`) is scanned by range, which
//! never consults a bloom filter, and looked up by key only to delete a row put again: v2 drops
//! its bloom filter (`bloom_fpr = 1`) and makes its pages 64 KiB (a range scan reads them
//! whole anyway). The identity index keeps both: every put looks an identity up, and the bloom
//! filter answers "absent" without a disk read. Measured with 9 h of 16 links (1.04M rows):
//! page indexes + bloom filters 3.1 MiB in v1 (~0.35 MiB per hour of 16 links), 1.4 MiB in v2
//! (~0.16 MiB per hour). Both options apply to runs written from then on (no rebuild).
//!
//! Schema v5 (raw reads by time): reading rows by the `identity` index costs a primary lookup
//! per row, and without a bloom filter on the primary each lookup reads a 64 KiB page of every
//! run of its range that does not rule the seq out by its page index: on the bench's 30-day
//! store (5.7 M rows, 21 primary runs in 9 ranges) one day of one link (172,800 rows) took 47 s
//! in Tarantool on one core, ~9 page reads per row (the lead measured 110 s under load; 12.5 s
//! once background compaction had left 12 runs), one hour 2.4 s. Measured alternatives on a
//! copy of that store: bloom back on the primary plus a compaction, 12.9 s (then one 64 KiB page
//! per row: the compaction, leaving one run per range, did most of it); the same with 8 KiB
//! pages, 4.8 s (more page index: ~0.14 MiB per hour of 16 links, plus ~0.09 MiB of bloom
//! filter, i.e. v2's RAM saving undone). v5 instead keeps in
//! each 10 s bucket the lowest and highest `seq` of its rows and `lp_read_range` scans those
//! ranges of the primary (~3 µs per row scanned, other links' rows in the range included):
//! 2.1 s for that day (its seq range holds 4 links' rows: 691k scanned), 0.06 s for the hour,
//! no RAM or disk added. With 16 links put one window at a time (the daemon's batches), a
//! link's day scans all 16 links' rows: 9.0 s against 13.5 s by identity (2.76 M rows, 9
//! primary runs in 4 ranges), an hour 0.25 s against 0.18 s. A copy of the rows keyed by
//! identity read a day in 0.64 s there, but costs ~185 bytes per row on disk (+~70 % store
//! size, so less history under `max_disk_mb`): not done.
//! Exactness and the exceptions (late rows, tier retention): `migration_v5` in tiers.rs. The
//! migration fills the ranges of older buckets from the rows, in chunks: 37 s for that store.

use serde::{Deserialize, Serialize};

/// One 500 ms (by default) window of one link, as stored. Field order is the tuple layout; it
/// must match [`FIELDS`] (a unit test checks).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct Rollup {
    /// Insertion order, assigned by the store on put (the value passed in is ignored). Strictly
    /// increasing across puts, with gaps; never reused, even after trims and restarts (the high
    /// water mark is persisted before rows are deleted). The forwarder's cursor is a `seq`;
    /// the primary key.
    pub seq: u64,
    /// The daemon's stable numeric id of the link (interface); part of the identity.
    pub link_id: u32,
    /// Start of the window, UTC nanoseconds since the UNIX epoch, aligned to `window_ns`.
    pub window_start_ns: u64,
    /// Clock epoch the window was measured in: changes when the daemon starts or the clock steps,
    /// so that windows measured before a backward step are never replaced by later ones with the
    /// same timestamp. Part of the identity.
    pub boot_tag: u64,
    /// Window width in nanoseconds (500 ms by default).
    pub window_ns: u64,
    /// False when the window spans a daemon restart, a hot-plug gap or a clock step.
    pub complete: bool,
    /// Link state code at the window's end (defined by the producer, e.g. 0 unknown, 1 up, 2 down).
    pub link_state: u8,
    /// Clock state code (e.g. 0 unsynchronised, 1 synchronised) over the window.
    pub clock_state: u8,
    /// Bound on the error of `window_start_ns` against true UTC, nanoseconds.
    pub clock_error_ns: u64,
    /// Bytes received on the link (from the modem) in the window.
    pub rx_bytes: u64,
    /// Bytes sent on the link in the window.
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Receive rate over the window's bins, bits per second: mean, peak (highest bin), and
    /// percentiles of the per-bin rates.
    pub rx_rate_mean_bps: f64,
    pub rx_rate_peak_bps: f64,
    pub rx_rate_p50_bps: f64,
    pub rx_rate_p95_bps: f64,
    pub rx_rate_p99_bps: f64,
    /// Send rate, same definitions.
    pub tx_rate_mean_bps: f64,
    pub tx_rate_peak_bps: f64,
    pub tx_rate_p50_bps: f64,
    pub tx_rate_p95_bps: f64,
    pub tx_rate_p99_bps: f64,
    /// Round-trip times in nanoseconds; `None` when no probe or TCP sample came back in the window.
    pub rtt_min_ns: Option<u64>,
    pub rtt_mean_ns: Option<u64>,
    pub rtt_max_ns: Option<u64>,
    pub rtt_p50_ns: Option<u64>,
    pub rtt_p99_ns: Option<u64>,
    /// Probes sent towards the reflector, and lost on that way.
    pub probes_sent_fwd: u32,
    pub probes_lost_fwd: u32,
    /// Probes the reflector sent back (known from its STAMP sequence numbers), and lost on the way
    /// back.
    pub probes_sent_bwd: u32,
    pub probes_lost_bwd: u32,
    // Schema v4 (rows stored before it lack these: read back as 0 / None).
    /// Passive TCP RTT samples (TCP timestamp echoes) that arrived in the window's bins.
    #[serde(default)]
    pub tcp_rtt_samples: u64,
    /// Their RTT in nanoseconds, exact from the bins; `None` without a sample.
    #[serde(default)]
    pub tcp_rtt_min_ns: Option<u64>,
    #[serde(default)]
    pub tcp_rtt_mean_ns: Option<u64>,
    #[serde(default)]
    pub tcp_rtt_max_ns: Option<u64>,
    /// Answered probes sent in the window whose one-way delays are known: both clocks (ours by
    /// adjtimex, the reflector's by its Error Estimate S bit) synchronised.
    #[serde(default)]
    pub owd_samples: u32,
    /// One-way delays of those probes, nanoseconds (up = T2 − T1, down = T4 − T3): mean and max;
    /// `None` when `owd_samples` is 0 (never a zero). Negative when the clocks' real offset
    /// exceeds the delay: `owd_error_ns` bounds that.
    #[serde(default)]
    pub owd_up_mean_ns: Option<i64>,
    #[serde(default)]
    pub owd_up_max_ns: Option<i64>,
    #[serde(default)]
    pub owd_down_mean_ns: Option<i64>,
    #[serde(default)]
    pub owd_down_max_ns: Option<i64>,
    /// The largest error bound of those probes' delays (our maxerror + the reflector's estimate).
    #[serde(default)]
    pub owd_error_ns: Option<u64>,
}

/// Tuple layout of `rollups`: name, Tarantool field type, nullable.
pub const FIELDS: &[(&str, &str, bool)] = &[
    ("seq", "unsigned", false),
    ("link_id", "unsigned", false),
    ("window_start_ns", "unsigned", false),
    ("boot_tag", "unsigned", false),
    ("window_ns", "unsigned", false),
    ("complete", "boolean", false),
    ("link_state", "unsigned", false),
    ("clock_state", "unsigned", false),
    ("clock_error_ns", "unsigned", false),
    ("rx_bytes", "unsigned", false),
    ("tx_bytes", "unsigned", false),
    ("rx_packets", "unsigned", false),
    ("tx_packets", "unsigned", false),
    ("rx_rate_mean_bps", "number", false),
    ("rx_rate_peak_bps", "number", false),
    ("rx_rate_p50_bps", "number", false),
    ("rx_rate_p95_bps", "number", false),
    ("rx_rate_p99_bps", "number", false),
    ("tx_rate_mean_bps", "number", false),
    ("tx_rate_peak_bps", "number", false),
    ("tx_rate_p50_bps", "number", false),
    ("tx_rate_p95_bps", "number", false),
    ("tx_rate_p99_bps", "number", false),
    ("rtt_min_ns", "unsigned", true),
    ("rtt_mean_ns", "unsigned", true),
    ("rtt_max_ns", "unsigned", true),
    ("rtt_p50_ns", "unsigned", true),
    ("rtt_p99_ns", "unsigned", true),
    ("probes_sent_fwd", "unsigned", false),
    ("probes_lost_fwd", "unsigned", false),
    ("probes_sent_bwd", "unsigned", false),
    ("probes_lost_bwd", "unsigned", false),
    // v4: nullable, as rows stored before lack them.
    ("tcp_rtt_samples", "unsigned", true),
    ("tcp_rtt_min_ns", "unsigned", true),
    ("tcp_rtt_mean_ns", "unsigned", true),
    ("tcp_rtt_max_ns", "unsigned", true),
    ("owd_samples", "unsigned", true),
    ("owd_up_mean_ns", "integer", true),
    ("owd_up_max_ns", "integer", true),
    ("owd_down_mean_ns", "integer", true),
    ("owd_down_max_ns", "integer", true),
    ("owd_error_ns", "unsigned", true),
];

/// Fields of `rollups` up to schema v3 (the v4 migration's test rebuilds a v3 store with them).
pub const FIELDS_V3: usize = 32;

/// 1-based position of `seq` in the tuple (Lua indexes).
const SEQ_FIELD: usize = 1;
/// 1-based position of `window_start_ns`.
const WINDOW_FIELD: usize = 3;

/// The schema version this build writes and reads (v2: leaner seq index, v3: aggregate tiers,
/// see tiers.rs, v4: passive TCP RTT and one-way delays in rollups and tiers, v5: raw reads
/// through the 10 s buckets' seq ranges).
pub const SCHEMA_VERSION: u32 = 5;

/// Creates `_linkpulse_meta` if needed and returns the schema version (0 on a fresh instance).
/// Idempotent; run before the migrations.
pub(crate) const BOOTSTRAP_LUA: &str = r#"
box.schema.space.create('_linkpulse_meta', {engine = 'memtx', if_not_exists = true,
    format = {{'key', 'string'}, {'value', 'any'}}})
box.space._linkpulse_meta:create_index('primary', {parts = {{1, 'string'}}, if_not_exists = true})
local v = box.space._linkpulse_meta:get('schema_version')
return v and v[2] or 0
"#;

/// Records that migration `...` is applied.
pub(crate) const SET_VERSION_LUA: &str =
    "box.space._linkpulse_meta:replace{'schema_version', (...)} return true";

/// Migration `i` brings the schema from version `i` to `i + 1`. Each is idempotent Lua: a run cut
/// short by a crash is simply run again.
pub(crate) fn migrations() -> Vec<String> {
    vec![
        migration_v1(),
        MIGRATION_V2.to_owned(),
        super::tiers::migration_v3(),
        migration_v4(),
        super::tiers::migration_v5(),
    ]
}

/// The Lua list of field definitions for `space:format{...}` (name, type, nullable each).
pub fn lua_format(fields: &[(&str, &str, bool)]) -> String {
    fields
        .iter()
        .map(|(name, ty, nullable)| {
            format!("{{name = '{name}', type = '{ty}', is_nullable = {nullable}}}")
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Schema v4: the rollup and tier formats gain nullable fields at their end (rows stored before
/// keep their shorter tuples: no rewrite, readers take a missing field as 0 / None), and the
/// stored functions of this build (which fold the new fields into the tiers) are installed again.
fn migration_v4() -> String {
    format!(
        "box.space.rollups:format({{{}}})\nbox.space.tiers:format({{{}}})\n{}",
        lua_format(FIELDS),
        lua_format(super::tiers::TIER_FIELDS),
        super::tiers::migration_v3()
    )
}

/// See the module doc (schema v2).
const MIGRATION_V2: &str = r#"
box.space.rollups.index.primary:alter({page_size = 65536, bloom_fpr = 1})
return true
"#;

/// The migrations' `define(name, body)`: installs a stored function (drop + create: a re-run
/// installs the body of this build).
pub(crate) const LUA_DEFINE: &str = "
local function define(name, body)
    if box.schema.func.exists(name) then box.schema.func.drop(name) end
    box.schema.func.create(name, {language = 'LUA', body = body})
end
";

fn migration_v1() -> String {
    let format = lua_format(FIELDS);
    let seq = SEQ_FIELD;
    let window = WINDOW_FIELD;
    format!(
        r#"{LUA_DEFINE}
local r = box.schema.space.create('rollups', {{engine = 'vinyl', if_not_exists = true, format = {{
    {format}
}}}})
r:create_index('primary', {{parts = {{{{{seq}, 'unsigned'}}}}, if_not_exists = true}})
-- Not unique for vinyl (a unique secondary costs one more read per write); lp_put_rollups keeps it
-- unique, and vinyl's conflict detection aborts one of two concurrent puts of one identity.
r:create_index('identity', {{parts = {{{{2, 'unsigned'}}, {{3, 'unsigned'}}, {{4, 'unsigned'}}}},
    unique = false, if_not_exists = true}})

local c = box.schema.space.create('cursors', {{engine = 'memtx', if_not_exists = true,
    format = {{{{'destination', 'string'}}, {{'seq', 'unsigned'}}}}}})
c:create_index('primary', {{parts = {{{{1, 'string'}}}}, if_not_exists = true}})

define('lp_schema_version', [[function()
    local v = box.space._linkpulse_meta:get('schema_version')
    return v and v[2] or 0
end]])

-- The next seq to hand out lives in Lua memory (a vinyl transaction cannot also write a memtx
-- counter); after a restart it is rebuilt from the highest stored seq and the persisted mark.
define('lp_seq_base', [[function()
    local cur = rawget(_G, '__lp_seq')
    if cur ~= nil then return cur end
    local top = box.space.rollups.index.primary:max()
    local hwm = box.space._linkpulse_meta:get('seq_hwm')
    cur = rawget(_G, '__lp_seq') -- the reads above yield: another fiber may have set it
    if cur ~= nil then return cur end
    cur = math.max(top and top[{seq}] or 0, hwm and hwm[2] or 0)
    rawset(_G, '__lp_seq', cur)
    return cur
end]])

define('lp_put_rollups', [[function(batch)
    local s = box.space.rollups
    local ident = s.index.identity
    local n = #batch
    local base = box.func.lp_seq_base:call()
    -- reserve the range before the first yield, so concurrent puts never share a seq
    rawset(_G, '__lp_seq', base + n)
    box.begin()
    local ok, err = pcall(function()
        for i = 1, n do
            local row = batch[i]
            row[{seq}] = base + i
            local old = ident:select({{row[2], row[3], row[4]}}, {{limit = 1}})[1]
            if old ~= nil then s:delete(old[{seq}]) end
            s:replace(row)
        end
    end)
    if not ok then
        box.rollback()
        error(err)
    end
    box.commit()
    return n, base + n
end]])

define('lp_read_after', [[function(after, limit)
    return box.space.rollups.index.primary:select({{after}}, {{iterator = 'GT', limit = limit}})
end]])

-- One link's windows with from_ns <= window_start < to_ns, ordered by (window_start, boot_tag),
-- about `limit` rows: a page never ends inside one window start (rows of several boot tags), so
-- the caller pages on with the last window start + 1. Uses the identity index (until v5, which
-- replaces it: see tiers.rs).
define('lp_read_range', [[function(link, from_ns, to_ns, limit)
    local out = {{}}
    for _, t in box.space.rollups.index.identity:pairs({{link, from_ns}}, {{iterator = 'GE'}}) do
        if t[2] ~= link or t[3] >= to_ns then break end
        if #out >= limit and out[#out][3] ~= t[3] then break end
        out[#out + 1] = t
    end
    return out
end]])

define('lp_set_cursor', [[function(dest, seq)
    box.space.cursors:replace{{dest, seq}}
    return true
end]])

define('lp_get_cursor', [[function(dest)
    local t = box.space.cursors:get(dest)
    if t == nil then return nil end
    return t[2]
end]])

-- Retention: deletes the oldest rows (lowest seq) while their window starts before `before_ns`,
-- at most `limit` of them, in transactions of at most 1000. Always a prefix of the seq order, so
-- what was trimmed is the range up to `trimmed_upto` (kept in _linkpulse_meta) and rows a
-- destination never acknowledged are simply those above its cursor. Returns the count and
-- trimmed_upto; the caller loops while the count equals the limit.
define('lp_trim', [[function(before_ns, limit)
    local s = box.space.rollups
    local meta = box.space._linkpulse_meta
    -- first: if this empties the space, a restart must still hand out seqs above every old one
    meta:replace{{'seq_hwm', box.func.lp_seq_base:call()}}
    local upto = meta:get('trimmed_upto')
    upto = upto and upto[2] or 0
    local deleted, done = 0, false
    while not done and deleted < limit do
        local rows = s.index.primary:select({{upto}}, {{iterator = 'GT',
            limit = math.min(1000, limit - deleted)}})
        if #rows == 0 then break end
        box.begin()
        for _, t in ipairs(rows) do
            if t[{window}] >= before_ns then done = true break end
            s:delete(t[{seq}])
            upto = t[{seq}]
            deleted = deleted + 1
        end
        box.commit()
    end
    meta:replace{{'trimmed_upto', upto}}
    return deleted, upto
end]])
return true
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_field_order_matches_tuple_format() {
        // Serialize with names to read back the serde field order.
        let named = rmp_serde::to_vec_named(&Rollup::default()).expect("encode");
        let mut rd = named.as_slice();
        let n = rmp::decode::read_map_len(&mut rd).expect("map") as usize;
        let mut names = Vec::new();
        for _ in 0..n {
            let len = rmp::decode::read_str_len(&mut rd).expect("key") as usize;
            names.push(String::from_utf8(rd[..len].to_vec()).expect("utf8"));
            rd = &rd[len..];
            rd = crate::tarantool::skip_value(rd).expect("value");
        }
        let expected: Vec<&str> = FIELDS.iter().map(|f| f.0).collect();
        assert_eq!(names, expected);
        assert_eq!(FIELDS[SEQ_FIELD - 1].0, "seq");
        assert_eq!(FIELDS[WINDOW_FIELD - 1].0, "window_start_ns");
        assert_eq!(
            FIELDS[1..4].iter().map(|f| f.0).collect::<Vec<_>>(),
            ["link_id", "window_start_ns", "boot_tag"],
            "the identity index is on fields 2..4"
        );
    }

    #[test]
    fn v4_fields_follow_the_v3_ones_where_the_tier_lua_reads_them() {
        // tiers.rs's add_row reads rollup fields 33..42 (1-based) as the v4 ones.
        assert_eq!(FIELDS[FIELDS_V3 - 1].0, "probes_lost_bwd");
        let v4: Vec<&str> = FIELDS[FIELDS_V3..].iter().map(|f| f.0).collect();
        assert_eq!(
            v4,
            [
                "tcp_rtt_samples",
                "tcp_rtt_min_ns",
                "tcp_rtt_mean_ns",
                "tcp_rtt_max_ns",
                "owd_samples",
                "owd_up_mean_ns",
                "owd_up_max_ns",
                "owd_down_mean_ns",
                "owd_down_max_ns",
                "owd_error_ns"
            ]
        );
        assert!(
            FIELDS[FIELDS_V3..].iter().all(|f| f.2),
            "nullable: v3 rows lack them"
        );
    }

    #[test]
    fn compact_encoding_is_a_flat_array() {
        let v = rmp_serde::to_vec(&Rollup::default()).expect("encode");
        let mut rd = v.as_slice();
        assert_eq!(
            rmp::decode::read_array_len(&mut rd).expect("array") as usize,
            FIELDS.len()
        );
    }
}
