//! Reading YAML for people: every problem of a file in one run, each at its place, in words a
//! newcomer can act on. It knows nothing of the config's types; `config.rs` drives it.
//!
//! serde stops at the first error, and serde_yaml tells where a node is only through an error.
//! So [`Recovery`] lets a deserialization run again after each error with the entry that failed
//! hidden, as if the file did not have it, until a run gets through; each run finds one error.
//! [`scan_keys`] walks every mapping once for repeated keys, and finds where a key is by failing
//! at it. [`explain`] turns the parser's messages into sentences that say what to write.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::de::{
    self, DeserializeSeed, Deserializer, EnumAccess, IgnoredAny, MapAccess, SeqAccess, VariantAccess, Visitor,
};

/// Where a node is: the position of each mapping entry or list item on the way from the top
/// (`[2, 0]` is the first entry under the third top-level key). A hidden entry keeps its
/// position, so the paths of the others are the same in every run.
pub type NodePath = Vec<usize>;

/// One run of a recovering deserialization: the entries it hides, and the one that failed.
pub struct Recovery {
    hidden: BTreeSet<NodePath>,
    /// The innermost entry or list item whose deserialization failed.
    failed: RefCell<Option<NodePath>>,
    /// The keys hidden in each mapping, by the mapping's path.
    hidden_keys: RefCell<BTreeMap<NodePath, Vec<String>>>,
}

impl Recovery {
    pub fn new(hidden: BTreeSet<NodePath>) -> Recovery {
        Recovery {
            hidden,
            failed: RefCell::new(None),
            hidden_keys: RefCell::default(),
        }
    }

    /// `inner`, hiding this run's entries from whatever is deserialized through it.
    pub fn deserializer<'de, D: Deserializer<'de>>(&self, inner: D) -> Recovering<'_, D> {
        Recovering {
            inner,
            recovery: self,
            path: NodePath::new(),
        }
    }

    /// The entry or list item to hide in the next run; none when the error was not inside one.
    pub fn failed(&self) -> Option<NodePath> {
        self.failed.borrow().clone()
    }

    /// Whether the run's error only says that a key this run hid is missing ("missing field
    /// `key`", or a check's "needs `key`"): a consequence of hiding it, not a problem of the file.
    pub fn is_consequence(&self, message: &str) -> bool {
        let failed = self.failed().unwrap_or_default();
        self.hidden_keys.borrow().get(&failed).is_some_and(|keys| {
            keys.iter().any(|key| {
                message.contains(&format!("missing field `{key}`")) || message.contains(&format!("needs `{key}`"))
            })
        })
    }

    /// Errors pass up through every entry that holds the failed node; the innermost notes it.
    fn note_failure(&self, path: &NodePath) {
        let mut failed = self.failed.borrow_mut();
        if failed.is_none() {
            *failed = Some(path.clone());
        }
    }

    fn note_hidden_key(&self, mapping: &NodePath, key: Option<String>) {
        if let Some(key) = key {
            self.hidden_keys
                .borrow_mut()
                .entry(mapping.clone())
                .or_default()
                .push(key);
        }
    }
}

fn child(path: &NodePath, index: usize) -> NodePath {
    let mut child = Vec::with_capacity(path.len() + 1);
    child.extend_from_slice(path);
    child.push(index);
    child
}

/// A deserializer that hands out mappings and lists through [`RecoveringMap`] and
/// [`RecoveringSeq`], which skip hidden entries and note which entry an error came from.
pub struct Recovering<'r, D> {
    inner: D,
    recovery: &'r Recovery,
    path: NodePath,
}

impl<'r, D> Recovering<'r, D> {
    fn wrap<V>(self, visitor: V) -> (D, RecoveringVisitor<'r, V>) {
        let visitor = RecoveringVisitor {
            inner: visitor,
            recovery: self.recovery,
            path: self.path,
        };
        (self.inner, visitor)
    }
}

