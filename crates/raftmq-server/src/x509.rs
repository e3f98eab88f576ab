//! Just enough DER to read the subject of an X.509 certificate (already verified by rustls):
//! its Common Name, or the whole name as an RFC 4514 string. Malformed input gives `None`.

/// One attribute of a distinguished name: its type (OID content bytes) and value.
struct Attribute<'a> {
    oid: &'a [u8],
    value: String,
}

/// Splits one DER TLV off `input`: (tag, contents, rest).
fn tlv(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let n = usize::from(first & 0x7F);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &rest[len..]))
}

fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    match tlv(input)? {
        (t, contents, rest) if t == tag => Some((contents, rest)),
        _ => None,
    }
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;

/// The RDNs of the subject, in DER order, each a list of attributes.
fn subject(der: &[u8]) -> Option<Vec<Vec<Attribute<'_>>>> {
    let (cert, _) = expect(der, SEQUENCE)?;
    let (tbs, _) = expect(cert, SEQUENCE)?;
    let mut rest = tbs;
    // Optional explicit version [0].
    if rest.first() == Some(&0xA0) {
        rest = tlv(rest)?.2;
    }
    // serialNumber, signature, issuer, validity.
    for _ in 0..4 {
        rest = tlv(rest)?.2;
    }
    let (mut name, _) = expect(rest, SEQUENCE)?;
    let mut rdns = Vec::new();
    while !name.is_empty() {
        let (mut set, next) = expect(name, SET)?;
        name = next;
        let mut rdn = Vec::new();
        while !set.is_empty() {
            let (atv, next) = expect(set, SEQUENCE)?;
            set = next;
            let (oid, value) = expect(atv, OID)?;
            let (tag, contents, _) = tlv(value)?;
            rdn.push(Attribute {
                oid,
                value: decode_string(tag, contents)?,
            });
        }
        rdns.push(rdn);
    }
    Some(rdns)
}

fn decode_string(tag: u8, contents: &[u8]) -> Option<String> {
    match tag {
        // UTF8String, PrintableString, IA5String, NumericString, VisibleString
        0x0C | 0x13 | 0x16 | 0x12 | 0x1A => String::from_utf8(contents.to_vec()).ok(),
        // TeletexString: treated as Latin-1.
        0x14 => Some(contents.iter().map(|b| char::from(*b)).collect()),
        // BMPString: UTF-16BE.
        0x1E => {
            if !contents.len().is_multiple_of(2) {
                return None;
            }
            let units: Vec<u16> = contents
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect();
            String::from_utf16(&units).ok()
        }
        _ => None,
    }
}

const CN: &[u8] = &[0x55, 0x04, 0x03];

fn short_name(oid: &[u8]) -> Option<&'static str> {
    Some(match oid {
        CN => "CN",
        [0x55, 0x04, 0x06] => "C",
        [0x55, 0x04, 0x07] => "L",
        [0x55, 0x04, 0x08] => "ST",
        [0x55, 0x04, 0x09] => "STREET",
        [0x55, 0x04, 0x0A] => "O",
        [0x55, 0x04, 0x0B] => "OU",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x19] => "DC",
        [0x09, 0x92, 0x26, 0x89, 0x93, 0xF2, 0x2C, 0x64, 0x01, 0x01] => "UID",
        _ => return None,
    })
}

/// An OID in dotted-decimal form.
fn dotted(oid: &[u8]) -> String {
    let mut parts: Vec<u64> = Vec::new();
    let mut acc: u64 = 0;
    for b in oid {
        acc = (acc << 7) | u64::from(b & 0x7F);
        if b & 0x80 == 0 {
            if parts.is_empty() {
                let first = (acc / 40).min(2);
                parts.push(first);
                parts.push(acc - first * 40);
            } else {
                parts.push(acc);
            }
            acc = 0;
        }
    }
    parts
        .iter()
        .map(u64::to_string)
        .collect::<Vec<_>>()
        .join(".")
}

/// Escapes an attribute value (RFC 4514 §2.4).
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The subject's Common Name (the last one, if several).
pub fn subject_cn(der: &[u8]) -> Option<String> {
    subject(der)?
        .into_iter()
        .flatten()
        .filter(|a| a.oid == CN)
        .map(|a| a.value)
        .next_back()
}

/// The subject as an RFC 4514 string, most specific RDN first (`CN=device-1,O=Example`).
pub fn subject_string(der: &[u8]) -> Option<String> {
    let rdns = subject(der)?;
    let text = rdns
        .iter()
        .rev()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    let name = short_name(a.oid).map_or_else(|| dotted(a.oid), str::to_owned);
                    format!("{name}={}", escape(&a.value))
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect::<Vec<_>>()
        .join(",");
    Some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// DER of a TLV with a short length.
    fn t(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        if contents.len() < 0x80 {
            out.push(u8::try_from(contents.len()).expect("len"));
        } else {
            out.push(0x82);
            out.extend_from_slice(&u16::try_from(contents.len()).expect("len").to_be_bytes());
        }
        out.extend_from_slice(contents);
        out
    }

    fn rdn(oid: &[u8], tag: u8, value: &str) -> Vec<u8> {
        let atv = [t(OID, oid), t(tag, value.as_bytes())].concat();
        t(SET, &t(SEQUENCE, &atv))
    }

    fn cert(subject: &[u8]) -> Vec<u8> {
        let tbs = [
            t(0xA0, &t(0x02, &[2])),
            t(0x02, &[1]),
            t(SEQUENCE, &[]),
            t(SEQUENCE, &[]),
            t(SEQUENCE, &[]),
            t(SEQUENCE, subject),
            t(SEQUENCE, &[0; 200]),
        ]
        .concat();
        t(SEQUENCE, &t(SEQUENCE, &tbs))
    }

    #[test]
    fn reads_cn_and_rfc4514_subject() {
        let name = [
            rdn(&[0x55, 0x04, 0x06], 0x13, "DE"),
            rdn(&[0x55, 0x04, 0x0A], 0x0C, "Acme, Inc"),
            rdn(CN, 0x0C, "device-1"),
            rdn(
                &[0x2A, 0x86, 0x48, 0x86, 0xF7, 0x0D, 0x01, 0x09, 0x01],
                0x16,
                "a@b",
            ),
        ]
        .concat();
        let der = cert(&name);
        assert_eq!(subject_cn(&der).as_deref(), Some("device-1"));
        assert_eq!(
            subject_string(&der).as_deref(),
            Some("1.2.840.113549.1.9.1=a@b,CN=device-1,O=Acme\\, Inc,C=DE")
        );
    }

    #[test]
    fn malformed_input_gives_none() {
        assert_eq!(subject_cn(&[]), None);
        assert_eq!(subject_cn(&[0x30, 0x84, 0xFF, 0xFF, 0xFF, 0xFF]), None);
        let der = cert(&rdn(CN, 0x0C, "x"));
        for cut in 0..der.len() {
            assert_eq!(subject_cn(&der[..cut]), None, "cut at {cut}");
        }
        assert_eq!(subject_cn(&cert(&[])), None);
        assert_eq!(subject_string(&cert(&[])).as_deref(), Some(""));
    }
}
