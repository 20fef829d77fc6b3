//! Aggregate tiers: per link, boot tag and epoch-aligned bucket of 10 s, 5 min and 1 h, the
//! mergeable sums of the rollups whose window starts in the bucket. They let a 30-day series read
//! ~1k rows instead of 5 M.
//!
//! Schema v3 adds:
//! - `tiers` (vinyl): one tuple per `(tier_ns, link_id, start_ns, boot_tag)` (the primary key),
//!   fields in [`TIER_FIELDS`]. Only mergeable figures are kept (counts, sums, min, max), so any
//!   step that is a multiple of a tier's width gives exactly what the raw rows give.
//! - `tiers_build` (vinyl): progress of the migration that builds tiers from rows stored before v3.
//!
//! Maintenance happens in `lp_put_rollups`, in the same transaction as the rows: a new identity
//! adds its row to its buckets; a replay of an identity with the same content changes nothing; a
//! changed row (same identity, other figures) makes its buckets recomputed from the rows below
//! (10 s from the rollups, 5 min from 10 s, 1 h from 5 min), since a max cannot be subtracted. The
//! boot tag is part of the key, so windows measured after a backward clock step land in their own
//! buckets and never rewrite older ones. Retention (`lp_trim_tiers`) deletes buckets whose whole
//! span is before the cut: the bucket straddling the cut keeps the rows retention removed.
//!
//! Building from older rows (`lp_tier_build`) walks the rollups in `seq` order up to the highest
//! `seq` at its first call, in chunks; each chunk's buckets and the progress mark commit together,
//! so a crash resumes without counting a row twice. It runs before the store is handed out; puts
//! that meet a build resumed after a crash write rows above its stop mark, which it leaves alone
//! (only a changed re-put of a not yet built old row could count that bucket's other rows twice).
//!
//! Schema v5: each bucket also keeps the lowest and highest `seq` of its rows, through which
//! `lp_read_range` reads raw rows by time (see [`migration_v5`]).
//!
//! Percentiles do not merge. A tier keeps the highest window p99 (RTT and rates), which is what
//! the API serves at any step: an upper bound of the windows' p99s, not the p99 of the step.

use serde::{Deserialize, Serialize};

use super::Rollup;

/// Tier widths in nanoseconds, finest first; each divides the next.
pub const TIERS_NS: [u64; 3] = [10_000_000_000, 300_000_000_000, 3_600_000_000_000];

/// The mergeable aggregate of the rollups of one link and boot tag whose window starts in
/// `[start_ns, start_ns + tier_ns)`. Field order is the tuple layout of `tiers`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct TierRow {
    /// Width of the bucket (one of [`TIERS_NS`]; the window width for a single rollup).
    pub tier_ns: u64,
    pub link_id: u32,
    /// Bucket start, UTC ns, a multiple of `tier_ns`.
    pub start_ns: u64,
    pub boot_tag: u64,
    /// Rollups in the bucket, and how many of them are complete.
    pub windows: u64,
    pub windows_complete: u64,
    /// Sum of the rollups' `window_ns` (the weight of the rate means).
    pub width_ns: u64,
    pub rx_bytes: u64,
    pub tx_bytes: u64,
    pub rx_packets: u64,
    pub tx_packets: u64,
    /// Σ rate mean × window_ns.
    pub rx_rate_wsum: f64,
    pub tx_rate_wsum: f64,
    /// Highest bin rate of any window.
    pub rx_rate_peak_bps: f64,
    pub tx_rate_peak_bps: f64,
    /// Highest window p99 of the bin rates.
    pub rx_rate_p99_max_bps: f64,
    pub tx_rate_p99_max_bps: f64,
    pub rtt_min_ns: Option<u64>,
    pub rtt_max_ns: Option<u64>,
    /// Highest window RTT p99.
    pub rtt_p99_max_ns: Option<u64>,
    /// Σ probes back per window with an RTT mean (at least 1 per such window), and Σ mean × that.
    pub rtt_weight: u64,
    pub rtt_wsum: f64,
    /// Probes sent towards the reflector; probes lost either way.
    pub probes_sent: u64,
    pub probes_lost: u64,
    // Schema v4 (buckets stored before lack these: read back as 0 / None).
    /// Σ passive TCP RTT samples, their min and max, and Σ window mean × window samples.
    #[serde(default)]
    pub tcp_rtt_samples: u64,
    #[serde(default)]
    pub tcp_rtt_min_ns: Option<u64>,
    #[serde(default)]
    pub tcp_rtt_max_ns: Option<u64>,
    #[serde(default)]
    pub tcp_rtt_wsum: f64,
    /// Σ probes with one-way delays, Σ window mean × window count per direction, the highest
    /// window max per direction and the highest error bound.
    #[serde(default)]
    pub owd_samples: u64,
    #[serde(default)]
    pub owd_up_wsum: f64,
    #[serde(default)]
    pub owd_down_wsum: f64,
    #[serde(default)]
    pub owd_up_max_ns: Option<i64>,
    #[serde(default)]
    pub owd_down_max_ns: Option<i64>,
    #[serde(default)]
    pub owd_error_max_ns: Option<u64>,
    // Schema v5 (see the module doc).
    /// Lowest and highest `seq` of the rollups counted in the bucket (a superset: a row deleted
    /// or replaced leaves the range as it was). Exact for the 10 s tier, which raw reads use;
    /// coarser buckets only span the rows put since v5.
    #[serde(default)]
    pub seq_min: Option<u64>,
    #[serde(default)]
    pub seq_max: Option<u64>,
}

