//! The two facts Pitcher reads from a certificate itself: the DNS names it
//! covers (subjectAltName) and when it expires (notAfter). A small DER
//! walker over RFC 5280's structure, run only on certificates the master
//! loaded (and rustls accepts); anything unexpected is an error, never a
//! panic.
//!
//! Why no crate: `x509-parser` would bring a parser-combinator stack and a
//! calendar crate for two fields; rustls and webpki parse certificates but
//! expose neither field.

use std::fmt;

/// What was read from a certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFacts {
    /// DNS names of the subjectAltName extension, lower case (`*.x.y` for
    /// wildcards). Empty when the certificate has none.
    pub dns_names: Vec<String>,
    /// notAfter, in seconds since the Unix epoch (UTC).
    pub not_after: i64,
}

/// A certificate that is not the DER this reader expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DerError(&'static str);

impl fmt::Display for DerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "malformed certificate: {}", self.0)
    }
}

const SEQUENCE: u8 = 0x30;
const OID: u8 = 0x06;
const BOOLEAN: u8 = 0x01;
const OCTET_STRING: u8 = 0x04;
const UTC_TIME: u8 = 0x17;
const GENERALIZED_TIME: u8 = 0x18;
/// `[0] EXPLICIT` version of a TBSCertificate.
const VERSION: u8 = 0xa0;
/// `[3] EXPLICIT` extensions of a TBSCertificate.
const EXTENSIONS: u8 = 0xa3;
/// `dNSName [2] IMPLICIT IA5String` of a GeneralName.
const DNS_NAME: u8 = 0x82;
/// id-ce-subjectAltName, 2.5.29.17.
const SAN_OID: &[u8] = &[0x55, 0x1d, 0x11];

/// Reads DER elements one after the other.
struct Der<'a>(&'a [u8]);

impl<'a> Der<'a> {
    /// The next element: (tag, contents).
    fn next(&mut self) -> Result<(u8, &'a [u8]), DerError> {
        let d = self.0;
        let (&tag, rest) = d.split_first().ok_or(DerError("truncated element"))?;
        let (&first, rest) = rest.split_first().ok_or(DerError("truncated length"))?;
        let (len, rest) = if first < 0x80 {
            (first as usize, rest)
        } else {
            let n = (first & 0x7f) as usize;
            if n == 0 || n > 4 || rest.len() < n {
                return Err(DerError("bad length"));
            }
            let len = rest[..n].iter().fold(0usize, |a, &b| (a << 8) | b as usize);
            (len, &rest[n..])
        };
        if rest.len() < len {
            return Err(DerError("element longer than its container"));
        }
        self.0 = &rest[len..];
        Ok((tag, &rest[..len]))
    }

