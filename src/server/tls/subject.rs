//! The subject of a client certificate as RFC 4514 text: what policies match
//! with `cert: { subject: ... }` and what the audit line shows.
//!
//! The rendering must be unambiguous, since a pattern that matches the text
//! admits the certificate: a common name `team-b-bot, O=Example` must never
//! read like two attributes. RFC 4514 gives that:
//!
//! - the RDNs in reverse order of the certificate's sequence (the most
//!   specific first: `CN=ci-bot,O=Example,C=DE`), `,` between them and `+`
//!   between the attributes of a multi-valued RDN (in the certificate's order);
//! - the short names of section 3 (CN, L, ST, O, OU, C, STREET, DC, UID),
//!   any other type as its dotted OID with the value as `#` and the hex of
//!   its BER encoding (`1.2.840.113549.1.9.1=#16...`), as is a value of no
//!   string type;
//! - in string values, `"`, `+`, `,`, `;`, `<`, `>` and `\` escaped with a
//!   backslash, NUL as `\00`, a leading space or `#` and a trailing space
//!   escaped (section 2.4); other control characters are written as `\XX`
//!   hex pairs too (which the RFC allows), so no control character reaches a
//!   policy pattern or a log line.

use std::fmt::Write as _;

use x509_parser::asn1_rs::{Any, Tag, ToDer as _};
use x509_parser::x509::{AttributeTypeAndValue, X509Name};

/// The short names of RFC 4514 section 3, by OID.
const SHORT_NAMES: &[(&str, &str)] = &[
    ("2.5.4.3", "CN"),
    ("2.5.4.7", "L"),
    ("2.5.4.8", "ST"),
    ("2.5.4.10", "O"),
    ("2.5.4.11", "OU"),
    ("2.5.4.6", "C"),
    ("2.5.4.9", "STREET"),
    ("0.9.2342.19200300.100.1.25", "DC"),
    ("0.9.2342.19200300.100.1.1", "UID"),
];

/// `name` as an RFC 4514 string; `None` if a value cannot be encoded again
/// (then the certificate carries no subject a rule could match).
pub(super) fn rfc4514(name: &X509Name<'_>) -> Option<String> {
    let mut out = String::new();
    for (i, rdn) in name
        .iter()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .enumerate()
    {
        if i > 0 {
            out.push(',');
        }
        for (j, attribute) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            write_attribute(&mut out, attribute)?;
        }
    }
    Some(out)
}

fn write_attribute(out: &mut String, attribute: &AttributeTypeAndValue<'_>) -> Option<()> {
    let oid = attribute.attr_type().to_id_string();
    let short = SHORT_NAMES
        .iter()
        .find(|(dotted, _)| *dotted == oid)
        .map(|(_, short)| *short);
    let value = attribute.attr_value();
    match (short, short.and_then(|_| string_value(value))) {
        (Some(short), Some(text)) => {
            out.push_str(short);
            out.push('=');
            escape(out, &text);
        }
        _ => {
            out.push_str(short.unwrap_or(&oid));
            out.push_str("=#");
            for b in value.to_der_vec().ok()? {
                let _ = write!(out, "{b:02x}");
            }
        }
    }
    Some(())
}

/// The text of a value of one of the string types X.520 uses, if it is one
/// and well encoded.
pub(super) fn string_value(value: &Any<'_>) -> Option<String> {
    let data = value.data;
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String | Tag::NumericString => {
            std::str::from_utf8(data).ok().map(str::to_string)
        }
        Tag::VisibleString if data.is_ascii() => std::str::from_utf8(data).ok().map(str::to_string),
        Tag::BmpString if data.len().is_multiple_of(2) => {
            let units = data
                .chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]));
            char::decode_utf16(units)
                .collect::<Result<String, _>>()
                .ok()
        }
        Tag::UniversalString if data.len().is_multiple_of(4) => data
            .chunks_exact(4)
            .map(|c| char::from_u32(u32::from_be_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        _ => None,
    }
}

