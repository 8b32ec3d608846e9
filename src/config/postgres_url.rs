//! `storage.url`, read as libpq reads it (the TLS connector is `queue::postgres_connect`).
//!
//! tokio-postgres knows `sslmode` disable, prefer and require; managed databases hand out urls
//! with `sslmode=verify-full` (or `verify-ca`), so those are read here and the url is passed on
//! with `require`. What the certificate check does follows libpq:
//!
//! | `sslmode` | TLS | the server's certificate |
//! |---|---|---|
//! | `disable` | never | — |
//! | `allow`, `prefer` (the default) | when the server offers it | not checked |
//! | `require` | always | not checked, unless `storage.tls.ca_file` is set: then as `verify-ca` |
//! | `verify-ca` | always | chains to a trusted authority |
//! | `verify-full` | always | chains to a trusted authority and names the host |
//!
//! The trusted authorities are those of streams and targets (the bundled roots, the system's
//! store, `SSL_CERT_FILE`) plus `storage.tls.ca_file`; `storage.tls.client_cert` and
//! `client_key` answer a server that asks for a client certificate. libpq's `sslrootcert`,
//! `sslcert` and `sslkey` are not read from the url: a config error says to use `storage.tls`.
//! No error here ever holds the url (it holds the password).

/// What a connection checks of the server's certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verify {
    /// Encrypted when TLS is used; the certificate is not checked.
    Nothing,
    /// The certificate chains to a trusted authority.
    Authority,
    /// The certificate chains to a trusted authority and names the host.
    Full,
}

/// `storage.url` as tokio-postgres takes it, and what its `sslmode` asks of the certificate.
#[derive(Debug)]
pub struct DatabaseUrl {
    pub config: tokio_postgres::Config,
    pub verify: Verify,
}

/// The libpq settings read from files, which the relay takes from `storage.tls` instead.
const FILE_SETTINGS: &[(&str, &str)] = &[
    ("sslrootcert", "storage.tls.ca_file"),
    ("sslcert", "storage.tls.client_cert"),
    ("sslkey", "storage.tls.client_key"),
];

/// Reads `storage.url` (`postgres://…` or `key=value …`); `has_ca_file` says whether
/// `storage.tls.ca_file` is set. The error never holds the url.
pub fn parse_url(url: &str, has_ca_file: bool) -> Result<DatabaseUrl, String> {
    let mut verify = Verify::Nothing;
    let mut checks_by_ca_file = false;
    let mut take_mode = |value: &str| -> Result<&'static str, String> {
        let (mode, check) = match value {
            "disable" => ("disable", Verify::Nothing),
            "allow" | "prefer" => ("prefer", Verify::Nothing),
            "require" => {
                checks_by_ca_file = true;
                ("require", Verify::Nothing)
            }
            "verify-ca" => ("require", Verify::Authority),
            "verify-full" => ("require", Verify::Full),
            _ => {
                return Err("sslmode is not one of disable, allow, prefer, require, verify-ca, verify-full".to_owned());
            }
        };
        verify = check;
        Ok(mode)
    };
    let rewritten = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|pair| !pair.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            file_setting(key)?;
            if key == "sslmode" {
                kept.push(format!("sslmode={}", take_mode(value)?));
            } else {
                kept.push(pair.to_owned());
            }
        }
        if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        // `key=value …`: only the sslmode word changes; the rest (quoted values with spaces)
        // is passed on as written.
        let mut rewritten = url.to_owned();
        for word in url.split_ascii_whitespace() {
            let key = word.split_once('=').map_or(word, |(key, _)| key.trim());
            file_setting(key)?;
            if let Some(value) = word.strip_prefix("sslmode=") {
                rewritten = rewritten.replacen(word, &format!("sslmode={}", take_mode(value)?), 1);
            }
        }
        rewritten
    };
    if checks_by_ca_file && has_ca_file {
        verify = Verify::Authority;
    }
    let config = rewritten.parse::<tokio_postgres::Config>().map_err(|err| {
        // tokio-postgres names the option or value it refuses, never the url.
        format!("is not a PostgreSQL connection url (postgres://user:password@host:port/database): {err}")
    })?;
    Ok(DatabaseUrl { config, verify })
}

fn file_setting(key: &str) -> Result<(), String> {
    match FILE_SETTINGS.iter().find(|(setting, _)| *setting == key) {
        Some((setting, instead)) => Err(format!(
            "{setting} is not read from the url; set {instead} instead (a PEM file)"
        )),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use tokio_postgres::config::SslMode;

    use super::*;

    fn parsed(url: &str) -> (SslMode, Verify) {
        let parsed = parse_url(url, false).unwrap();
        (parsed.config.get_ssl_mode(), parsed.verify)
    }

    #[test]
    fn sslmode_is_read_as_libpq_reads_it() {
        let url = "postgres://relay:secret@db.example:5432/relay";
        assert_eq!(parsed(url), (SslMode::Prefer, Verify::Nothing));
        assert_eq!(
            parsed(&format!("{url}?sslmode=disable")),
            (SslMode::Disable, Verify::Nothing)
        );
        assert_eq!(
            parsed(&format!("{url}?sslmode=allow")),
            (SslMode::Prefer, Verify::Nothing)
        );
        assert_eq!(
            parsed(&format!("{url}?sslmode=require")),
            (SslMode::Require, Verify::Nothing)
        );
        assert_eq!(
            parsed(&format!("{url}?application_name=x&sslmode=verify-ca")),
            (SslMode::Require, Verify::Authority)
        );
        assert_eq!(
            parsed(&format!("{url}?sslmode=verify-full&connect_timeout=3")),
            (SslMode::Require, Verify::Full)
        );
        assert_eq!(
            parsed("host=db.example user=relay sslmode=verify-full"),
            (SslMode::Require, Verify::Full)
        );
        let quoted = parse_url("host=db.example password='two  spaces' sslmode=verify-ca", false).unwrap();
        assert_eq!(quoted.config.get_password(), Some(&b"two  spaces"[..]));
        assert_eq!(quoted.verify, Verify::Authority);
        // require with a ca_file checks the chain, as libpq does with a root certificate.
        let with_ca = parse_url(&format!("{url}?sslmode=require"), true).unwrap();
        assert_eq!(with_ca.verify, Verify::Authority);
        assert_eq!(parse_url(url, true).unwrap().verify, Verify::Nothing);
    }

    #[test]
    fn errors_name_the_setting_and_never_the_password() {
        let url = "postgres://relay:s3cret-pw@db.example/relay";
        for (query, expected) in [
            ("sslmode=verify", "sslmode is not one of"),
            ("sslrootcert=/etc/ssl/rds.pem", "set storage.tls.ca_file instead"),
            ("sslcert=/a.pem", "set storage.tls.client_cert instead"),
            ("sslkey=/a.key", "set storage.tls.client_key instead"),
            ("no_such_option=1", "is not a PostgreSQL connection url"),
        ] {
            let err = parse_url(&format!("{url}?{query}"), false).unwrap_err();
            assert!(err.contains(expected), "{query}: {err}");
            assert!(!err.contains("s3cret-pw"), "{err}");
        }
        let err = parse_url("host=db sslrootcert=/x.pem password=s3cret-pw", false).unwrap_err();
        assert!(
            err.contains("storage.tls.ca_file") && !err.contains("s3cret-pw"),
            "{err}"
        );
    }
}
