//! Standard Webhooks signing (<https://www.standardwebhooks.com/>): a target configured with a
//! `whsec_` secret gets `webhook-id`, `webhook-timestamp` and `webhook-signature` headers, so a
//! receiver can check each request with any Standard Webhooks or Svix library. Pure: no IO.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64_STANDARD;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The header that carries the webhook's id, the same for every attempt of one delivery.
pub const WEBHOOK_ID_HEADER: &str = "webhook-id";

/// The header that carries the attempt's time in unix seconds, which the signature covers.
pub const WEBHOOK_TIMESTAMP_HEADER: &str = "webhook-timestamp";

/// The header that carries the value returned by [`SigningKey::sign`].
pub const WEBHOOK_SIGNATURE_HEADER: &str = "webhook-signature";

/// The prefix that marks a symmetric Standard Webhooks secret.
const SECRET_PREFIX: &str = "whsec_";

/// The specification asks for at least 24 random bytes (192 bits); a shorter key is refused
/// when the config is loaded rather than quietly weakening every signature.
const MIN_KEY_BYTES: usize = 24;

/// The identifier of the HMAC-SHA256 scheme in the signature header.
const SIGNATURE_VERSION_PREFIX: &str = "v1,";

/// The decimal digits of `u64::MAX`.
const MAX_TIMESTAMP_DIGITS: usize = 20;

/// A parsed signing key; Debug must not print the key.
///
/// It keeps the HMAC state already keyed, not the key bytes: each signature clones that state
/// instead of hashing the key again, and the raw key does not outlive [`SigningKey::parse`].
#[derive(Clone)]
pub struct SigningKey {
    keyed_mac: Hmac<Sha256>,
}

/// Why a signing secret was refused. No message includes the secret or any part of it, because
/// these errors end up in logs and in `sse-relay check` output.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SigningKeyError {
    #[error("the signing secret is empty")]
    Empty,
    #[error("the signing secret must start with whsec_")]
    MissingPrefix,
    // The base64 error is deliberately not kept as a source: its message names the offending
    // character and its offset, which would leak part of the secret.
    #[error("the signing secret is not valid base64 after whsec_")]
    NotBase64,
    #[error(
        "the signing secret is {n_key_bytes} bytes after base64 decoding; \
         Standard Webhooks requires at least {MIN_KEY_BYTES}"
    )]
    TooShort { n_key_bytes: usize },
}

impl SigningKey {
    /// Parses a `whsec_<base64>` secret, the form Standard Webhooks and Svix show to users.
    ///
    /// The `whsec_` prefix is required: many mistaken values (a password, a hex token) happen to
    /// be valid base64, and accepting a bare secret would sign with the wrong key without a word.
    /// The base64 is the standard alphabet with its `=` padding, as the specification's own
    /// libraries expect, so a secret that was cut short while copying is refused here rather than
    /// at the receiver. An empty secret is an error; whether an empty value in the config means
    /// "do not sign" is the config's decision, not this module's.
    pub fn parse(secret: &str) -> Result<SigningKey, SigningKeyError> {
        if secret.is_empty() {
            return Err(SigningKeyError::Empty);
        }
        let encoded_key = secret
            .strip_prefix(SECRET_PREFIX)
            .ok_or(SigningKeyError::MissingPrefix)?;
        if encoded_key.is_empty() {
            return Err(SigningKeyError::Empty);
        }
        let key = BASE64_STANDARD
            .decode(encoded_key)
            .map_err(|_| SigningKeyError::NotBase64)?;
        if key.len() < MIN_KEY_BYTES {
            return Err(SigningKeyError::TooShort { n_key_bytes: key.len() });
        }
        let keyed_mac = Hmac::<Sha256>::new_from_slice(&key).expect("HMAC accepts a key of any length");
        Ok(SigningKey { keyed_mac })
    }

    /// The value of the webhook-signature header for one attempt.
    ///
    /// Signs `{webhook_id}.{timestamp}.{body}`, fed to the MAC piece by piece so the body is
    /// never copied. The id must not contain a `.`: the specification warns that a caller-chosen
    /// id with a `.` lets one signed message pass for another, so the caller picks ids without one.
    /// `timestamp` is the attempt's time, not the event's, and goes in `webhook-timestamp` as is.
    pub fn sign(&self, webhook_id: &str, timestamp: u64, body: &[u8]) -> String {
        let mut timestamp_buffer = [0u8; MAX_TIMESTAMP_DIGITS];
        let mut mac = self.keyed_mac.clone();
        mac.update(webhook_id.as_bytes());
        mac.update(b".");
        mac.update(decimal_digits(timestamp, &mut timestamp_buffer));
        mac.update(b".");
        mac.update(body);
        let digest = mac.finalize().into_bytes();

        // "v1," and 44 base64 characters for the 32-byte digest: one allocation, sized exactly.
        let mut header_value = String::with_capacity(SIGNATURE_VERSION_PREFIX.len() + 44);
        header_value.push_str(SIGNATURE_VERSION_PREFIX);
        BASE64_STANDARD.encode_string(digest, &mut header_value);
        header_value
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("SigningKey(***)")
    }
}

