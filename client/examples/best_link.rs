//! An example controller: every millisecond, the link with the most download bytes in that
//! millisecond, from linkpulse's stream.
//!
//!     cargo run -p linkpulse-client --example best_link -- /run/linkpulse/stream.sock
use linkpulse_client::{StreamClient, Subscription, VALID_TRAFFIC};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "/run/linkpulse/stream.sock".into());
    let limit: Option<u64> = std::env::args().nth(2).and_then(|s| s.parse().ok());
    let mut c = StreamClient::connect(
        &path,
        Subscription {
            link_mask: 0,
            decimation: 1,
        },
    )?;
    // 1 ms of bins per frame, whatever the bin width.
    let per_ms = (1_000_000 / c.hello().bin_width_ns).max(1) as u32;
    drop(c);
    c = StreamClient::connect(
        &path,
        Subscription {
            link_mask: 0,
            decimation: per_ms,
        },
    )?;
    let names: Vec<(u32, String)> = c
        .links()
        .iter()
        .map(|l| (l.index, l.interface.clone()))
        .collect();
    let mut n = 0u64;
    loop {
        let f = c.next_frame()?;
        let best = f
            .records()
            .filter(|r| r.valid & VALID_TRAFFIC != 0)
            .max_by_key(|r| r.bytes[0]);
        let name = |i: u32| {
            names
                .iter()
                .find(|(x, _)| *x == i)
                .map_or("?", |(_, n)| n.as_str())
        };
        match best {
            Some(r) => println!(
                "{} best {} ({} B down)",
                f.header.bin_start_utc_ns,
                name(r.index),
                r.bytes[0]
            ),
            None => println!("{} no measured link", f.header.bin_start_utc_ns),
        }
        if f.header.dropped_before > 0 {
            eprintln!("lost {} frames", f.header.dropped_before);
        }
        n += 1;
        if limit.is_some_and(|l| n >= l) {
            return Ok(());
        }
    }
}
