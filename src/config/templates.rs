//! Stream templates. A stream whose url has `{id}` is a template: it runs once per id, as an
//! instance named `TEMPLATE/ID`, with the id in its url (percent-encoded) and in any header
//! value that has `{id}`. Ids come from `ids`, from an `ids_file`, and (with `dynamic: true`)
//! from the admin API at run time.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};
use serde::{Deserialize, Deserializer};

use super::{Config, JsonPointer, Pattern, SecretText, StreamConfig, expand, from_text, read_regular_file};

/// Where the id goes, in a url or a header value.
pub const ID_PLACEHOLDER: &str = "{id}";

/// `{id}` as a parsed url's path holds it.
const ENCODED_PLACEHOLDER: &str = "%7Bid%7D";

/// The longest instance id.
pub const MAX_ID_BYTES: usize = 128;

/// The largest `ids_file` that is read.
const MAX_IDS_FILE_BYTES: u64 = 16 * 1024 * 1024;

/// What an id keeps unencoded in a url: letters, digits and `-._~`.
const ID_ENCODE_SET: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// An instance id: 1 to 128 printable ASCII characters, without `/` (it separates the template
/// from the id in an instance's name) or spaces.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct InstanceId(String);

impl InstanceId {
    pub fn new(id: &str) -> Result<InstanceId, String> {
        if id.is_empty() {
            return Err("an instance id cannot be empty".to_owned());
        }
        if id.len() > MAX_ID_BYTES {
            return Err(format!("an instance id is at most {MAX_ID_BYTES} bytes long"));
        }
        if let Some(bad) = id.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
            let what = match bad {
                '/' => "`/`".to_owned(),
                ' ' => "a space".to_owned(),
                c if c.is_ascii_control() => "a control character".to_owned(),
                c => format!("`{c}` (only printable ASCII)"),
            };
            return Err(format!("an instance id cannot contain {what}"));
        }
        Ok(InstanceId(id.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for InstanceId {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for InstanceId {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| InstanceId::new(&expand(raw)?))
    }
}

/// An `ids_file`: one id per line (blank lines and lines starting with `#` are skipped), read
/// when the config is, and again on SIGHUP and when the file changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdsFile {
    pub path: PathBuf,
    pub ids: Vec<InstanceId>,
}

impl IdsFile {
    /// Reads the file; every bad line is named in one error.
    pub fn read(path: &Path) -> Result<IdsFile, String> {
        let text = read_regular_file(path, MAX_IDS_FILE_BYTES)
            .map_err(|err| format!("cannot read the ids file {}: {err}", path.display()))?;
        let mut ids = Vec::new();
        let mut seen = BTreeSet::new();
        let mut problems = Vec::new();
        for (index, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            match InstanceId::new(line) {
                Ok(id) if seen.insert(id.clone()) => ids.push(id),
                Ok(_) => {}
                Err(err) => problems.push(format!("{}:{}: {err}", path.display(), index + 1)),
            }
        }
        if !problems.is_empty() {
            return Err(format!("bad ids in the ids file: {}", problems.join("; ")));
        }
        Ok(IdsFile {
            path: path.to_owned(),
            ids,
        })
    }
}

impl<'de> Deserialize<'de> for IdsFile {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        from_text(deserializer, |raw| IdsFile::read(Path::new(&expand(raw)?)))
    }
}

/// When an instance has done its work: after an event that matches is queued for delivery,
/// the instance ends and is not connected again.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StopWhen {
    /// Event types or patterns; all events when left out.
    #[serde(default = "super::match_everything")]
    pub events: Vec<Pattern>,
    /// JSON pointers whose values must all equal the given ones.
    #[serde(default, rename = "where")]
    pub where_equal: BTreeMap<JsonPointer, serde_json::Value>,
}

/// One stream the relay runs: a plain stream, or an instance of a template.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamInstance {
    /// The stream's name, or `TEMPLATE/ID`.
    pub name: String,
    /// The stream's name in the config: what metrics and routes name.
    pub template: String,
    pub id: Option<InstanceId>,
    /// The template's config with the id put in; `ttl` is the instance's own.
    pub config: StreamConfig,
}

impl StreamConfig {
    /// A url with `{id}` makes the stream a template.
    pub fn is_template(&self) -> bool {
        let url = self.url.0.as_str();
        url.contains(ENCODED_PLACEHOLDER) || url.contains(ID_PLACEHOLDER)
    }

    /// The template keys this stream sets (`ids`, `ids_file`, `dynamic`, `stop_when`, `ttl`),
    /// which make sense only with `{id}` in the url.
    pub(super) fn template_keys_set(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if !self.ids.is_empty() {
            keys.push("ids");
        }
        if self.ids_file.is_some() {
            keys.push("ids_file");
        }
        if self.dynamic {
            keys.push("dynamic");
        }
        if self.stop_when.is_some() {
            keys.push("stop_when");
        }
        if self.ttl.is_some() {
            keys.push("ttl");
        }
        keys
    }

    /// The fixed ids: `ids`, then those of `ids_file`, each once.
    pub fn fixed_ids(&self) -> Vec<InstanceId> {
        let mut seen = BTreeSet::new();
        self.ids
            .iter()
            .chain(self.ids_file.iter().flat_map(|file| &file.ids))
            .filter(|id| seen.insert(*id))
            .cloned()
            .collect()
    }

