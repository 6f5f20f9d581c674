//! Conversions between `std::net` addresses and the kernel-order [`Endpoint`] of `proxy-common`.
//!
//! An `Endpoint` keeps the address bytes and the port bytes in network order, as the kernel hands
//! them to BPF programs; IPv4 is stored v4-mapped. Converting through `to_ne_bytes`/`from_ne_bytes`
//! keeps the in-memory byte sequence, which is what network order means here.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use proxy_common::Endpoint;

/// The endpoint for `addr`. An IPv6 address that is v4-mapped gives the same endpoint as the
/// IPv4 address it maps, matching what the kernel programs see from dual-stack sockets.
pub(crate) fn endpoint(addr: SocketAddr) -> Endpoint {
    let ip6 = match addr {
        SocketAddr::V4(v4) => v4.ip().to_ipv6_mapped(),
        SocketAddr::V6(v6) => *v6.ip(),
    };
    let octets = ip6.octets();
    let word =
        |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    Endpoint::v6(
        [word(0), word(4), word(8), word(12)],
        u16::from_ne_bytes(addr.port().to_be_bytes()),
    )
}

/// `addr` with a v4-mapped IPv6 address turned into the IPv4 address it maps.
pub(crate) fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// The socket address of `endpoint`: IPv4 for a v4-mapped endpoint, IPv6 otherwise.
pub(crate) fn socket_addr(endpoint: &Endpoint) -> SocketAddr {
    let port = u16::from_be_bytes(endpoint.port.to_ne_bytes());
    if endpoint.is_v4() {
        return SocketAddrV4::new(Ipv4Addr::from(endpoint.ip4().to_ne_bytes()), port).into();
    }
    let mut octets = [0u8; 16];
    for (chunk, word) in octets.chunks_exact_mut(4).zip(endpoint.ip) {
        chunk.copy_from_slice(&word.to_ne_bytes());
    }
    SocketAddrV6::new(Ipv6Addr::from(octets), port, 0, 0).into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proxy_common::V4_MAPPED_WORD;

    #[test]
    fn ipv4_is_stored_v4_mapped_in_network_order() {
        let e = endpoint("10.96.0.10:8080".parse().unwrap());
        assert!(e.is_v4());
        assert_eq!(e.ip[..3], [0, 0, V4_MAPPED_WORD]);
        assert_eq!(e.ip4().to_ne_bytes(), [10, 96, 0, 10]);
        assert_eq!(e.port.to_ne_bytes(), [0x1f, 0x90]);
        assert_eq!(e._pad, 0);
    }

    #[test]
    fn mapped_ipv6_and_ipv4_are_the_same_key() {
        let v4 = endpoint("10.96.0.10:80".parse().unwrap());
        let mapped = endpoint("[::ffff:10.96.0.10]:80".parse().unwrap());
        assert_eq!(v4, mapped);
        assert_eq!(
            socket_addr(&mapped),
            "10.96.0.10:80".parse::<SocketAddr>().unwrap()
        );
    }

    #[test]
    fn ipv6_keeps_its_bytes() {
        let addr: SocketAddr = "[fd00:96::10]:443".parse().unwrap();
        let e = endpoint(addr);
        assert!(!e.is_v4());
        assert_eq!(e.ip[0].to_ne_bytes(), [0xfd, 0x00, 0x00, 0x96]);
        assert_eq!(socket_addr(&e), addr);
    }

    #[test]
    fn canonical_unmaps_ipv4() {
        let mapped: SocketAddr = "[::ffff:10.0.0.1]:15001".parse().unwrap();
        assert_eq!(
            canonical(mapped),
            "10.0.0.1:15001".parse::<SocketAddr>().unwrap()
        );
        let v6: SocketAddr = "[fd00::1]:15001".parse().unwrap();
        assert_eq!(canonical(v6), v6);
    }

    #[test]
    fn round_trips() {
        for addr in [
            "0.0.0.0:1",
            "255.255.255.255:65535",
            "[::1]:15001",
            "[2001:db8::1]:9",
        ] {
            let addr: SocketAddr = addr.parse().unwrap();
            assert_eq!(socket_addr(&endpoint(addr)), addr);
        }
    }
}