/// Appends `value` escaped as RFC 4514 section 2.4 says.
fn escape(out: &mut String, value: &str) {
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' ' | '#' if i == 0 => {
                out.push('\\');
                out.push(c);
            }
            ' ' if i == last => out.push_str("\\ "),
            c if c.is_ascii_control() => {
                let _ = write!(out, "\\{:02X}", c as u8);
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::FromDer as _;

    /// A DER TLV with a short or long definite length.
    fn tlv(tag: u8, content: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = content.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(content);
        out
    }

    const CN: &[u8] = &[0x55, 0x04, 0x03];
    const O: &[u8] = &[0x55, 0x04, 0x0a];
    const UTF8: u8 = 0x0c;
    const PRINTABLE: u8 = 0x13;

    /// One attribute: (OID content bytes, value tag, value content).
    type Attr<'a> = (&'a [u8], u8, &'a [u8]);

    /// A Name with these RDNs, in certificate order.
    fn name(rdns: &[&[Attr<'_>]]) -> String {
        let mut sequence = Vec::new();
        for rdn in rdns {
            let mut set = Vec::new();
            for (oid, tag, value) in *rdn {
                set.extend(tlv(0x30, &[tlv(0x06, oid), tlv(*tag, value)].concat()));
            }
            sequence.extend(tlv(0x31, &set));
        }
        let der = tlv(0x30, &sequence);
        let (rest, parsed) = X509Name::from_der(&der).expect("a Name");
        assert!(rest.is_empty());
        rfc4514(&parsed).expect("renders")
    }

    #[test]
    fn rdns_come_most_specific_first_without_spaces() {
        assert_eq!(
            name(&[&[(O, UTF8, b"Example")], &[(CN, UTF8, b"team-b-bot")]]),
            "CN=team-b-bot,O=Example"
        );
        assert_eq!(name(&[]), "");
    }

    #[test]
    fn a_common_name_that_looks_like_attributes_stays_one_value() {
        assert_eq!(
            name(&[
                &[(O, UTF8, b"Evil Corp")],
                &[(CN, UTF8, b"team-b-bot, O=Example")]
            ]),
            "CN=team-b-bot\\, O=Example,O=Evil Corp"
        );
        assert_eq!(
            name(&[&[(CN, UTF8, b"team-b-bot+O=Example")]]),
            "CN=team-b-bot\\+O=Example"
        );
    }

    #[test]
    fn a_multi_valued_rdn_joins_its_attributes_with_plus() {
        let ou: &[u8] = &[0x55, 0x04, 0x0b];
        let c: &[u8] = &[0x55, 0x04, 0x06];
        assert_eq!(
            name(&[
                &[(c, PRINTABLE, b"DE")],
                &[(O, UTF8, b"Example")],
                &[(ou, UTF8, b"ci"), (CN, UTF8, b"bot")],
            ]),
            "OU=ci+CN=bot,O=Example,C=DE"
        );
    }

    #[test]
    fn every_short_name_of_the_rfc() {
        let rdns: Vec<(Vec<u8>, &str)> = vec![
            (vec![0x55, 0x04, 0x03], "CN"),
            (vec![0x55, 0x04, 0x07], "L"),
            (vec![0x55, 0x04, 0x08], "ST"),
            (vec![0x55, 0x04, 0x0a], "O"),
            (vec![0x55, 0x04, 0x0b], "OU"),
            (vec![0x55, 0x04, 0x06], "C"),
            (vec![0x55, 0x04, 0x09], "STREET"),
            // 0.9.2342.19200300.100.1.25 and .1
            (
                vec![0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x19],
                "DC",
            ),
            (
                vec![0x09, 0x92, 0x26, 0x89, 0x93, 0xf2, 0x2c, 0x64, 0x01, 0x01],
                "UID",
            ),
        ];
        for (oid, short) in rdns {
            assert_eq!(
                name(&[&[(&oid, UTF8, b"v")]]),
                format!("{short}=v"),
                "{short}"
            );
        }
    }

    #[test]
    fn other_types_are_dotted_oids_with_hex_ber_values() {
        // 1.2.840.113549.1.9.1 (emailAddress), an IA5String.
        let email: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x09, 0x01];
        assert_eq!(
            name(&[&[(email, 0x16, b"a@b")], &[(CN, UTF8, b"x")]]),
            "CN=x,1.2.840.113549.1.9.1=#1603614062"
        );
        // 1.2.3.4 with a UTF8String; a CN whose value is an INTEGER.
        assert_eq!(
            name(&[&[(&[0x2a, 0x03, 0x04], UTF8, b"x")]]),
            "1.2.3.4=#0c0178"
        );
        assert_eq!(name(&[&[(CN, 0x02, &[0x01])]]), "CN=#020101");
        // A UTF8String that is not UTF-8 has no string form either.
        assert_eq!(name(&[&[(CN, UTF8, &[0xff])]]), "CN=#0c01ff");
    }

    #[test]
    fn special_characters_are_escaped() {
        assert_eq!(
            name(&[&[(CN, UTF8, b"\"+,;<>\\")]]),
            "CN=\\\"\\+\\,\\;\\<\\>\\\\"
        );
        assert_eq!(name(&[&[(CN, UTF8, b" #a b ")]]), "CN=\\ #a b\\ ");
        assert_eq!(name(&[&[(CN, UTF8, b"#x#")]]), "CN=\\#x#");
        assert_eq!(name(&[&[(CN, UTF8, b" ")]]), "CN=\\ ");
        assert_eq!(name(&[&[(CN, UTF8, b"a\0b\nc")]]), "CN=a\\00b\\0Ac");
        assert_eq!(name(&[&[(CN, UTF8, "é=ü".as_bytes())]]), "CN=é=ü");
    }

    #[test]
    fn bmp_and_universal_strings_are_decoded() {
        assert_eq!(
            name(&[&[(CN, 0x1e, &[0, b'b', 0, b'o', 0, b't'])]]),
            "CN=bot"
        );
        assert_eq!(
            name(&[&[(CN, 0x1c, &[0, 0, 0, b'x', 0, 0, 0, b','])]]),
            "CN=x\\,"
        );
        // An odd-length BMPString is not text.
        assert_eq!(name(&[&[(CN, 0x1e, &[0, b'b', 0])]]), "CN=#1e03006200");
    }
}
