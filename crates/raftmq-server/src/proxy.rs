//! The PROXY protocol (HAProxy, versions 1 and 2): the header a load balancer sends before the
//! client's bytes, telling the address of the client it forwards.
//!
//! [`parse`] is sans-IO (bytes in, header out; `Ok(None)` when more bytes are needed);
//! [`read_header`] reads one from a socket and returns the bytes that followed it.

use bytes::{Buf, Bytes, BytesMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The v2 signature (12 bytes).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
/// The v1 prefix.
const V1_PREFIX: &[u8; 6] = b"PROXY ";
/// Longest v1 header, CRLF included (spec §2.1).
const V1_MAX: usize = 107;
/// Longest v2 address block accepted (addresses plus TLVs); anything longer is refused.
const V2_MAX_LEN: usize = 2048;

/// Why a PROXY header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProxyError {
    #[error("not a PROXY protocol header")]
    NotProxy,
    #[error("invalid PROXY protocol header: {0}")]
    Invalid(&'static str),
    #[error("connection closed before the PROXY protocol header was complete")]
    Eof,
    #[error("reading the PROXY protocol header: {0}")]
    Io(String),
}

/// A parsed header: the client address (`None` for a `LOCAL`/`UNKNOWN` header or a non-IP
/// family, meaning "use the socket's peer") and the number of bytes it took.
pub type Parsed = (Option<SocketAddr>, usize);

/// Parses a PROXY header at the start of `buf`: `Ok(None)` if more bytes are needed.
pub fn parse(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    type Parser = fn(&[u8]) -> Result<Option<Parsed>, ProxyError>;
    let versions: [(&[u8], Parser); 2] = [(V2_SIGNATURE, parse_v2), (V1_PREFIX, parse_v1)];
    for (start, parse_rest) in versions {
        let n = buf.len().min(start.len());
        if buf[..n] == start[..n] {
            // A header of this version, or the beginning of one.
            return if n < start.len() {
                Ok(None)
            } else {
                parse_rest(buf)
            };
        }
    }
    Err(ProxyError::NotProxy)
}

fn parse_v1(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    let window = &buf[..buf.len().min(V1_MAX)];
    let Some(end) = window.windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() >= V1_MAX {
            Err(ProxyError::Invalid("v1 header longer than 107 bytes"))
        } else {
            Ok(None)
        };
    };
    let line = std::str::from_utf8(&buf[V1_PREFIX.len()..end])
        .map_err(|_| ProxyError::Invalid("v1 header is not ASCII"))?;
    let consumed = end + 2;
    let fields: Vec<&str> = line.split(' ').collect();
    match fields.as_slice() {
        ["UNKNOWN", ..] => Ok(Some((None, consumed))),
        [proto @ ("TCP4" | "TCP6"), src, dst, sport, dport] => {
            let src: IpAddr = src
                .parse()
                .map_err(|_| ProxyError::Invalid("v1 source address"))?;
            let _: IpAddr = dst
                .parse()
                .map_err(|_| ProxyError::Invalid("v1 destination address"))?;
            if (*proto == "TCP4") != src.is_ipv4() {
                return Err(ProxyError::Invalid("v1 address family mismatch"));
            }
            let port = |s: &str| {
                // No sign, no leading zeros (spec §2.1).
                if s.is_empty() || s.starts_with('+') || (s.len() > 1 && s.starts_with('0')) {
                    return Err(ProxyError::Invalid("v1 port"));
                }
                s.parse::<u16>().map_err(|_| ProxyError::Invalid("v1 port"))
            };
            let sport = port(sport)?;
            port(dport)?;
            Ok(Some((Some(SocketAddr::new(src, sport)), consumed)))
        }
        _ => Err(ProxyError::Invalid("v1 header fields")),
    }
}