/// Writes `value` in decimal into the end of `buffer` and returns the digits, so that signing
/// needs no heap allocation for the timestamp.
fn decimal_digits(value: u64, buffer: &mut [u8; MAX_TIMESTAMP_DIGITS]) -> &[u8] {
    let mut start = buffer.len();
    let mut remaining = value;
    loop {
        start -= 1;
        buffer[start] = b'0' + (remaining % 10) as u8;
        remaining /= 10;
        if remaining == 0 {
            break;
        }
    }
    &buffer[start..]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The vector of the specification's reference libraries (`libraries/php/tests/WebhookTest.php`
    /// in the standard-webhooks repository, and Svix's own tests); matching it is what lets a
    /// receiver verify the relay's requests with any of those libraries.
    #[test]
    fn sign_reproduces_the_standard_webhooks_test_vector() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let signature = key.sign("msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(signature, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    /// A second vector, from the reference Rust library's tests, so that one lucky match cannot
    /// hide a mistake in how the pieces are joined.
    #[test]
    fn sign_reproduces_the_reference_rust_library_vector() {
        let key = SigningKey::parse("whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD").unwrap();
        let signature = key.sign(
            "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk",
            1649367553,
            br#"{"email":"test@example.com","username":"test_user"}"#,
        );
        assert_eq!(signature, "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=");
    }

    #[test]
    fn sign_covers_the_id_the_timestamp_and_the_body() {
        let key = SigningKey::parse("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let original = key.sign("msg_1", 1614265330, b"{}");
        assert_eq!(original, key.sign("msg_1", 1614265330, b"{}"));
        assert_ne!(original, key.sign("msg_2", 1614265330, b"{}"));
        assert_ne!(original, key.sign("msg_1", 1614265331, b"{}"));
        assert_ne!(original, key.sign("msg_1", 1614265330, b"{ }"));
        assert_eq!(original.len(), "v1,".len() + 44);
    }

    #[test]
    fn decimal_digits_match_to_string() {
        for value in [0, 1, 9, 10, 1614265330, u64::MAX] {
            let mut buffer = [0u8; MAX_TIMESTAMP_DIGITS];
            assert_eq!(decimal_digits(value, &mut buffer), value.to_string().as_bytes());
        }
    }

    #[test]
    fn bad_secrets_are_refused_without_showing_them() {
        #[track_caller]
        fn check(secret: &str, expected: SigningKeyError) {
            let error = SigningKey::parse(secret).unwrap_err();
            assert_eq!(error, expected);
            let (message, debug) = (error.to_string(), format!("{error:?}"));
            let key_part = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
            if !key_part.is_empty() {
                assert!(!message.contains(key_part), "{message:?} shows the secret");
                assert!(!debug.contains(key_part), "{debug:?} shows the secret");
            }
        }

        check("", SigningKeyError::Empty);
        check("whsec_", SigningKeyError::Empty);
        check("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SigningKeyError::MissingPrefix);
        check("WHSEC_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SigningKeyError::MissingPrefix);
        check("whsk_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", SigningKeyError::MissingPrefix);
        check("whsec_not-base64!secret", SigningKeyError::NotBase64);
        check("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\n", SigningKeyError::NotBase64);
        // The URL-safe alphabet is not what receivers decode with.
        check("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaS_", SigningKeyError::NotBase64);
        // 28 bytes without their trailing `==`, which the specification's libraries also refuse.
        check(
            "whsec_c2VjcmV0LW9mLWEtcm90YXRlZC1lbmRwb2ludA",
            SigningKeyError::NotBase64,
        );
        check("whsec_c2hvcnQ=", SigningKeyError::TooShort { n_key_bytes: 5 });
    }

    #[test]
    fn the_too_short_message_names_the_sizes() {
        let error = SigningKey::parse("whsec_c2hvcnQ=").unwrap_err();
        assert_eq!(
            error.to_string(),
            "the signing secret is 5 bytes after base64 decoding; Standard Webhooks requires at least 24"
        );
    }

    #[test]
    fn debug_does_not_show_the_key() {
        let secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let key = SigningKey::parse(secret).unwrap();
        let debug = format!("{key:?}");
        assert_eq!(debug, "SigningKey(***)");
        let key_bytes = BASE64_STANDARD.decode(&secret[SECRET_PREFIX.len()..]).unwrap();
        assert!(!debug.contains(&secret[SECRET_PREFIX.len()..]));
        assert!(!debug.contains(&format!("{key_bytes:?}")));
        assert_eq!(format!("{key:#?}"), "SigningKey(***)");
    }
}