    /// The instance of this template for `id`: the id in the url and header values, and none
    /// of the template's own keys but `stop_when` and `ttl`.
    pub fn instance(&self, id: &InstanceId) -> StreamConfig {
        let encoded = utf8_percent_encode(id.as_str(), ID_ENCODE_SET).to_string();
        let url_text = self
            .url
            .0
            .as_str()
            .replace(ENCODED_PLACEHOLDER, &encoded)
            .replace(ID_PLACEHOLDER, &encoded);
        let mut url = self.url.clone();
        // The encoded id is letters, digits and %XX: a url it is put into still parses.
        if let Ok(parsed) = url::Url::parse(&url_text) {
            url.0 = parsed;
        }
        let headers = self
            .headers
            .iter()
            .map(|(name, value)| (name.clone(), value.with_id(id)))
            .collect();
        StreamConfig {
            url,
            headers,
            ..self.without_ids()
        }
    }

    /// A copy without the template's ids: copying them for each of thousands of instances
    /// would take time that grows with the square of their number.
    fn without_ids(&self) -> StreamConfig {
        // Every field by name, so that a new one cannot be forgotten here.
        let StreamConfig {
            url,
            headers,
            event_type,
            default_event_type,
            keepalive,
            idle_timeout,
            max_event_bytes,
            reconnect,
            rotate_after,
            tls,
            ids: _,
            ids_file: _,
            dynamic: _,
            stop_when,
            ttl,
        } = self;
        StreamConfig {
            url: url.clone(),
            headers: headers.clone(),
            event_type: event_type.clone(),
            default_event_type: default_event_type.clone(),
            keepalive: keepalive.clone(),
            idle_timeout: *idle_timeout,
            max_event_bytes: *max_event_bytes,
            reconnect: reconnect.clone(),
            rotate_after: *rotate_after,
            tls: tls.clone(),
            ids: Vec::new(),
            ids_file: None,
            dynamic: false,
            stop_when: stop_when.clone(),
            ttl: *ttl,
        }
    }
}

impl SecretText {
    /// The value with `{id}` replaced, and so is the text it is made again from.
    fn with_id(&self, id: &InstanceId) -> SecretText {
        if !self.0.contains(ID_PLACEHOLDER) && self.1.is_none() {
            return self.clone();
        }
        SecretText(
            self.0.replace(ID_PLACEHOLDER, id.as_str()),
            self.1.as_ref().map(|recipe| recipe.with_id(id.as_str())),
        )
    }
}

impl Config {
    /// Every stream the relay runs from the config alone: plain streams, and each template's
    /// fixed instances (dynamic ones are added at run time), by name.
    pub fn stream_instances(&self) -> BTreeMap<String, StreamInstance> {
        let mut instances = BTreeMap::new();
        for (name, stream) in &self.streams {
            if !stream.is_template() {
                let instance = StreamInstance {
                    name: name.clone(),
                    template: name.clone(),
                    id: None,
                    config: stream.clone(),
                };
                instances.insert(name.clone(), instance);
                continue;
            }
            for id in stream.fixed_ids() {
                let instance = StreamInstance::of(name, stream, id, stream.ttl);
                instances.insert(instance.name.clone(), instance);
            }
        }
        instances
    }
}

/// The file descriptors a config can take at once, by what takes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Descriptors {
    /// Stream connections: two each while a stream with `rotate_after` overlaps its
    /// connections. Dynamic instances are not counted: they are not known in advance.
    pub streams: u64,
    /// Target connections: `max_in_flight` each.
    pub targets: u64,
    /// The store, the admin server's connections (64) and the process's own.
    pub fixed: u64,
}

impl Descriptors {
    pub fn total(&self) -> u64 {
        self.streams + self.targets + self.fixed
    }
}

impl Config {
    /// What the config's streams and targets can hold open at once.
    pub fn descriptors(&self) -> Descriptors {
        let streams = self
            .stream_instances()
            .values()
            .map(|instance| if instance.config.rotate_after.is_some() { 2 } else { 1 })
            .sum();
        let targets = self.targets.values().map(|target| target.max_in_flight.0 as u64).sum();
        Descriptors {
            streams,
            targets,
            fixed: 128,
        }
    }
}

impl StreamInstance {
    /// The instance of `template` for `id`, ending after `ttl` if set.
    pub fn of(template: &str, config: &StreamConfig, id: InstanceId, ttl: Option<Duration>) -> StreamInstance {
        let mut config = config.instance(&id);
        config.ttl = ttl;
        StreamInstance {
            name: format!("{template}/{id}"),
            template: template.to_owned(),
            id: Some(id),
            config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_printable_ascii_without_slashes_and_bounded() {
        for good in ["40", "8f1c-aa_b.c~d", "a:b@c", "{x}%"] {
            assert!(InstanceId::new(good).is_ok(), "{good}");
        }
        for (bad, message) in [
            ("", "empty"),
            ("a/b", "`/`"),
            ("a b", "a space"),
            ("a\tb", "a control character"),
            ("é", "only printable ASCII"),
        ] {
            let err = InstanceId::new(bad).unwrap_err();
            assert!(err.contains(message), "{bad:?}: {err}");
        }
        assert!(InstanceId::new(&"x".repeat(MAX_ID_BYTES)).is_ok());
        assert!(InstanceId::new(&"x".repeat(MAX_ID_BYTES + 1)).is_err());
    }

    #[test]
    fn an_ids_file_names_every_bad_line() {
        let directory = tempfile::tempdir().unwrap();
        let path = directory.path().join("ids.txt");
        std::fs::write(&path, "# participants\n40\n\n41\n40\na/b\n  42  \nc d\n").unwrap();
        let err = IdsFile::read(&path).unwrap_err();
        assert!(err.contains("ids.txt:6: an instance id cannot contain `/`"), "{err}");
        assert!(
            err.contains("ids.txt:8: an instance id cannot contain a space"),
            "{err}"
        );
        std::fs::write(&path, "# participants\n40\n\n41\n40\n  42  \n").unwrap();
        let ids: Vec<String> = IdsFile::read(&path)
            .unwrap()
            .ids
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(ids, ["40", "41", "42"]);
    }
}