macro_rules! forward_deserialize {
    ($($method:ident($($arg:ident: $type:ty),*);)*) => {
        $(
            fn $method<V: Visitor<'de>>(self, $($arg: $type,)* visitor: V) -> Result<V::Value, D::Error> {
                let (inner, visitor) = self.wrap(visitor);
                inner.$method($($arg,)* visitor)
            }
        )*
    };
}

impl<'de, D: Deserializer<'de>> Deserializer<'de> for Recovering<'_, D> {
    type Error = D::Error;

    forward_deserialize! {
        deserialize_any();
        deserialize_bool();
        deserialize_i8();
        deserialize_i16();
        deserialize_i32();
        deserialize_i64();
        deserialize_i128();
        deserialize_u8();
        deserialize_u16();
        deserialize_u32();
        deserialize_u64();
        deserialize_u128();
        deserialize_f32();
        deserialize_f64();
        deserialize_char();
        deserialize_str();
        deserialize_string();
        deserialize_bytes();
        deserialize_byte_buf();
        deserialize_option();
        deserialize_unit();
        deserialize_unit_struct(name: &'static str);
        deserialize_newtype_struct(name: &'static str);
        deserialize_seq();
        deserialize_tuple(len: usize);
        deserialize_tuple_struct(name: &'static str, len: usize);
        deserialize_map();
        deserialize_struct(name: &'static str, fields: &'static [&'static str]);
        deserialize_enum(name: &'static str, variants: &'static [&'static str]);
        deserialize_identifier();
        deserialize_ignored_any();
    }

    fn is_human_readable(&self) -> bool {
        self.inner.is_human_readable()
    }
}

struct RecoveringVisitor<'r, V> {
    inner: V,
    recovery: &'r Recovery,
    path: NodePath,
}

macro_rules! forward_visit {
    ($($method:ident($type:ty);)*) => {
        $(
            fn $method<E: de::Error>(self, value: $type) -> Result<V::Value, E> {
                self.inner.$method(value)
            }
        )*
    };
}

impl<'de, V: Visitor<'de>> Visitor<'de> for RecoveringVisitor<'_, V> {
    type Value = V::Value;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.expecting(formatter)
    }

    forward_visit! {
        visit_bool(bool);
        visit_i8(i8);
        visit_i16(i16);
        visit_i32(i32);
        visit_i64(i64);
        visit_i128(i128);
        visit_u8(u8);
        visit_u16(u16);
        visit_u32(u32);
        visit_u64(u64);
        visit_u128(u128);
        visit_f32(f32);
        visit_f64(f64);
        visit_char(char);
        visit_str(&str);
        visit_borrowed_str(&'de str);
        visit_string(String);
        visit_bytes(&[u8]);
        visit_borrowed_bytes(&'de [u8]);
        visit_byte_buf(Vec<u8>);
    }

    fn visit_none<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_none()
    }

    fn visit_unit<E: de::Error>(self) -> Result<V::Value, E> {
        self.inner.visit_unit()
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_some(Recovering {
            inner: deserializer,
            recovery: self.recovery,
            path: self.path,
        })
    }

    fn visit_newtype_struct<D: Deserializer<'de>>(self, deserializer: D) -> Result<V::Value, D::Error> {
        self.inner.visit_newtype_struct(Recovering {
            inner: deserializer,
            recovery: self.recovery,
            path: self.path,
        })
    }

    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<V::Value, A::Error> {
        self.inner.visit_seq(RecoveringSeq {
            inner: seq,
            recovery: self.recovery,
            path: self.path,
            next_index: 0,
        })
    }

    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<V::Value, A::Error> {
        self.inner.visit_map(RecoveringMap {
            inner: map,
            recovery: self.recovery,
            path: self.path,
            next_index: 0,
            current: NodePath::new(),
        })
    }

    // The config has no enums with content; an error inside one is its entry's.
    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<V::Value, A::Error> {
        self.inner.visit_enum(data)
    }
}

struct RecoveringSeed<'r, S> {
    inner: S,
    recovery: &'r Recovery,
    path: NodePath,
}

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for RecoveringSeed<'_, S> {
    type Value = S::Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<S::Value, D::Error> {
        self.inner.deserialize(Recovering {
            inner: deserializer,
            recovery: self.recovery,
            path: self.path,
        })
    }
}

struct RecoveringMap<'r, A> {
    inner: A,
    recovery: &'r Recovery,
    path: NodePath,
    next_index: usize,
    /// The entry whose key was read last.
    current: NodePath,
}

impl<'de, A: MapAccess<'de>> MapAccess<'de> for RecoveringMap<'_, A> {
    type Error = A::Error;

    fn next_key_seed<K: DeserializeSeed<'de>>(&mut self, seed: K) -> Result<Option<K::Value>, A::Error> {
        loop {
            let entry = child(&self.path, self.next_index);
            self.next_index += 1;
            if self.recovery.hidden.contains(&entry) {
                let Some(KeyText(key)) = self.inner.next_key()? else {
                    return Ok(None);
                };
                self.inner.next_value::<IgnoredAny>()?;
                self.recovery.note_hidden_key(&self.path, key);
                continue;
            }
            let key = self.inner.next_key_seed(RecoveringSeed {
                inner: seed,
                recovery: self.recovery,
                path: entry.clone(),
            });
            if key.is_err() {
                self.recovery.note_failure(&entry);
            }
            self.current = entry;
            return key;
        }
    }

    fn next_value_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<S::Value, A::Error> {
        let value = self.inner.next_value_seed(RecoveringSeed {
            inner: seed,
            recovery: self.recovery,
            path: self.current.clone(),
        });
        if value.is_err() {
            self.recovery.note_failure(&self.current);
        }
        value
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

struct RecoveringSeq<'r, A> {
    inner: A,
    recovery: &'r Recovery,
    path: NodePath,
    next_index: usize,
}

impl<'de, A: SeqAccess<'de>> SeqAccess<'de> for RecoveringSeq<'_, A> {
    type Error = A::Error;

    fn next_element_seed<S: DeserializeSeed<'de>>(&mut self, seed: S) -> Result<Option<S::Value>, A::Error> {
        loop {
            let item = child(&self.path, self.next_index);
            self.next_index += 1;
            if self.recovery.hidden.contains(&item) {
                if self.inner.next_element::<IgnoredAny>()?.is_none() {
                    return Ok(None);
                }
                continue;
            }
            let element = self.inner.next_element_seed(RecoveringSeed {
                inner: seed,
                recovery: self.recovery,
                path: item.clone(),
            });
            if element.is_err() {
                self.recovery.note_failure(&item);
            }
            return element;
        }
    }

    fn size_hint(&self) -> Option<usize> {
        self.inner.size_hint()
    }
}

/// A mapping key as text when it is a scalar; anything else is skipped.
struct KeyText(Option<String>);

impl<'de> de::Deserialize<'de> for KeyText {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct KeyVisitor;

