//! Fetching `http(s)` image URLs, for servers started with `--allow-remote-images`: public
//! addresses only (every address the name resolves to is checked, and the connection goes to
//! a checked address, so a name cannot be re-pointed at a private one in between), ten seconds
//! at most, and no more than the image size limit.

use std::io::Read;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

/// Whether `ip` is a public unicast address (not loopback, private, link-local, shared,
/// documentation, multicast or unspecified).
fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_broadcast()
                || v4.is_documentation()
                || v4.is_unspecified()
                || v4.is_multicast()
                || a == 0
                || (a == 100 && (64..128).contains(&b)) // shared address space
                || (a == 198 && (b == 18 || b == 19)) // benchmarking
                || a >= 240)
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00 // unique local
                || (first & 0xffc0) == 0xfe80 // link local
                || first == 0x2001 && v6.segments()[1] == 0x0db8) // documentation
        }
    }
}

/// The addresses `host:port` resolves to, all of them public, or why not.
fn vetted(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve {host}: {e}"))?
        .collect();
    if addrs.is_empty() {
        return Err(format!("{host} resolves to no address"));
    }
    if let Some(bad) = addrs.iter().find(|a| !is_public(a.ip())) {
        return Err(format!(
            "{host} resolves to {}, which is not a public address; remote images must be on \
             the public internet",
            bad.ip()
        ));
    }
    Ok(addrs)
}

/// The bytes at `url`, at most `limit` of them.
pub fn fetch(url: &str, limit: usize) -> Result<Vec<u8>, String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("malformed image URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("image URLs must be http or https".into());
    }
    let host = parsed
        .host_str()
        .ok_or("the image URL has no host")?
        .trim_matches(['[', ']'])
        .to_string();
    let port = parsed.port_or_known_default().unwrap_or(443);
    let addrs = vetted(&host, port)?;
    let agent = ureq::AgentBuilder::new()
        .timeout(Duration::from_secs(10))
        .redirects(0)
        .resolver(move |_: &str| Ok(addrs.clone()))
        .build();
    let response = agent
        .get(url)
        .call()
        .map_err(|e| format!("fetching the image failed: {e}"))?;
    let mut bytes = Vec::new();
    response
        .into_reader()
        .take(limit as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the image failed: {e}"))?;
    if bytes.len() > limit {
        return Err(format!(
            "the image is larger than the limit of {limit} bytes"
        ));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fd00::1",
            "fe80::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
        for public in ["1.1.1.1", "8.8.8.8", "2606:4700::1111"] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        assert!(vetted("localhost", 80).is_err());
        assert!(fetch("file:///etc/passwd", 10).is_err());
        assert!(
            fetch("http://127.0.0.1:1/x.png", 10)
                .unwrap_err()
                .contains("not a public")
        );
    }
}