/// Tuple layout of `tiers`: name, Tarantool field type, nullable.
pub const TIER_FIELDS: &[(&str, &str, bool)] = &[
    ("tier_ns", "unsigned", false),
    ("link_id", "unsigned", false),
    ("start_ns", "unsigned", false),
    ("boot_tag", "unsigned", false),
    ("windows", "unsigned", false),
    ("windows_complete", "unsigned", false),
    ("width_ns", "unsigned", false),
    ("rx_bytes", "unsigned", false),
    ("tx_bytes", "unsigned", false),
    ("rx_packets", "unsigned", false),
    ("tx_packets", "unsigned", false),
    ("rx_rate_wsum", "number", false),
    ("tx_rate_wsum", "number", false),
    ("rx_rate_peak_bps", "number", false),
    ("tx_rate_peak_bps", "number", false),
    ("rx_rate_p99_max_bps", "number", false),
    ("tx_rate_p99_max_bps", "number", false),
    ("rtt_min_ns", "unsigned", true),
    ("rtt_max_ns", "unsigned", true),
    ("rtt_p99_max_ns", "unsigned", true),
    ("rtt_weight", "unsigned", false),
    ("rtt_wsum", "number", false),
    ("probes_sent", "unsigned", false),
    ("probes_lost", "unsigned", false),
    // v4: nullable, as buckets stored before lack them.
    ("tcp_rtt_samples", "unsigned", true),
    ("tcp_rtt_min_ns", "unsigned", true),
    ("tcp_rtt_max_ns", "unsigned", true),
    ("tcp_rtt_wsum", "number", true),
    ("owd_samples", "unsigned", true),
    ("owd_up_wsum", "number", true),
    ("owd_down_wsum", "number", true),
    ("owd_up_max_ns", "integer", true),
    ("owd_down_max_ns", "integer", true),
    ("owd_error_max_ns", "unsigned", true),
    // v5: nullable, as buckets stored before lack them until the v5 build.
    ("seq_min", "unsigned", true),
    ("seq_max", "unsigned", true),
];

