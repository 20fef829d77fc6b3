//! IPv6 extension headers between the fixed header and the transport header (RFC 8200 §4),
//! stepped over the same way by the kernel programs (packet loads) and the ground truth
//! (slices), so that a TCP segment or a probe carrying, say, a destination options header is
//! matched like any other.

pub const IPV6_HOP_BY_HOP: u8 = 0;
pub const IPV6_ROUTING: u8 = 43;
pub const IPV6_FRAGMENT: u8 = 44;
pub const IPV6_AUTH: u8 = 51;
pub const IPV6_DEST_OPTS: u8 = 60;

/// Extension headers stepped over at most; a packet with more gives no transport header (the
/// kernel's loop must be bounded, and real packets carry one or two).
pub const IPV6_MAX_EXT: usize = 4;

/// `nh` is an extension header this module steps over (ESP is not: what follows is encrypted).
#[inline(always)]
pub fn is_ipv6_ext(nh: u8) -> bool {
    matches!(
        nh,
        IPV6_HOP_BY_HOP | IPV6_ROUTING | IPV6_FRAGMENT | IPV6_AUTH | IPV6_DEST_OPTS
    )
}

/// One step over extension header `nh`, whose first four bytes are `hdr`: its next header and
/// its length. None for a fragment other than the first (no transport header in it).
#[inline(always)]
pub fn ipv6_ext_next(nh: u8, hdr: [u8; 4]) -> Option<(u8, usize)> {
    let len = match nh {
        // Fragment offset: the top 13 bits of bytes 2..4.
        IPV6_FRAGMENT if u16::from_be_bytes([hdr[2], hdr[3]]) & 0xfff8 != 0 => return None,
        IPV6_FRAGMENT => 8,
        // AH counts 4-byte units minus 2, the others 8-byte units minus 1.
        IPV6_AUTH => (hdr[1] as usize + 2) * 4,
        _ => (hdr[1] as usize + 1) * 8,
    };
    Some((hdr[0], len))
}

/// The transport header of the IPv6 packet `pkt` (from its fixed header on): offset and
/// protocol. None when cut short, a later fragment, or more than [`IPV6_MAX_EXT`] extension
/// headers.
pub fn ipv6_transport(pkt: &[u8]) -> Option<(usize, u8)> {
    let mut nh = *pkt.get(6)?;
    let mut off = 40;
    for _ in 0..IPV6_MAX_EXT {
        if !is_ipv6_ext(nh) {
            return Some((off, nh));
        }
        let h = pkt.get(off..off + 4)?;
        let (next, len) = ipv6_ext_next(nh, [h[0], h[1], h[2], h[3]])?;
        nh = next;
        off += len;
    }
    (!is_ipv6_ext(nh)).then_some((off, nh))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed header with next header `nh`, then `ext` (up to 64 bytes), zero-padded to 128.
    fn packet(nh: u8, ext: &[u8]) -> [u8; 128] {
        let mut p = [0u8; 128];
        p[0] = 0x60;
        p[6] = nh;
        p[40..40 + ext.len()].copy_from_slice(ext);
        p
    }

    #[test]
    fn no_extension_header() {
        assert_eq!(ipv6_transport(&packet(6, &[])), Some((40, 6)));
        assert_eq!(ipv6_transport(&packet(17, &[])), Some((40, 17)));
        // ESP is the transport as far as we can see.
        assert_eq!(ipv6_transport(&packet(50, &[])), Some((40, 50)));
    }

    #[test]
    fn hop_by_hop_then_destination_options_then_tcp() {
        // HBH of 8 bytes (len 0) → DestOpts of 16 bytes (len 1) → TCP.
        let mut ext = [0u8; 24];
        ext[0] = IPV6_DEST_OPTS;
        ext[8] = 6;
        ext[9] = 1;
        assert_eq!(ipv6_transport(&packet(0, &ext)), Some((64, 6)));
    }

    #[test]
    fn fragments_and_auth() {
        // First fragment (offset 0, more fragments): the transport header follows.
        let first = [17, 0, 0x00, 0x01, 1, 2, 3, 4];
        assert_eq!(ipv6_transport(&packet(44, &first)), Some((48, 17)));
        // A later fragment (offset 185 × 8): none.
        let later = [17, 0, 0x05, 0xc9, 1, 2, 3, 4];
        assert_eq!(ipv6_transport(&packet(44, &later)), None);
        // AH with payload length 4: (4 + 2) × 4 = 24 bytes.
        let mut ah = [0u8; 24];
        ah[0] = 6;
        ah[1] = 4;
        assert_eq!(ipv6_transport(&packet(51, &ah)), Some((64, 6)));
    }

    #[test]
    fn too_many_headers_and_cut_short() {
        // Five destination options headers of 8 bytes chained: over the bound.
        let mut five = [0u8; 40];
        for i in 0..5 {
            five[i * 8] = if i < 4 { IPV6_DEST_OPTS } else { 6 };
        }
        assert_eq!(ipv6_transport(&packet(60, &five)), None);
        // Four is fine.
        five[24] = 6;
        assert_eq!(ipv6_transport(&packet(60, &five)), Some((72, 6)));
        // A header that claims to run past the packet's end gives an offset the caller's
        // bounds check refuses; one whose first bytes are missing gives None.
        let p = packet(60, &[6, 255]);
        assert_eq!(ipv6_transport(&p), Some((40 + 2048, 6)));
        assert_eq!(ipv6_transport(&p[..42]), None);
        assert_eq!(ipv6_transport(&p[..5]), None);
    }

    #[test]
    fn arbitrary_bytes_never_panic() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..20_000 {
            let mut p = [0u8; 96];
            for b in p.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x as u8;
            }
            // Favour the extension header numbers so chains are walked.
            p[6] = [0, 43, 44, 51, 60, p[6]][(x % 6) as usize];
            let len = (x >> 8) as usize % 97;
            if let Some((off, nh)) = ipv6_transport(&p[..len]) {
                assert!(off >= 40 && !is_ipv6_ext(nh));
            }
        }
    }
}