        impl<'de> Visitor<'de> for KeyVisitor {
            type Value = KeyText;

            fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
                formatter.write_str("a key")
            }

            fn visit_str<E: de::Error>(self, key: &str) -> Result<KeyText, E> {
                Ok(KeyText(Some(key.to_owned())))
            }

            fn visit_bool<E: de::Error>(self, _: bool) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }

            fn visit_i64<E: de::Error>(self, _: i64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }

            fn visit_u64<E: de::Error>(self, _: u64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }

            fn visit_f64<E: de::Error>(self, _: f64) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }

            fn visit_unit<E: de::Error>(self) -> Result<KeyText, E> {
                Ok(KeyText(None))
            }

            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<KeyText, A::Error> {
                IgnoredAny.visit_seq(seq).map(|_| KeyText(None))
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<KeyText, A::Error> {
                IgnoredAny.visit_map(map).map(|_| KeyText(None))
            }

            fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<KeyText, A::Error> {
                IgnoredAny.visit_enum(data).map(|_| KeyText(None))
            }
        }

        deserializer.deserialize_any(KeyVisitor)
    }
}

/// What [`scan_keys`] found.
pub struct KeyScan {
    /// Every key written a second (or third...) time in the same mapping.
    pub repeated: Vec<RepeatedKey>,
    /// The keys of each top-level entry whose value is a mapping (`streams` → the stream names).
    pub sections: BTreeMap<String, BTreeSet<String>>,
}