fn min_opt(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn max_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl TierRow {
    /// One rollup as an aggregate of itself (the same definitions as `lp_put_rollups` uses).
    pub fn from_rollup(r: &Rollup) -> TierRow {
        let w = r.window_ns as f64;
        let rtt = r.rtt_mean_ns.map(|m| {
            // Weighted by the probes that came back in the window (at least 1).
            let back = r
                .probes_sent_fwd
                .saturating_sub(r.probes_lost_fwd)
                .saturating_sub(r.probes_lost_bwd)
                .max(1) as u64;
            (back, m as f64 * back as f64)
        });
        TierRow {
            tier_ns: r.window_ns,
            link_id: r.link_id,
            start_ns: r.window_start_ns,
            boot_tag: r.boot_tag,
            windows: 1,
            windows_complete: u64::from(r.complete),
            width_ns: r.window_ns,
            rx_bytes: r.rx_bytes,
            tx_bytes: r.tx_bytes,
            rx_packets: r.rx_packets,
            tx_packets: r.tx_packets,
            rx_rate_wsum: r.rx_rate_mean_bps * w,
            tx_rate_wsum: r.tx_rate_mean_bps * w,
            rx_rate_peak_bps: r.rx_rate_peak_bps,
            tx_rate_peak_bps: r.tx_rate_peak_bps,
            rx_rate_p99_max_bps: r.rx_rate_p99_bps,
            tx_rate_p99_max_bps: r.tx_rate_p99_bps,
            rtt_min_ns: r.rtt_min_ns,
            rtt_max_ns: r.rtt_max_ns,
            rtt_p99_max_ns: r.rtt_p99_ns,
            rtt_weight: rtt.map_or(0, |r| r.0),
            rtt_wsum: rtt.map_or(0.0, |r| r.1),
            probes_sent: u64::from(r.probes_sent_fwd),
            probes_lost: u64::from(r.probes_lost_fwd) + u64::from(r.probes_lost_bwd),
            tcp_rtt_samples: r.tcp_rtt_samples,
            tcp_rtt_min_ns: r.tcp_rtt_min_ns,
            tcp_rtt_max_ns: r.tcp_rtt_max_ns,
            tcp_rtt_wsum: r
                .tcp_rtt_mean_ns
                .map_or(0.0, |m| m as f64 * r.tcp_rtt_samples as f64),
            owd_samples: u64::from(r.owd_samples),
            owd_up_wsum: r
                .owd_up_mean_ns
                .map_or(0.0, |m| m as f64 * f64::from(r.owd_samples)),
            owd_down_wsum: r
                .owd_down_mean_ns
                .map_or(0.0, |m| m as f64 * f64::from(r.owd_samples)),
            owd_up_max_ns: r.owd_up_max_ns,
            owd_down_max_ns: r.owd_down_max_ns,
            owd_error_max_ns: r.owd_error_ns,
            seq_min: Some(r.seq),
            seq_max: Some(r.seq),
        }
    }

    /// Adds `o`'s figures (the key fields are left alone).
    pub fn merge(&mut self, o: &TierRow) {
        self.windows += o.windows;
        self.windows_complete += o.windows_complete;
        self.width_ns += o.width_ns;
        self.rx_bytes += o.rx_bytes;
        self.tx_bytes += o.tx_bytes;
        self.rx_packets += o.rx_packets;
        self.tx_packets += o.tx_packets;
        self.rx_rate_wsum += o.rx_rate_wsum;
        self.tx_rate_wsum += o.tx_rate_wsum;
        self.rx_rate_peak_bps = self.rx_rate_peak_bps.max(o.rx_rate_peak_bps);
        self.tx_rate_peak_bps = self.tx_rate_peak_bps.max(o.tx_rate_peak_bps);
        self.rx_rate_p99_max_bps = self.rx_rate_p99_max_bps.max(o.rx_rate_p99_max_bps);
        self.tx_rate_p99_max_bps = self.tx_rate_p99_max_bps.max(o.tx_rate_p99_max_bps);
        self.rtt_min_ns = min_opt(self.rtt_min_ns, o.rtt_min_ns);
        self.rtt_max_ns = max_opt(self.rtt_max_ns, o.rtt_max_ns);
        self.rtt_p99_max_ns = max_opt(self.rtt_p99_max_ns, o.rtt_p99_max_ns);
        self.rtt_weight += o.rtt_weight;
        self.rtt_wsum += o.rtt_wsum;
        self.probes_sent += o.probes_sent;
        self.probes_lost += o.probes_lost;
        self.tcp_rtt_samples += o.tcp_rtt_samples;
        self.tcp_rtt_min_ns = min_opt(self.tcp_rtt_min_ns, o.tcp_rtt_min_ns);
        self.tcp_rtt_max_ns = max_opt(self.tcp_rtt_max_ns, o.tcp_rtt_max_ns);
        self.tcp_rtt_wsum += o.tcp_rtt_wsum;
        self.owd_samples += o.owd_samples;
        self.owd_up_wsum += o.owd_up_wsum;
        self.owd_down_wsum += o.owd_down_wsum;
        self.owd_up_max_ns = max_opt(self.owd_up_max_ns, o.owd_up_max_ns);
        self.owd_down_max_ns = max_opt(self.owd_down_max_ns, o.owd_down_max_ns);
        self.owd_error_max_ns = max_opt(self.owd_error_max_ns, o.owd_error_max_ns);
        self.seq_min = min_opt(self.seq_min, o.seq_min);
        self.seq_max = max_opt(self.seq_max, o.seq_max);
    }

    /// The figures that merge exactly (everything but the float sums), for comparisons.
    #[allow(clippy::type_complexity)]
    pub fn exact_part(
        &self,
    ) -> (
        [u64; 9],
        [f64; 4],
        [Option<u64>; 3],
        (u64, u64, u64, u64),
        [Option<u64>; 3],
        [u64; 2],
        [Option<i64>; 2],
    ) {
        (
            [
                self.windows,
                self.windows_complete,
                self.width_ns,
                self.rx_bytes,
                self.tx_bytes,
                self.rx_packets,
                self.tx_packets,
                self.rtt_weight,
                self.probes_sent,
            ],
            [
                self.rx_rate_peak_bps,
                self.tx_rate_peak_bps,
                self.rx_rate_p99_max_bps,
                self.tx_rate_p99_max_bps,
            ],
            [self.rtt_min_ns, self.rtt_max_ns, self.rtt_p99_max_ns],
            (
                self.probes_lost,
                self.link_id.into(),
                self.start_ns,
                self.boot_tag,
            ),
            [
                self.tcp_rtt_min_ns,
                self.tcp_rtt_max_ns,
                self.owd_error_max_ns,
            ],
            [self.tcp_rtt_samples, self.owd_samples],
            [self.owd_up_max_ns, self.owd_down_max_ns],
        )
    }
}

/// Lua shared by the stored functions of v3 (pasted into each body: stored functions cannot share
/// locals, and globals vanish on restart; making ~15 closures per call costs microseconds). Rollup tuple indexes: see `FIELDS` in schema.rs.
const TIER_LIB: &str = r#"
local TIERS = {@TIERS@}
-- never nil (a missing v4 field is nil): a table with a hole would not encode as an array
local function minn(a, b)
    if a == nil then
        if b == nil then return box.NULL end
        return b
    elseif b == nil then return a elseif b < a then return b end
    return a
end
local function maxn(a, b)
    if a == nil then
        if b == nil then return box.NULL end
        return b
    elseif b == nil then return a elseif b > a then return b end
    return a
end
-- v4 fields of rows and buckets stored before v4 are absent (nil); box.NULL == nil too
local function z(x)
    if x == nil then return 0 end
    return x
end
local function empty(w, link, start, boot)
    return {w, link, start, boot, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        box.NULL, box.NULL, box.NULL, 0, 0, 0, 0,
        0, box.NULL, box.NULL, 0, 0, 0, 0, box.NULL, box.NULL, box.NULL, box.NULL, box.NULL}
end
-- adds rollup r (tuple or table) to aggregate a
local function add_row(a, r)
    a[5] = a[5] + 1
    if r[6] then a[6] = a[6] + 1 end
    a[7] = a[7] + r[5]
    a[8] = a[8] + r[10]; a[9] = a[9] + r[11]; a[10] = a[10] + r[12]; a[11] = a[11] + r[13]
    a[12] = a[12] + r[14] * r[5]; a[13] = a[13] + r[19] * r[5]
    a[14] = maxn(a[14], r[15]); a[15] = maxn(a[15], r[20])
    a[16] = maxn(a[16], r[18]); a[17] = maxn(a[17], r[23])
    a[18] = minn(a[18], r[24]); a[19] = maxn(a[19], r[26]); a[20] = maxn(a[20], r[28])
    if r[25] ~= nil then
        local back = r[29] - r[30] - r[32]
        if back < 1 then back = 1 end
        a[21] = a[21] + back; a[22] = a[22] + r[25] * back
    end
    a[23] = a[23] + r[29]; a[24] = a[24] + r[30] + r[32]
    -- v4: passive TCP RTT (33..36) and one-way delays (37..42) of the rollup
    local tn = z(r[33])
    a[25] = z(a[25]) + tn
    a[26] = minn(a[26], r[34]); a[27] = maxn(a[27], r[36])
    if r[35] ~= nil then a[28] = z(a[28]) + r[35] * tn else a[28] = z(a[28]) end
    local on = z(r[37])
    a[29] = z(a[29]) + on
    if r[38] ~= nil then a[30] = z(a[30]) + r[38] * on else a[30] = z(a[30]) end
    if r[40] ~= nil then a[31] = z(a[31]) + r[40] * on else a[31] = z(a[31]) end
    a[32] = maxn(a[32], r[39]); a[33] = maxn(a[33], r[41]); a[34] = maxn(a[34], r[42])
    -- v5: the bucket's seq range
    a[35] = minn(a[35], r[1]); a[36] = maxn(a[36], r[1])
end
-- adds aggregate b to aggregate a
local function merge(a, b)
    for i = 5, 13 do a[i] = a[i] + b[i] end
    for i = 14, 17 do a[i] = maxn(a[i], b[i]) end
    a[18] = minn(a[18], b[18]); a[19] = maxn(a[19], b[19]); a[20] = maxn(a[20], b[20])
    for i = 21, 24 do a[i] = a[i] + b[i] end
    a[25] = z(a[25]) + z(b[25]); a[28] = z(a[28]) + z(b[28]); a[29] = z(a[29]) + z(b[29])
    a[30] = z(a[30]) + z(b[30]); a[31] = z(a[31]) + z(b[31])
    a[26] = minn(a[26], b[26]); a[27] = maxn(a[27], b[27])
    for i = 32, 34 do a[i] = maxn(a[i], b[i]) end
    a[35] = minn(a[35], b[35]); a[36] = maxn(a[36], b[36])
end
-- a stored bucket with its seq range widened to [lo, hi] (merging an empty bucket fills the
-- fields a bucket stored before v4 lacks: no hole in the table)
local function widen(cur, lo, hi)
    local a = cur:totable()
    merge(a, empty(a[1], a[2], a[3], a[4]))
    a[35] = minn(a[35], lo); a[36] = maxn(a[36], hi)
    return a
end
local function key(link, start, boot)
    return tostring(link) .. ':' .. tostring(start) .. ':' .. tostring(boot)
end
local function add_delta(delta, r)
    local w = TIERS[1]
    local start = r[3] - r[3] % w
    local k = key(r[2], start, r[4])
    local a = delta[k]
    if a == nil then a = empty(w, r[2], start, r[4]); delta[k] = a end
    add_row(a, r)
end
local function mark(dirty, w, link, start, boot)
    local s = start - start % w
    dirty[key(link, s, boot)] = {link, s, boot}
end
-- the aggregate of one bucket from the level below
local function recompute(lvl, link, start, boot)
    local w = TIERS[lvl]
    local a = empty(w, link, start, boot)
    local stop = start + w
    if lvl == 1 then
        for _, t in box.space.rollups.index.identity:pairs({link, start}, {iterator = 'GE'}) do
            if t[2] ~= link or t[3] >= stop then break end
            if t[4] == boot then add_row(a, t) end
        end
    else
        local below = TIERS[lvl - 1]
        for _, t in box.space.tiers.index.primary:pairs({below, link, start}, {iterator = 'GE'}) do
            if t[1] ~= below or t[2] ~= link or t[3] >= stop then break end
            if t[4] == boot then merge(a, t) end
        end
    end
    return a
end
-- applies level-1 deltas (new rows) and dirty buckets (changed rows), level by level; `moved`
-- (rows put again unchanged, under a new seq) only widens their 10 s buckets' seq range
local function apply(delta, dirty, moved)
    local sp = box.space.tiers
    for lvl = 1, #TIERS do
        local up = TIERS[lvl + 1]
        local next_delta, next_dirty = {}, {}
        for _, d in pairs(dirty) do
            local a = recompute(lvl, d[1], d[2], d[3])
            if a[5] == 0 then sp:delete({a[1], a[2], a[3], a[4]}) else sp:replace(a) end
            if up ~= nil then mark(next_dirty, up, d[1], d[2], d[3]) end
        end
        for k, a in pairs(delta) do
            if dirty[k] == nil then
                local cur = sp:get({a[1], a[2], a[3], a[4]})
                if cur ~= nil then
                    local m = cur:totable()
                    merge(m, a)
                    sp:replace(m)
                else
                    sp:replace(a)
                end
                if up ~= nil then
                    local s = a[3] - a[3] % up
                    local pk = key(a[2], s, a[4])
                    local p = next_delta[pk]
                    if p == nil then p = empty(up, a[2], s, a[4]); next_delta[pk] = p end
                    merge(p, a)
                end
            end
        end
        delta, dirty = next_delta, next_dirty
    end
    -- last: a row put twice in one batch counted its first seq into a new bucket's delta
    for _, m in pairs(moved or {}) do
        local cur = sp:get({TIERS[1], m[1], m[2], m[3]})
        -- no bucket: retention removed it, and reads take windows before its cut from the
        -- identity index
        if cur ~= nil then sp:replace(widen(cur, m[4], m[4])) end
    end
end
local function same(a, b)
    for i = 2, @ROLLUP_FIELDS@ do
        if a[i] ~= b[i] then return false end
    end
    return true
end
-- runs f in a transaction: committed, or rolled back and its error raised
local function in_txn(f)
    box.begin()
    local ok, err = pcall(f)
    if not ok then
        box.rollback()
        error(err)
    end
    box.commit()
end
-- the next chunk of a resumable build whose marks in tiers_build are `stop_key` (the highest
-- seq when the build began) and `done_key`: the rows after done up to stop (at most `limit`),
-- the done mark to store with their work, and stop; nil once done
local function build_chunk(stop_key, done_key, limit)
    local b = box.space.tiers_build
    local st = b:get(stop_key)
    if st == nil then
        local top = box.space.rollups.index.primary:max()
        b:replace{stop_key, top and top[1] or 0}
        st = b:get(stop_key)
    end
    local stop = st[2]
    local done = b:get(done_key)
    done = done and done[2] or 0
    if done >= stop then return nil end
    local rows = {}
    for _, t in ipairs(box.space.rollups.index.primary:select({done},
            {iterator = 'GT', limit = limit})) do
        if t[1] > stop then break end
        rows[#rows + 1] = t
    end
    -- a full chunk ends at its last row; a short one reached stop
    local last = stop
    if #rows == limit then last = rows[#rows][1] end
    return rows, last, stop
end
"#;

fn lib() -> String {
    let tiers: Vec<String> = TIERS_NS.iter().map(u64::to_string).collect();
    TIER_LIB
        .replace("@TIERS@", &tiers.join(", "))
        .replace("@ROLLUP_FIELDS@", &super::FIELDS.len().to_string())
}

/// A stored function body: `f` with the tier helpers in scope.
fn with_lib(f: &str) -> String {
    format!(
        "function(...)\n{}\nlocal main = {f}\nreturn main(...)\nend",
        lib()
    )
}

/// Schema v2 → v3: the tier spaces, and the stored functions that maintain and read them
/// (`lp_put_rollups` is replaced by one that also maintains the tiers). The tiers of rows stored
/// before are built afterwards by `lp_tier_build` (see `build_in_chunks` in mod.rs), in chunks.
pub(crate) fn migration_v3() -> String {
    let format = super::schema::lua_format(TIER_FIELDS);
    // The helpers are made inside the called function: closures made while a persistent
    // function's body is loaded do not see the globals (tostring, box), closures made by a call do.
    let put = with_lib(
        r#"function(batch)
    local s = box.space.rollups
    local ident = s.index.identity
    local n = #batch
    local base = box.func.lp_seq_base:call()
    -- reserve the range before the first yield, so concurrent puts never share a seq
    rawset(_G, '__lp_seq', base + n)
    in_txn(function()
        local delta, dirty, moved = {}, {}, {}
        for i = 1, n do
            local row = batch[i]
            row[1] = base + i
            local old = ident:select({row[2], row[3], row[4]}, {limit = 1})[1]
            if old ~= nil then s:delete(old[1]) end
            s:replace(row)
            if old == nil then
                add_delta(delta, row)
            elseif not same(old, row) then
                mark(dirty, TIERS[1], row[2], row[3], row[4])
            else
                -- same figures, new seq: raw reads find rows by their bucket's seq range
                local st = row[3] - row[3] % TIERS[1]
                moved[key(row[2], st, row[4])] = {row[2], st, row[4], row[1]}
            end
        end
        apply(delta, dirty, moved)
    end)
    return n, base + n
end"#,
    );
    let build = with_lib(
        r#"function(limit)
    local rows, last, stop = build_chunk('stop', 'done', limit)
    if rows == nil then return true, 0 end
    in_txn(function()
        local delta = {}
        for _, t in ipairs(rows) do add_delta(delta, t) end
        apply(delta, {})
        box.space.tiers_build:replace{'done', last}
    end)
    return last >= stop, #rows
end"#,
    );
    let read = r#"function(tier, link, from_ns, to_ns, limit)
    local out = {}
    for _, t in box.space.tiers.index.primary:pairs({tier, link, from_ns}, {iterator = 'GE'}) do
        if t[1] ~= tier or t[2] ~= link or t[3] >= to_ns then break end
        if #out >= limit and out[#out][3] ~= t[3] then break end
        out[#out + 1] = t
    end
    return out
end"#;
    let trim = with_lib(
        r#"function(before_ns, limit)
    local sp = box.space.tiers
    local deleted = 0
    -- first (memtx, outside the vinyl transactions): windows before this may have lost their
    -- 10 s bucket while rows of them stay (see lp_read_range)
    local cut = before_ns - before_ns % TIERS[1]
    local meta = box.space._linkpulse_meta
    local cur = meta:get('tiers_cut')
    if cur == nil or cur[2] < cut then meta:replace{'tiers_cut', cut} end
    for _, w in ipairs(TIERS) do
        local link = 0
        while deleted < limit do
            local first = sp.index.primary:select({w, link}, {iterator = 'GE', limit = 1})[1]
            if first == nil or first[1] ~= w then break end
            link = first[2]
            local keys = {}
            for _, t in sp.index.primary:pairs({w, link}, {iterator = 'GE'}) do
                if t[1] ~= w or t[2] ~= link or t[3] + w > before_ns
                    or #keys >= math.min(1000, limit - deleted) then break end
                keys[#keys + 1] = {t[1], t[2], t[3], t[4]}
            end
            if #keys == 0 then
                link = link + 1
            else
                in_txn(function()
                    for _, k in ipairs(keys) do sp:delete(k) end
                end)
                deleted = deleted + #keys
            end
        end
    end
    return deleted
end"#,
    );
    format!(
        r#"{define}
local t = box.schema.space.create('tiers', {{engine = 'vinyl', if_not_exists = true, format = {{
    {format}
}}}})
t:create_index('primary', {{parts = {{{{1, 'unsigned'}}, {{2, 'unsigned'}}, {{3, 'unsigned'}},
    {{4, 'unsigned'}}}}, if_not_exists = true}})
local b = box.schema.space.create('tiers_build', {{engine = 'vinyl', if_not_exists = true,
    format = {{{{'key', 'string'}}, {{'seq', 'unsigned'}}}}}})
b:create_index('primary', {{parts = {{{{1, 'string'}}}}, if_not_exists = true}})
define('lp_put_rollups', {put:?})
define('lp_tier_build', {build:?})
define('lp_read_tier', {read:?})
define('lp_trim_tiers', {trim:?})
return true
"#,
        format = format,
        define = super::schema::LUA_DEFINE,
    )
}

/// A 10 s bucket whose seq range is wider than this many seqs per window (plus a constant) is
/// read by identity instead of scanning its range: with every link's windows interleaved
/// (`MAX_LINKS` = 32) a range holds ~32 seqs per window of the link; a row put much later (a
/// replayed window) widens its bucket's range to the seqs written in between.
const SPREAD_PER_WINDOW: u64 = 48;
const SPREAD_SLACK: u64 = 256;
/// Seq ranges closer than this are scanned as one (a new iterator costs about as much as
/// reading this many rows).
const SCAN_GAP: u64 = 256;

/// Schema v4 → v5: raw reads by link and time go through the 10 s buckets' seq ranges.
///
/// A read by the `identity` index looks each row up in the primary (`seq`), a 64 KiB page
/// read per row (and one per older run of the range, as the primary has no bloom filter
/// since v2): 47 s for one day of one link on the bench's 30-day store. The 10 s buckets now
/// keep the lowest and highest `seq` of their rows (fields `seq_min`, `seq_max`, maintained by
/// `lp_put_rollups` in the same transaction, widened also when a row is put again unchanged
/// under a new seq), so `lp_read_range` scans those seq ranges of the primary (merged when
/// close) and keeps the link's rows in the time range. The result is exact: every row is
/// counted in its 10 s bucket, and its seq is within that bucket's range. Exceptions, read
/// by identity as before: buckets whose range is much wider than their rows (a window put
/// again long after), buckets without a range (none after the build), and windows before
/// `tiers_cut` in `_linkpulse_meta` (tier retention may have removed their bucket while rows
/// of them stay: `lp_trim` deletes a prefix of the seq order); the build raises that cut past
/// any row it finds without a bucket. Reads run in one transaction (one read view), so a row
/// moved to a new seq meanwhile is seen exactly once; the cut (memtx) is read outside it, before
/// and after, and a read that saw it rise (tier retention raises it before deleting buckets)
/// is done again with the new cut.
///
/// `lp_seq_build` fills the ranges of buckets stored before v5 from the rows, in seq order and
/// chunks, with its progress (`seq_stop`, `seq_done` in `tiers_build`) committed with each
/// chunk, like `lp_tier_build`.
pub(crate) fn migration_v5() -> String {
    let format = super::schema::lua_format(TIER_FIELDS);
    let read = with_lib(
        &r#"function(link, from_ns, to_ns, limit)
    local W = TIERS[1]
    local ident = box.space.rollups.index.identity
    local pk = box.space.rollups.index.primary
    local out = {}
    -- appends sorted rows while the page has room; false once it is full (a page never ends
    -- inside one window start)
    local function take(rows)
        for _, t in ipairs(rows) do
            if #out >= limit and out[#out][3] ~= t[3] then return false end
            out[#out + 1] = t
        end
        return true
    end
    local function by_identity(lo, hi, boot, into)
        for _, t in ident:pairs({link, lo}, {iterator = 'GE'}) do
            if t[2] ~= link or t[3] >= hi then break end
            if boot == nil or t[4] == boot then into[#into + 1] = t end
        end
    end
    local function cmp(a, b)
        if a[3] ~= b[3] then return a[3] < b[3] end
        return a[4] < b[4]
    end
    -- the rows of a run of consecutive buckets, windows in [lo, hi)
    local function scan(batch, lo, hi)
        local ranges, odd, rows = {}, {}, {}
        local odd_rows = {}
        for _, b in ipairs(batch) do
            local mn, mx = b[35], b[36]
            if mn == nil or mx - mn > @SPREAD@ * b[5] + @SLACK@ then
                odd[key(link, b[3], b[4])] = true
                local l = b[3]
                if l < lo then l = lo end
                local h = b[3] + W
                if h > hi then h = hi end
                by_identity(l, h, b[4], odd_rows)
            else
                ranges[#ranges + 1] = {mn, mx}
            end
        end
        local any_odd = next(odd) ~= nil
        for _, t in ipairs(odd_rows) do rows[#rows + 1] = t end
        table.sort(ranges, function(a, b) return a[1] < b[1] end)
        local i = 1
        while i <= #ranges do
            local first, last = ranges[i][1], ranges[i][2]
            i = i + 1
            while i <= #ranges and ranges[i][1] <= last + @GAP@ do
                if ranges[i][2] > last then last = ranges[i][2] end
                i = i + 1
            end
            for _, t in pk:pairs({first}, {iterator = 'GE'}) do
                if t[1] > last then break end
                if t[2] == link then
                    local ws = t[3]
                    if ws >= lo and ws < hi and
                        (not any_odd or not odd[key(link, ws - ws % W, t[4])]) then
                        rows[#rows + 1] = t
                    end
                end
            end
        end
        -- seq order is window order but for late rows and odd buckets: sort only then
        local sorted = #odd_rows == 0
        for j = 2, #rows do
            if sorted and not cmp(rows[j - 1], rows[j]) then sorted = false break end
        end
        if not sorted then table.sort(rows, cmp) end
        return take(rows)
    end
    local function once(cut)
        -- a copy: a second attempt starts where the first did
        local from_ns = from_ns
        out = {}
        box.begin()
        local ok, err = pcall(function()
            if from_ns < cut then
                local hi = to_ns
                if hi > cut then hi = cut end
                local rows = {}
                by_identity(from_ns, hi, nil, rows)
                if not take(rows) then return end
                from_ns = hi
            end
            if from_ns >= to_ns then return end
            local batch, expect = {}, 0
            for _, b in box.space.tiers.index.primary:pairs({W, link, from_ns - from_ns % W},
                    {iterator = 'GE'}) do
                if b[1] ~= W or b[2] ~= link or b[3] >= to_ns then break end
                -- a batch ends between two bucket starts once it holds the rows the page lacks
                if #batch > 0 and b[3] ~= batch[#batch][3] and expect >= limit - #out then
                    local lo = batch[1][3]
                    if lo < from_ns then lo = from_ns end
                    local hi = batch[#batch][3] + W
                    if hi > to_ns then hi = to_ns end
                    if not scan(batch, lo, hi) then return end
                    if #out >= limit then return end
                    batch, expect = {}, 0
                end
                batch[#batch + 1] = b
                expect = expect + b[5]
            end
            if #batch > 0 then
                local lo = batch[1][3]
                if lo < from_ns then lo = from_ns end
                scan(batch, lo, to_ns)
            end
        end)
        box.commit()
        if not ok then error(err) end
    end
    -- memtx, so outside the vinyl transaction; tier retention raises the cut before it deletes
    -- buckets, so a deletion the read saw shows as a higher cut after it: read again
    local meta = box.space._linkpulse_meta
    local function get_cut()
        local c = meta:get('tiers_cut')
        return c and c[2] or 0
    end
    local cut = get_cut()
    while true do
        once(cut)
        local now = get_cut()
        if now == cut then return out end
        cut = now
    end
end"#
            .replace("@SPREAD@", &SPREAD_PER_WINDOW.to_string())
            .replace("@SLACK@", &SPREAD_SLACK.to_string())
            .replace("@GAP@", &SCAN_GAP.to_string()),
    );
    let build = with_lib(
        r#"function(limit)
    local W = TIERS[1]
    local sp = box.space.tiers
    local rows, last, stop = build_chunk('seq_stop', 'seq_done', limit)
    if rows == nil then return true, 0 end
    local span = {}
    for _, t in ipairs(rows) do
        local s = t[3] - t[3] % W
        local k = key(t[2], s, t[4])
        local x = span[k]
        -- rows come in seq order: the first is the lowest
        if x == nil then span[k] = {t[2], s, t[4], t[1], t[1]} else x[5] = t[1] end
    end
    -- rows whose bucket retention removed: raise the cut past them first (memtx, outside the
    -- vinyl transaction), so that a crash after the chunk never leaves one unread
    local meta = box.space._linkpulse_meta
    local cut = meta:get('tiers_cut')
    cut = cut and cut[2] or 0
    local raised = cut
    for _, x in pairs(span) do
        if sp:get({W, x[1], x[2], x[3]}) == nil and x[2] + W > raised then raised = x[2] + W end
    end
    if raised > cut then meta:replace{'tiers_cut', raised} end
    in_txn(function()
        for _, x in pairs(span) do
            local cur = sp:get({W, x[1], x[2], x[3]})
            if cur ~= nil then sp:replace(widen(cur, x[4], x[5])) end
        end
        box.space.tiers_build:replace{'seq_done', last}
    end)
    return last >= stop, #rows
end"#,
    );
    format!(
        r#"{define}
box.space.tiers:format({{{format}}})
define('lp_read_range', {read:?})
define('lp_seq_build', {build:?})
{v3}"#,
        define = super::schema::LUA_DEFINE,
        v3 = migration_v3(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_field_order_matches_tuple_format() {
        let named = rmp_serde::to_vec_named(&TierRow::default()).expect("encode");
        let mut rd = named.as_slice();
        let n = rmp::decode::read_map_len(&mut rd).expect("map") as usize;
        let mut names = Vec::new();
        for _ in 0..n {
            let len = rmp::decode::read_str_len(&mut rd).expect("key") as usize;
            names.push(String::from_utf8(rd[..len].to_vec()).expect("utf8"));
            rd = &rd[len..];
            rd = crate::tarantool::skip_value(rd).expect("value");
        }
        let expected: Vec<&str> = TIER_FIELDS.iter().map(|f| f.0).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn each_tier_divides_the_next() {
        for w in TIERS_NS.windows(2) {
            assert_eq!(w[1] % w[0], 0);
        }
    }

    #[test]
    fn lua_strings_are_plain_lua_literals() {
        // `{:?}` of a Rust string is a valid Lua string literal only without non-ASCII and
        // escapes Lua does not know; the bodies are ASCII.
        assert!(migration_v3().is_ascii());
        assert!(!migration_v3().contains("\\u{"));
        assert!(migration_v5().is_ascii());
        assert!(!migration_v5().contains("\\u{"));
        assert!(!migration_v5().contains('@'), "a placeholder left");
    }
}