fn parse_v2(buf: &[u8]) -> Result<Option<Parsed>, ProxyError> {
    if buf.len() < 16 {
        return Ok(None);
    }
    let ver_cmd = buf[12];
    let family = buf[13];
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if ver_cmd >> 4 != 2 {
        return Err(ProxyError::Invalid("v2 version"));
    }
    if len > V2_MAX_LEN {
        return Err(ProxyError::Invalid("v2 header too long"));
    }
    if buf.len() < 16 + len {
        return Ok(None);
    }
    let body = &buf[16..16 + len];
    let consumed = 16 + len;
    match ver_cmd & 0x0F {
        // LOCAL: a health check by the proxy itself; the socket's peer stands.
        0 => return Ok(Some((None, consumed))),
        1 => {}
        _ => return Err(ProxyError::Invalid("v2 command")),
    }
    let addr = match family >> 4 {
        // AF_INET
        1 => {
            if body.len() < 12 {
                return Err(ProxyError::Invalid("v2 IPv4 address block too short"));
            }
            let ip = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let port = u16::from_be_bytes([body[8], body[9]]);
            Some(SocketAddr::new(IpAddr::V4(ip), port))
        }
        // AF_INET6
        2 => {
            if body.len() < 36 {
                return Err(ProxyError::Invalid("v2 IPv6 address block too short"));
            }
            let mut octets = [0u8; 16];
            octets.copy_from_slice(&body[..16]);
            let port = u16::from_be_bytes([body[32], body[33]]);
            Some(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(octets)), port))
        }
        // AF_UNSPEC, AF_UNIX: no IP address to report.
        0 | 3 => None,
        _ => return Err(ProxyError::Invalid("v2 address family")),
    };
    Ok(Some((addr, consumed)))
}

/// Reads a PROXY header from `stream`; returns the client address it names (if any) and the
/// bytes read past the header (the start of the client's own stream).
pub async fn read_header<S: AsyncRead + Unpin>(
    stream: &mut S,
) -> Result<(Option<SocketAddr>, Bytes), ProxyError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        if let Some((addr, consumed)) = parse(&buf)? {
            buf.advance(consumed);
            return Ok((addr, buf.freeze()));
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Err(ProxyError::Eof),
            Ok(_) => {}
            Err(e) => return Err(ProxyError::Io(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(cmd: u8, family: u8, body: &[u8]) -> Vec<u8> {
        let mut out = V2_SIGNATURE.to_vec();
        out.push(0x20 | cmd);
        out.push(family);
        out.extend_from_slice(&u16::try_from(body.len()).expect("len").to_be_bytes());
        out.extend_from_slice(body);
        out
    }

    #[test]
    fn v1_tcp4_and_tcp6_give_the_source_address() {
        let h = b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 1883\r\nMQTT";
        assert_eq!(
            parse(h),
            Ok(Some((
                Some("192.0.2.7:40000".parse().expect("addr")),
                h.len() - 4
            )))
        );
        let h = b"PROXY TCP6 2001:db8::1 2001:db8::2 5 1883\r\n";
        assert_eq!(
            parse(h),
            Ok(Some((
                Some("[2001:db8::1]:5".parse().expect("addr")),
                h.len()
            )))
        );
        assert_eq!(parse(b"PROXY UNKNOWN\r\n"), Ok(Some((None, 15))));
    }

    #[test]
    fn v1_incomplete_and_invalid_headers() {
        assert_eq!(parse(b"PRO"), Ok(None));
        assert_eq!(parse(b"PROXY TCP4 1.2.3.4"), Ok(None));
        assert_eq!(parse(b"\x10\x0c\x00\x04MQTT"), Err(ProxyError::NotProxy));
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 ::1 ::1 1 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4 5.6.7.8 70000 2\r\n").is_err());
        assert!(parse(b"PROXY TCP4 1.2.3.4\r\n").is_err());
        assert!(parse(&[b'P', b'R', b'O', b'X', b'Y', b' '].repeat(20)).is_err());
    }

    #[test]
    fn v2_inet_inet6_local_and_errors() {
        let body = [10, 0, 0, 9, 10, 0, 0, 1, 0x9c, 0x40, 0x07, 0x5b];
        let h = v2(1, 0x11, &body);
        assert_eq!(
            parse(&h),
            Ok(Some((Some("10.0.0.9:40000".parse().expect("addr")), 28)))
        );
        assert_eq!(parse(&h[..20]), Ok(None));
        assert_eq!(parse(&h[..5]), Ok(None));
        let mut body6 = [0u8; 36];
        body6[15] = 1;
        body6[32..34].copy_from_slice(&7u16.to_be_bytes());
        assert_eq!(
            parse(&v2(1, 0x21, &body6)),
            Ok(Some((Some("[::1]:7".parse().expect("addr")), 52)))
        );
        assert_eq!(parse(&v2(0, 0x00, &[])), Ok(Some((None, 16))));
        assert!(parse(&v2(1, 0x11, &body[..4])).is_err());
        assert!(parse(&v2(5, 0x11, &body)).is_err());
        let mut bad_version = v2(1, 0x11, &body);
        bad_version[12] = 0x11;
        assert!(parse(&bad_version).is_err());
    }
}