    /// The next element, which must have `tag`.
    fn expect(&mut self, tag: u8, what: &'static str) -> Result<&'a [u8], DerError> {
        match self.next()? {
            (t, v) if t == tag => Ok(v),
            _ => Err(DerError(what)),
        }
    }

    fn peek_tag(&self) -> Option<u8> {
        self.0.first().copied()
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Reads the DNS names and the expiry of a DER certificate.
pub fn facts(der: &[u8]) -> Result<CertFacts, DerError> {
    let cert = Der(der).expect(SEQUENCE, "not a SEQUENCE")?;
    let mut tbs = Der(Der(cert).expect(SEQUENCE, "no TBSCertificate")?);
    if tbs.peek_tag() == Some(VERSION) {
        tbs.next()?;
    }
    tbs.next()?; // serialNumber
    tbs.expect(SEQUENCE, "no signature algorithm")?;
    tbs.expect(SEQUENCE, "no issuer")?;
    let mut validity = Der(tbs.expect(SEQUENCE, "no validity")?);
    validity.next()?; // notBefore
    let not_after = match validity.next()? {
        (UTC_TIME, v) => parse_time(v, false)?,
        (GENERALIZED_TIME, v) => parse_time(v, true)?,
        _ => return Err(DerError("notAfter is not a time")),
    };
    tbs.expect(SEQUENCE, "no subject")?;
    tbs.expect(SEQUENCE, "no subjectPublicKeyInfo")?;
    let mut dns_names = Vec::new();
    while !tbs.is_empty() {
        let (tag, v) = tbs.next()?;
        if tag != EXTENSIONS {
            continue; // issuerUniqueID, subjectUniqueID
        }
        let mut exts = Der(Der(v).expect(SEQUENCE, "extensions are not a SEQUENCE")?);
        while !exts.is_empty() {
            let mut ext = Der(exts.expect(SEQUENCE, "an extension is not a SEQUENCE")?);
            let oid = ext.expect(OID, "an extension without its id")?;
            if ext.peek_tag() == Some(BOOLEAN) {
                ext.next()?;
            }
            let value = ext.expect(OCTET_STRING, "an extension without its value")?;
            if oid != SAN_OID {
                continue;
            }
            let mut names = Der(Der(value).expect(SEQUENCE, "subjectAltName is not a SEQUENCE")?);
            while !names.is_empty() {
                let (tag, v) = names.next()?;
                if tag == DNS_NAME {
                    let name = std::str::from_utf8(v).map_err(|_| DerError("a dNSName is not ASCII"))?;
                    dns_names.push(name.to_ascii_lowercase());
                }
            }
        }
    }
    Ok(CertFacts { dns_names, not_after })
}

/// `YYMMDDHHMMSSZ` (UTCTime, RFC 5280: years 50–99 are 19xx) or
/// `YYYYMMDDHHMMSSZ` (GeneralizedTime) → seconds since the epoch.
fn parse_time(v: &[u8], generalized: bool) -> Result<i64, DerError> {
    let bad = DerError("a time that is not YYMMDDHHMMSSZ");
    let (year, rest) = if generalized {
        if v.len() != 15 {
            return Err(bad);
        }
        (digits(&v[..4]).ok_or(bad.clone())?, &v[4..])
    } else {
        if v.len() != 13 {
            return Err(bad);
        }
        let yy = digits(&v[..2]).ok_or(bad.clone())?;
        (if yy >= 50 { 1900 + yy } else { 2000 + yy }, &v[2..])
    };
    // MMDDHHMMSS then Z.
    if rest.len() != 11 || rest[10] != b'Z' {
        return Err(bad);
    }
    let field = |i: usize| digits(&rest[i..i + 2]).ok_or(bad.clone());
    let (month, day, hour, min, sec) = (field(0)?, field(2)?, field(4)?, field(6)?, field(8)?);
    if !(1..=12).contains(&month) || !(1..=31).contains(&day) || hour > 23 || min > 59 || sec > 60 {
        return Err(DerError("a time out of range"));
    }
    Ok(days_from_civil(year, month, day) * 86_400 + hour * 3600 + min * 60 + sec)
}

fn digits(d: &[u8]) -> Option<i64> {
    d.iter().try_fold(0i64, |a, &b| b.is_ascii_digit().then(|| a * 10 + i64::from(b - b'0')))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Whether certificate name `pattern` (`a.b` or `*.b`, lower case) covers
/// `host` (RFC 6125: a wildcard stands for exactly one whole label).
pub fn name_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => {
            host.split_once('.').is_some_and(|(label, rest)| !label.is_empty() && rest.eq_ignore_ascii_case(suffix))
        }
        None => pattern.eq_ignore_ascii_case(host),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_convert_to_epoch_seconds() {
        assert_eq!(parse_time(b"700101000000Z", false), Ok(0));
        assert_eq!(parse_time(b"20380119031408Z", true), Ok(2_147_483_648));
        assert_eq!(parse_time(b"491231235959Z", false), Ok(2_524_607_999));
        assert!(parse_time(b"20380119031408", true).is_err());
        assert!(parse_time(b"701301000000Z", false).is_err());
    }

    #[test]
    fn wildcards_cover_one_label() {
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "A.Example.COM"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
        assert!(name_matches("example.com", "EXAMPLE.com"));
        assert!(!name_matches("example.com", "www.example.com"));
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        for input in [&b""[..], b"\x30", b"\x30\x84\xff\xff\xff\xff", b"\x30\x03\x30\x01\x00", b"\x30\x80"] {
            assert!(facts(input).is_err(), "{input:?}");
        }
        // Every prefix of a plausible header.
        let mut v = vec![0x30, 0x0a, 0x30, 0x08, 0xa0, 0x03, 0x02, 0x01, 0x02, 0x02, 0x01, 0x01];
        while !v.is_empty() {
            assert!(facts(&v).is_err());
            v.pop();
        }
    }
}