/// A key written again in a mapping that already has it.
pub struct RepeatedKey {
    /// The entry of the repeat, to hide from a recovering deserialization.
    pub path: NodePath,
    key: String,
    /// The key as first written; it differs from `key` only in the case of a header name.
    first: String,
    first_ordinal: usize,
    ordinal: usize,
}

/// The keys of a mapping under a key of this name, two levels down (`streams.<name>.headers`,
/// `targets.<name>.headers`), are header names, which ignore case.
const HEADERS_KEY: &str = "headers";

/// Walks the whole document: repeated keys, and the keys of the top-level sections. Also the
/// first full parse, so a syntax error comes from here.
pub fn scan_keys(text: &str) -> Result<KeyScan, serde_yaml::Error> {
    let state = ScanState::new(None);
    let walker = Scan::root(&state);
    walker.deserialize(serde_yaml::Deserializer::from_str(text))?;
    Ok(KeyScan {
        repeated: state.repeated.into_inner(),
        sections: state.sections.into_inner(),
    })
}

/// The error of a repeated key at its place: `duplicate key `zapier` (first defined at line 5)`.
/// None if the text no longer has it.
pub fn repeated_key_error(text: &str, repeated: &RepeatedKey) -> Option<serde_yaml::Error> {
    let first_line = fail_at_key(text, repeated.first_ordinal, String::new())?
        .location()?
        .line();
    let message = if repeated.first == repeated.key {
        format!("duplicate key `{}` (first defined at line {first_line})", repeated.key)
    } else {
        format!(
            "duplicate key `{}` (first defined at line {first_line} as `{}`; header names ignore case)",
            repeated.key, repeated.first
        )
    };
    fail_at_key(text, repeated.ordinal, message)
}

/// Parses `text` again and fails at the key with this ordinal, so that serde_yaml attaches its
/// place and path to `message`.
fn fail_at_key(text: &str, ordinal: usize, message: String) -> Option<serde_yaml::Error> {
    let state = ScanState::new(Some((ordinal, message)));
    Scan::root(&state)
        .deserialize(serde_yaml::Deserializer::from_str(text))
        .err()
}

struct ScanState {
    /// Keys are numbered in the order they are read, the same in every scan of one text.
    next_key_ordinal: Cell<usize>,
    fail_at: Option<(usize, String)>,
    repeated: RefCell<Vec<RepeatedKey>>,
    sections: RefCell<BTreeMap<String, BTreeSet<String>>>,
}

impl ScanState {
    fn new(fail_at: Option<(usize, String)>) -> ScanState {
        ScanState {
            next_key_ordinal: Cell::new(0),
            fail_at,
            repeated: RefCell::default(),
            sections: RefCell::default(),
        }
    }
}

/// One node of the document, walked for its keys.
struct Scan<'s> {
    state: &'s ScanState,
    path: NodePath,
    /// The key this node is the value of.
    key: Option<String>,
}

impl<'s> Scan<'s> {
    fn root(state: &'s ScanState) -> Scan<'s> {
        Scan {
            state,
            path: NodePath::new(),
            key: None,
        }
    }
}

impl<'de> DeserializeSeed<'de> for Scan<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Scan<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("any value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_i128<E: de::Error>(self, _: i128) -> Result<(), E> {
        Ok(())
    }

