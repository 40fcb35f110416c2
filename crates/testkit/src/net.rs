//! Ports for servers a test starts in another process (or restarts on the
//! same port). Binding port 0 and dropping the listener hands back a port
//! from the kernel's ephemeral range, which the very next `bind(0)` or
//! outgoing connection of a parallel test may take before the child binds
//! it: the child then fails to start, or the test talks TLS to another
//! test's server (`UnknownIssuer`). Ports here come from below that range
//! (the kernel never picks them on its own), each handed out once per
//! process, starting at an offset taken from the process id so concurrent
//! test binaries walk different stretches.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};

/// The stretch handed out: above the well-known and registered ports
/// commonly in use on a developer machine, below Linux's default
/// ephemeral range (32768–60999).
const FIRST: u32 = 20_000;
const LAST: u32 = 32_767;

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A TCP port on 127.0.0.1 that no other test in this process was given
/// and that is free right now.
pub fn free_port() -> u16 {
    free_port_on(IpAddr::V4(Ipv4Addr::LOCALHOST))
}

/// `127.0.0.1:`[`free_port`].
pub fn free_addr() -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), free_port())
}

/// A TCP port on `ip` that no other test in this process was given and
/// that is free right now (on `ip` and on the wildcard address, so a
/// server binding either can take it).
pub fn free_port_on(ip: IpAddr) -> u16 {
    let span = LAST - FIRST + 1;
    let start = std::process::id().wrapping_mul(7919) % span;
    let candidates = (0..span).map(|_| {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        (FIRST + (start + n) % span) as u16
    });
    first_free(ip, candidates).unwrap_or_else(|| panic!("no free port on {ip} in {FIRST}..={LAST}"))
}

/// The first of `candidates` that `ip` (and the wildcard address) can bind.
fn first_free(ip: IpAddr, candidates: impl IntoIterator<Item = u16>) -> Option<u16> {
    candidates.into_iter().find(|&port| {
        let wildcard = SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port);
        TcpListener::bind(SocketAddr::new(ip, port)).is_ok()
            && (ip.is_unspecified() || TcpListener::bind(wildcard).is_ok())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_outside_the_ephemeral_range_and_never_repeat() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        assert!(ports.iter().all(|p| (20_000..32_768).contains(p)));
    }

    #[test]
    fn a_port_taken_by_someone_else_is_skipped() {
        let held = TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = held.local_addr().unwrap().port();
        let free = free_port();
        let lo = IpAddr::V4(Ipv4Addr::LOCALHOST);
        assert_eq!(first_free(lo, [taken, free]), Some(free));
        assert_eq!(first_free(lo, [taken]), None);
    }
}
