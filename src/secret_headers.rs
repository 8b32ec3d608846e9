//! The configured headers of a stream or target, whose values may be read from secret files
//! (`${file:...}`, `${cred:...}`) that an agent outside the relay rotates.
//!
//! After a 401 or 403, the values made from files are made again from the files as they are
//! now, and the next connection or attempt uses them: a rotated token fixes authentication
//! without a reload. Files are read only after such a failure, never for every request. A file
//! that cannot be read, or that is empty (an agent between truncating and writing it), keeps
//! the value it had; that is logged, naming the file, never what it holds.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use http::{HeaderMap, HeaderValue};
use tracing::{info, warn};

use crate::config::{HeaderName, SecretRecipe, SecretText};

/// Whose headers these are, for errors and log lines.
#[derive(Debug, Clone)]
pub enum Owner {
    Stream(Arc<str>),
    Target(Arc<str>),
}

impl fmt::Display for Owner {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Owner::Stream(name) => write!(formatter, "stream {name}"),
            Owner::Target(name) => write!(formatter, "target {name}"),
        }
    }
}

/// One version of the headers. A request remembers the version it was sent with, so that
/// failures of requests sent with an older one do not read the files again.
#[derive(Debug)]
pub struct HeaderSet {
    pub version: u64,
    /// Name and value, in the config's order.
    pub pairs: Vec<(String, String)>,
    pub map: HeaderMap,
}

impl HeaderSet {
    fn new(version: u64, pairs: Vec<(String, String)>) -> HeaderSet {
        let mut map = HeaderMap::with_capacity(pairs.len());
        for (name, value) in &pairs {
            // Both were checked when the pair was made.
            if let (Ok(name), Ok(value)) = (
                http::HeaderName::from_bytes(name.as_bytes()),
                HeaderValue::from_str(value),
            ) {
                map.insert(name, value);
            }
        }
        HeaderSet { version, pairs, map }
    }
}

pub struct SecretHeaders {
    owner: Owner,
    current: RwLock<Arc<HeaderSet>>,
    /// The headers made from files: their index in `pairs`, and how to make them again.
    recipes: Vec<(usize, SecretRecipe)>,
    /// Held while files are read again, so that concurrent failures read them once; and the
    /// last problem logged, so that a file that stays unreadable is logged once, not per failure.
    last_problem: Mutex<Option<String>>,
}

impl SecretHeaders {
    /// The headers of a stream or target as configured. An empty value (an unset `${VAR:-}`)
    /// leaves the header out. A value that HTTP cannot carry is an error naming the header,
    /// never the value.
    pub fn new(owner: Owner, headers: &BTreeMap<HeaderName, SecretText>) -> anyhow::Result<SecretHeaders> {
        let mut pairs = Vec::with_capacity(headers.len());
        let mut recipes = Vec::new();
        for (name, value) in headers.iter().filter(|(_, value)| !value.0.is_empty()) {
            if http::HeaderName::from_bytes(name.0.as_bytes()).is_err() || HeaderValue::from_str(&value.0).is_err() {
                anyhow::bail!(
                    "{owner}: header {} has a character that is not allowed in an HTTP header",
                    name.0
                );
            }
            if let Some(recipe) = &value.1 {
                recipes.push((pairs.len(), recipe.clone()));
            }
            pairs.push((name.0.clone(), value.0.clone()));
        }
        Ok(SecretHeaders {
            owner,
            current: RwLock::new(Arc::new(HeaderSet::new(0, pairs))),
            recipes,
            last_problem: Mutex::new(None),
        })
    }

    /// The headers to send now.
    pub fn current(&self) -> Arc<HeaderSet> {
        Arc::clone(&self.current.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// After a 401 or 403 to a request sent with `used`: the headers to send from now on, when
    /// they differ from `used`, made again from their files (or already made again after
    /// another request's failure). None when nothing changed, or nothing comes from a file.
    pub fn after_auth_failure(&self, used: &HeaderSet) -> Option<Arc<HeaderSet>> {
        if self.recipes.is_empty() {
            return None;
        }
        let mut last_problem = self.last_problem.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.current();
        if current.version != used.version {
            return Some(current);
        }
        let mut pairs = current.pairs.clone();
        let mut changed = Vec::new();
        let mut problems = Vec::new();
        for (index, recipe) in &self.recipes {
            let (name, value) = &mut pairs[*index];
            let files = recipe
                .files()
                .map(|path| path.display().to_string())
                .collect::<Vec<_>>();
            match recipe.make() {
                Ok(made) if made == *value => {}
                Ok(made) if made.is_empty() => {
                    problems.push(format!("header {name}: {} is empty", files.join(", ")));
                }
                Ok(made) if HeaderValue::from_str(&made).is_err() => problems.push(format!(
                    "header {name}: {} holds a character that is not allowed in an HTTP header",
                    files.join(", ")
                )),
                Ok(made) => {
                    *value = made;
                    changed.push((name.clone(), files));
                }
                Err(message) => problems.push(format!("header {name}: {message}")),
            }
        }
        let problem = (!problems.is_empty()).then(|| problems.join("; "));
        if problem.is_some() && *last_problem != problem {
            let error = problem.as_deref().unwrap_or_default();
            match &self.owner {
                Owner::Stream(name) => warn!(
                    stream = %name, %error,
                    "cannot make a header again from its secret file after an authentication failure; it keeps its value"
                ),
                Owner::Target(name) => warn!(
                    webhook = %name, %error,
                    "cannot make a header again from its secret file after an authentication failure; it keeps its value"
                ),
            }
        }
        *last_problem = problem;
        if changed.is_empty() {
            return None;
        }
        let next = Arc::new(HeaderSet::new(current.version + 1, pairs));
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::clone(&next);
        for (header, files) in changed {
            let files = files.join(", ");
            match &self.owner {
                Owner::Stream(name) => info!(
                    stream = %name, %header, %files,
                    "a header's secret file changed; the next connections use it"
                ),
                Owner::Target(name) => info!(
                    webhook = %name, %header, %files,
                    "a header's secret file changed; the next attempts use it"
                ),
            }
        }
        Some(next)
    }
}