    fn visit_u128<E: de::Error>(self, _: u128) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_none<E: de::Error>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        self.deserialize(deserializer)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        for index in 0.. {
            let item = Scan {
                state: self.state,
                path: child(&self.path, index),
                key: None,
            };
            if seq.next_element_seed(item)?.is_none() {
                break;
            }
        }
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let ignore_case = self.path.len() == 3 && self.key.as_deref() == Some(HEADERS_KEY);
        let section = if self.path.len() == 1 { self.key.clone() } else { None };
        // Each key as compared, with its first spelling and ordinal.
        let mut seen: BTreeMap<String, (String, usize)> = BTreeMap::new();
        for index in 0.. {
            let ordinal = self.state.next_key_ordinal.get();
            self.state.next_key_ordinal.set(ordinal + 1);
            let Some(key) = map.next_key_seed(ScanKey {
                state: self.state,
                ordinal,
            })?
            else {
                break;
            };
            let path = child(&self.path, index);
            if let Some(section) = &section {
                let mut sections = self.state.sections.borrow_mut();
                sections.entry(section.clone()).or_default().insert(key.clone());
            }
            let compared = if ignore_case {
                key.to_ascii_lowercase()
            } else {
                key.clone()
            };
            match seen.get(&compared) {
                Some((first, first_ordinal)) => self.state.repeated.borrow_mut().push(RepeatedKey {
                    path: path.clone(),
                    key: key.clone(),
                    first: first.clone(),
                    first_ordinal: *first_ordinal,
                    ordinal,
                }),
                None => {
                    seen.insert(compared, (key.clone(), ordinal));
                }
            }
            map.next_value_seed(Scan {
                state: self.state,
                path,
                key: Some(key),
            })?;
        }
        Ok(())
    }

    fn visit_enum<A: EnumAccess<'de>>(self, data: A) -> Result<(), A::Error> {
        let (IgnoredAny, variant) = data.variant()?;
        variant.newtype_variant_seed(self)
    }
}

/// A mapping key: its text if it is a scalar, and the place to fail at when asked.
struct ScanKey<'s> {
    state: &'s ScanState,
    ordinal: usize,
}

impl<'de> DeserializeSeed<'de> for ScanKey<'_> {
    type Value = String;

    // As serde reads a key into a String or a field name: the scalar as written, so that `1`
    // and `01` are two keys, and `null` and `~` too, as they are to the config.
    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<String, D::Error> {
        let fail_with = match &self.state.fail_at {
            Some((ordinal, message)) if *ordinal == self.ordinal => Some(message.as_str()),
            _ => None,
        };
        deserializer.deserialize_str(ScanKeyVisitor { fail_with })
    }
}

struct ScanKeyVisitor<'m> {
    /// serde_yaml places an error from a visitor at the node it visits: the key.
    fail_with: Option<&'m str>,
}

impl Visitor<'_> for ScanKeyVisitor<'_> {
    type Value = String;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a key")
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<String, E> {
        match self.fail_with {
            Some(message) => Err(E::custom(message)),
            None => Ok(key.to_owned()),
        }
    }
}

/// A parser error as a reader should see it.
pub struct Explained {
    /// Line and column, 1-based. For some mistakes the parser gives up a line or more after
    /// them; these point at the mistake instead (a key without its colon, an unclosed quote).
    pub location: Option<(usize, usize)>,
    /// serde_yaml's path and message, without the location.
    pub message: String,
}

/// `err` in words that say what to write, at the place of the mistake. Syntax errors keep the
/// parser's own words in a suffix, for searching.
pub fn explain(err: &serde_yaml::Error, text: &str) -> Explained {
    let location = err.location().map(|at| (at.line(), at.column()));
    let full = err.to_string();
    if let Some(explained) = explain_syntax(&full, location, &Lines::new(text)) {
        return explained;
    }
    let message = match location {
        Some((line, column)) => full
            .strip_suffix(&format!(" at line {line} column {column}"))
            .unwrap_or(&full),
        None => &full,
    };
    Explained {
        location,
        message: explain_value(message),
    }
}

/// The messages of libyaml (and serde_yaml's own syntax errors) that `explain_syntax` knows.
const SYNTAX_PROBLEMS: &[&str] = &[
    "did not find expected key",
    "did not find expected '-' indicator",
    "mapping values are not allowed in this context",
    "could not find expected ':'",
    "found unexpected end of stream",
    "did not find expected ',' or '}'",
    "did not find expected ',' or ']'",
    "found a tab character that violates indentation",
    "found character that cannot start any token",
    "block sequence entries are not allowed in this context",
    "did not find expected node content",
    "did not find expected alphabetic or numeric character",
    "found unknown escape character",
    "unknown anchor",
    "deserializing from YAML containing more than one document is not supported",
];

