//! `Spanned<T>`: a value of the configuration file with the byte range it
//! was read from, so that checks after the parse can name the line.
//!
//! It reads like `toml::Spanned` from TOML (the toml deserializer fills it
//! through the same private struct protocol), and it also travels: it
//! serialises as `[start, end, value]` and reads that back, so the master
//! can send its parse of the file to the workers as JSON (the `form` of
//! [`super::Loaded`]) with every span intact, and a worker's checks point
//! at the same lines as the master's.
//!
//! Owns: that representation. Must not: know what the values mean.

use std::fmt;
use std::marker::PhantomData;
use std::ops::Range;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::ser::{Serialize, SerializeTuple, Serializer};

/// The name and fields by which the toml deserializer recognises a
/// spanned value (`serde_spanned`'s protocol).
const NAME: &str = "$__serde_spanned_private_Spanned";
const START: &str = "$__serde_spanned_private_start";
const END: &str = "$__serde_spanned_private_end";
const VALUE: &str = "$__serde_spanned_private_value";
static FIELDS: [&str; 3] = [START, END, VALUE];

/// A value and the byte range of the text it was read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spanned<T> {
    span: Range<usize>,
    value: T,
}

impl<T> Spanned<T> {
    /// The byte range of the value in the text.
    pub fn span(&self) -> Range<usize> {
        self.span.clone()
    }

    /// The value.
    pub fn get_ref(&self) -> &T {
        &self.value
    }

    /// The value, without its span.
    pub fn into_inner(self) -> T {
        self.value
    }
}

impl<T: Serialize> Serialize for Spanned<T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut t = s.serialize_tuple(3)?;
        t.serialize_element(&self.span.start)?;
        t.serialize_element(&self.span.end)?;
        t.serialize_element(&self.value)?;
        t.end()
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Spanned<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_struct(NAME, &FIELDS, SpannedVisitor(PhantomData))
    }
}

struct SpannedVisitor<T>(PhantomData<T>);

impl<'de, T: Deserialize<'de>> Visitor<'de> for SpannedVisitor<T> {
    type Value = Spanned<T>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a spanned value")
    }

    /// From TOML: the three fields of the protocol.
    fn visit_map<M: MapAccess<'de>>(self, mut m: M) -> Result<Spanned<T>, M::Error> {
        let (mut start, mut end, mut value) = (None, None, None);
        while let Some(key) = m.next_key::<&str>()? {
            match key {
                START if start.is_none() => start = Some(m.next_value()?),
                END if end.is_none() => end = Some(m.next_value()?),
                VALUE if value.is_none() => value = Some(m.next_value()?),
                START | END | VALUE => return Err(de::Error::custom(format!("{key} given twice"))),
                other => return Err(de::Error::unknown_field(other, &FIELDS)),
            }
        }
        match (start, end, value) {
            (Some(start), Some(end), Some(value)) => Ok(Spanned { span: start..end, value }),
            (None, _, _) => Err(de::Error::missing_field(START)),
            (_, None, _) => Err(de::Error::missing_field(END)),
            (_, _, None) => Err(de::Error::missing_field(VALUE)),
        }
    }

    /// From the form the master sends: `[start, end, value]`.
    fn visit_seq<A: SeqAccess<'de>>(self, mut a: A) -> Result<Spanned<T>, A::Error> {
        let start: usize = a.next_element()?.ok_or_else(|| de::Error::invalid_length(0, &self))?;
        let end: usize = a.next_element()?.ok_or_else(|| de::Error::invalid_length(1, &self))?;
        let value: T = a.next_element()?.ok_or_else(|| de::Error::invalid_length(2, &self))?;
        if a.next_element::<de::IgnoredAny>()?.is_some() {
            return Err(de::Error::invalid_length(4, &self));
        }
        Ok(Spanned { span: start..end, value })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Deserialize, serde::Serialize)]
    struct Doc {
        name: Spanned<String>,
        list: Spanned<Vec<Spanned<u32>>>,
    }

    #[test]
    fn reads_spans_from_toml_and_keeps_them_through_json() {
        let text = "name = \"web\"\nlist = [1, 22]\n";
        let d: Doc = toml::from_str(text).unwrap();
        assert_eq!(&text[d.name.span()], "\"web\"");
        assert_eq!(&text[d.list.get_ref()[1].span()], "22");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, r#"{"name":[7,12,"web"],"list":[20,27,[[21,22,1],[24,26,22]]]}"#);
        assert_eq!(serde_json::from_str::<Doc>(&json).unwrap(), d);
        assert!(serde_json::from_str::<Doc>(r#"{"name":[7,12],"list":[0,0,[]]}"#).is_err());
        assert!(serde_json::from_str::<Doc>(r#"{"name":[7,12,"a",4],"list":[0,0,[]]}"#).is_err());
    }
}
