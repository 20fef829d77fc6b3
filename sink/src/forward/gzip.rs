//! gzip (RFC 1952) of request bodies with one reused deflate state.
//!
//! `flate2::write::GzEncoder` cannot be reset, so each batch would allocate and zero a fresh
//! compressor (hundreds of KB); here the raw deflate stream is reset per body and the 10-byte
//! header and 8-byte trailer are written by hand.

use flate2::write::DeflateEncoder;
use flate2::{Compression, Crc};
use std::io::Write;

/// Level 1: a 5,000-point batch shrinks ~10x (480 KB → 50 KB, shared notes/services.md) at a
/// fraction of the CPU of higher levels; what matters on a cellular uplink is the first 10x.
/// flate2 runs on zlib-rs (workspace Cargo.toml), faster at this level than its default
/// miniz_oxide; the backfill bench times both.
const LEVEL: u32 = 1;

/// Header: magic, CM=8 (deflate), no flags, no mtime, XFL=4 (fastest), OS=255 (unknown).
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 4, 255];

pub struct Gzip {
    /// Boxed: zlib-rs keeps a few hundred bytes of state inline, and batch buffers move around.
    enc: Box<DeflateEncoder<Vec<u8>>>,
}

impl Gzip {
    pub fn new() -> Gzip {
        Gzip {
            enc: Box::new(DeflateEncoder::new(Vec::new(), Compression::new(LEVEL))),
        }
    }

    /// Compresses `input` into `out` (cleared first; its capacity is kept across calls).
    pub fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> std::io::Result<()> {
        out.clear();
        out.extend_from_slice(&HEADER);
        // reset() finishes nothing and hands back the previous writer; swap `out` in.
        let _ = self.enc.reset(std::mem::take(out))?;
        self.enc.write_all(input)?;
        self.enc.try_finish()?;
        *out = self.enc.reset(Vec::new())?;
        let mut crc = Crc::new();
        crc.update(input);
        out.extend_from_slice(&crc.sum().to_le_bytes());
        // ISIZE is the input length modulo 2^32 (RFC 1952).
        out.extend_from_slice(&(input.len() as u32).to_le_bytes());
        Ok(())
    }
}

impl Default for Gzip {
    fn default() -> Self {
        Gzip::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn round_trips_through_a_standard_decoder_with_reuse() {
        let mut gz = Gzip::new();
        let mut out = Vec::new();
        for n in [0usize, 1, 1000, 200_000] {
            let input: Vec<u8> = (0..n).map(|i| (i % 251) as u8 ^ (i / 7) as u8).collect();
            gz.compress(&input, &mut out).expect("compress");
            let mut back = Vec::new();
            flate2::read::GzDecoder::new(out.as_slice())
                .read_to_end(&mut back)
                .expect("valid gzip");
            assert_eq!(back, input, "n={n}");
        }
    }

    #[test]
    fn compresses_line_protocol() {
        let line = b"linkpulse_rollup,boot=1,link=3,router=r1 rx_bytes=1000i,rx_rate_mean_bps=12.5 1790000000000000000\n";
        let input: Vec<u8> = line
            .iter()
            .copied()
            .cycle()
            .take(line.len() * 1000)
            .collect();
        let mut out = Vec::new();
        Gzip::new().compress(&input, &mut out).expect("compress");
        assert!(
            out.len() * 10 < input.len(),
            "{} of {}",
            out.len(),
            input.len()
        );
    }
}