/// libyaml writes `{problem}[ at line L column C][, {context}[ at line L column C]]`, where the
/// context's place, when given, is where the construct it failed in started.
fn explain_syntax(full: &str, location: Option<(usize, usize)>, lines: &Lines) -> Option<Explained> {
    let problem = *SYNTAX_PROBLEMS.iter().find(|problem| full.starts_with(*problem))?;
    let (context, context_location) = match full[problem.len()..].split_once(", ") {
        Some((_, context)) => split_location(context),
        None => ("", None),
    };
    // The context's place is left out when it is the problem's.
    let started_at = context_location.or(location);
    let at = |location: Option<(usize, usize)>, message: &str| {
        Some(Explained {
            location,
            message: format!("{message} (YAML: {problem})"),
        })
    };
    let character = location.and_then(|(line, column)| lines.char_at(line, column));
    match problem {
        "did not find expected key" => {
            let (line, column) = location?;
            if character == Some('-') {
                at(
                    location,
                    "a list item (`- `) where a key was expected: put the list under a key of its own, or line it up with the list it belongs to",
                )
            } else if column > lines.first_column(line) {
                at(
                    location,
                    "unexpected text after a value: a value in quotes ends at its closing quote, so put all of it inside the quotes",
                )
            } else {
                at(
                    location,
                    "this line is not lined up with the keys above it: the keys of one mapping start in the same column",
                )
            }
        }
        "did not find expected '-' indicator" => at(
            location,
            "this line is not lined up with the list above it: the items of a list start with `- ` in the same column, and the keys of an item line up with its first key",
        ),
        "mapping values are not allowed in this context" => {
            let (place, message) = explain_unexpected_colon(location?, lines);
            at(Some(place), message)
        }
        "could not find expected ':'" => at(
            started_at,
            "this key has no `:` after it: write `key: value`, with a space after the colon",
        ),
        "found unexpected end of stream" if context.contains("quoted scalar") => {
            at(started_at, "this quoted value has no closing quote")
        }
        "found unexpected end of stream" => at(location, "the file ends in the middle of a value"),
        "did not find expected ',' or '}'" => at(
            started_at,
            "this `{` is not closed: write `{ key: value, key: value }`, with a `,` between entries and a `}` at the end",
        ),
        "did not find expected ',' or ']'" => at(
            started_at,
            "this `[` is not closed: write `[a, b]`, with a `,` between items and a `]` at the end",
        ),
        "found a tab character that violates indentation" => at(location, "a tab: indent with spaces only"),
        "found character that cannot start any token" => match character {
            Some('\t') => at(location, "a tab: indent with spaces only"),
            Some(c) => at(
                location,
                &format!("a value cannot start with `{c}`: put it in quotes, as in \"{c}…\""),
            ),
            None => at(location, "a value cannot start with this character: put it in quotes"),
        },
        "block sequence entries are not allowed in this context" => at(
            location,
            "a list cannot start on the line of its key: put each `- item` on a line of its own below the key, or write `[a, b]`",
        ),
        "did not find expected node content" if context.contains("flow") => at(
            location,
            "a value is missing here, or a `[` or `{` before it is not closed",
        ),
        "did not find expected node content" => at(location, "a value is missing here"),
        "did not find expected alphabetic or numeric character" => at(
            started_at,
            "`*` and `&` start aliases and anchors in YAML: put a value that starts with one in quotes, as in \"*\"",
        ),
        "found unknown escape character" => at(
            location,
            "unknown escape in a double-quoted value: write `\\\\` for a backslash, or use single quotes",
        ),
        "unknown anchor" => at(
            location,
            "a value that starts with `*` is a YAML alias, and no anchor (`&name`) above it has this name: put text that starts with `*` in quotes, as in \"*\"",
        ),
        _ => at(
            location,
            "the file holds more than one YAML document (a `---` or `...` line), and a config is one document",
        ),
    }
}

/// `text at line L column C` → (`text`, (L, C)).
fn split_location(text: &str) -> (&str, Option<(usize, usize)>) {
    let Some((before, place)) = text.rsplit_once(" at line ") else {
        return (text, None);
    };
    let parsed = place
        .split_once(" column ")
        .and_then(|(line, column)| Some((line.parse().ok()?, column.parse().ok()?)));
    match parsed {
        Some(location) => (before, Some(location)),
        None => (text, None),
    }
}

/// libyaml found `key: value` where no key can start, at the colon. Usually the mistake is the
/// line before it (a key without a colon, which runs on into this line) or this line's indent.
fn explain_unexpected_colon((line, column): (usize, usize), lines: &Lines) -> ((usize, usize), &'static str) {
    let this = lines.line(line).unwrap_or("");
    let indent = lines.first_column(line);
    let before_colon: String = this.chars().take(column.saturating_sub(1)).collect();
    if has_key_colon(before_colon.trim_start()) {
        return (
            (line, column),
            "a value cannot hold `: ` unless it is in quotes, as in `key: \"a: b\"`",
        );
    }
    let previous = (1..line).rev().find(|&number| {
        let text = lines.line(number).unwrap_or("").trim();
        !text.is_empty() && !text.starts_with('#')
    });
    if let Some(previous) = previous {
        let previous_text = lines.line(previous).unwrap_or("").trim();
        if !has_key_colon(previous_text) && !previous_text.starts_with('-') {
            return (
                (previous, lines.first_column(previous)),
                "this line has no `:` after its key: write `key: value`, with a space after the colon",
            );
        }
        if indent > lines.first_column(previous) {
            return (
                (line, indent),
                "this line is indented deeper than the line above it, so it reads as part of that line's value: line it up with the keys above it",
            );
        }
    }
    (
        (line, column),
        "a `:` where no key can start: line this key up with the keys above it, or put a value that holds `: ` in quotes",
    )
}

/// Whether `text` has a `:` that ends a key: one followed by a space, a tab or the line's end.
fn has_key_colon(text: &str) -> bool {
    let text = text.split(" #").next().unwrap_or(text);
    text.match_indices(':')
        .any(|(index, _)| matches!(text[index + 1..].chars().next(), None | Some(' ' | '\t')))
}

/// The text's lines as YAML counts them (`\r\n`, `\r`, `\n`, NEL, LS and PS each end one).
struct Lines<'t>(Vec<&'t str>);

impl<'t> Lines<'t> {
    fn new(text: &'t str) -> Lines<'t> {
        let mut lines = Vec::new();
        let mut start = 0;
        let mut chars = text.char_indices().peekable();
        while let Some((index, c)) = chars.next() {
            let end = match c {
                '\r' => chars
                    .next_if(|(_, next)| *next == '\n')
                    .map_or(index + 1, |(at, _)| at + 1),
                '\n' | '\u{85}' | '\u{2028}' | '\u{2029}' => index + c.len_utf8(),
                _ => continue,
            };
            lines.push(&text[start..index]);
            start = end;
        }
        lines.push(&text[start..]);
        Lines(lines)
    }

    /// Line `number`, 1-based, without its line break.
    fn line(&self, number: usize) -> Option<&'t str> {
        self.0.get(number.checked_sub(1)?).copied()
    }

    fn char_at(&self, line: usize, column: usize) -> Option<char> {
        self.line(line)?.chars().nth(column.checked_sub(1)?)
    }

    /// The column of the line's first character that is not a space.
    fn first_column(&self, line: usize) -> usize {
        1 + self
            .line(line)
            .map_or(0, |text| text.chars().take_while(|c| *c == ' ').count())
    }
}

/// serde's messages about values, as sentences that say what to write. `message` may start
/// with serde_yaml's path (`streams.chat: `), which stays.
fn explain_value(message: &str) -> String {
    let Some(start) = [
        "invalid type: ",
        "invalid value: ",
        "missing field `",
        "unknown field `",
        "unknown variant `",
        "invalid socket address syntax",
    ]
    .iter()
    .filter_map(|pattern| message.find(pattern))
    .min() else {
        return message.to_owned();
    };
    let (path, body) = message.split_at(start);
    let explained = if body == "invalid socket address syntax" {
        "expected an IP address and a port, such as `127.0.0.1:9464`".to_owned()
    } else if let Some(field) = body
        .strip_prefix("missing field `")
        .and_then(|rest| rest.strip_suffix('`'))
    {
        format!("the required key `{field}` is missing")
    } else if let Some(rest) = body.strip_prefix("unknown field `") {
        // "unknown field `colour`, expected one of `url`, ..." or "..., there are no fields".
        format!("unknown key `{}", rest.replacen("`, expected", "`; expected", 1))
    } else if let Some(rest) = body.strip_prefix("unknown variant `") {
        format!("unknown value `{rest}")
    } else if let Some((found, expected)) = body
        .strip_prefix("invalid type: ")
        .or_else(|| body.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "))
    {
        explain_mismatch(found, expected)
    } else {
        body.to_owned()
    };
    format!("{path}{explained}")
}

/// `found` and `expected` as serde writes them: `string "30"`, `integer `5``, `sequence`;
/// `a duration`, `struct StreamConfig`, `a map`.
fn explain_mismatch(found: &str, expected: &str) -> String {
    let text = found.strip_prefix("string \"").and_then(|rest| rest.strip_suffix('"'));
    let number = found
        .strip_prefix("integer `")
        .or_else(|| found.strip_prefix("floating point `"))
        .and_then(|rest| rest.strip_suffix('`'));
    if expected == "a duration" {
        return match text.or(number) {
            Some(value) if value.trim().parse::<f64>().is_ok() => {
                "a duration needs a unit, like `30s`, `500ms` or `2m`".to_owned()
            }
            Some(value) => format!("`{value}` is not a duration: write one like `30s`, `500ms` or `2m`"),
            None => format!("expected a duration such as `30s`, found {}", found_for_people(found)),
        };
    }
    if expected == "parsable string" {
        return "expected a size such as `64KiB`, `512MiB` or `1GiB`".to_owned();
    }
    let (expected_for_people, shows_value) = match expected {
        "a map" => ("`name: value` lines indented below it".to_owned(), false),
        _ if expected.starts_with("struct ") => ("settings as `key: value` lines indented below it".to_owned(), false),
        "a sequence" => ("a list such as `[a, b]`".to_owned(), false),
        "a boolean" => ("true or false".to_owned(), true),
        "a string" => ("text".to_owned(), false),
        _ => (
            expected.to_owned(),
            expected.contains("number") || expected.contains("integer"),
        ),
    };
    // Only where a number or a boolean belongs is the text repeated: elsewhere it may be a
    // credential written in the wrong place.
    let found_shown = match text {
        Some(value) if shows_value => format!("`{value}`"),
        _ => found_for_people(found),
    };
    let is_mapping = expected == "a map" || expected.starts_with("struct ");
    let hint = match text {
        Some(value) if is_mapping && looks_like_key_without_space(value) => {
            "; a key needs a space after its colon, as in `url: https://…`"
        }
        Some(_) if expected == "a sequence" => "; a list of one is written `[item]`",
        _ => "",
    };
    format!("expected {expected_for_people}, found {found_shown}{hint}")
}

/// `url:https://…`: a key, a colon and a value with no space between (a URL's `://` aside).
fn looks_like_key_without_space(text: &str) -> bool {
    text.split_once(':').is_some_and(|(key, value)| {
        !key.is_empty()
            && key.chars().all(|c| c.is_alphanumeric() || c == '_' || c == '-')
            && value.chars().next().is_some_and(|c| c != '/' && !c.is_whitespace())
    })
}

fn found_for_people(found: &str) -> String {
    if found.starts_with("string ") {
        return "text".to_owned();
    }
    if let Some(number) = found
        .strip_prefix("integer `")
        .or_else(|| found.strip_prefix("floating point `"))
        .and_then(|rest| rest.strip_suffix('`'))
    {
        return format!("the number {number}");
    }
    match found {
        "sequence" => "a list".to_owned(),
        "map" => "`key: value` lines".to_owned(),
        "unit value" => "nothing".to_owned(),
        other => other.replace("boolean ", ""),
    }
}
