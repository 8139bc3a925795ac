//! Accounts and credentials: name rules and the keyed name hash, password rules and argon2id,
//! one-shot login tokens.
//!
//! Names are case-insensitive: they are trimmed of nothing, lowercased, and hashed with
//! HMAC-SHA256 under the server's name key; only that hash is stored. Passwords are hashed with
//! argon2id at the configured cost (the default is OWASP's: 19 MiB, t=2, p=1).

use argon2::{
    password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString},
    Algorithm, Argon2, Params, Version,
};
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};

use crate::{config::Security, protocol::ErrorCode, store::NameKey};

pub const NAME_BYTES_MAX: usize = 64;
pub const PASSWORD_BYTES_MIN: usize = 8;
pub const PASSWORD_BYTES_MAX: usize = 256;
pub const DEVICE_ID_BYTES_MAX: usize = 64;
/// A token is 16 hex digits of user id followed by 32 hex digits of secret.
pub const TOKEN_CHARS: usize = 48;

pub struct Auth {
    name_key: [u8; 32],
    argon: Argon2<'static>,
}

impl Auth {
    /// `data_dir`: where a generated name key is kept when `security.name_key` is empty (the
    /// embedded store); `None` with an empty key means a random key for this process only.
    pub fn new(sec: &Security, data_dir: Option<&std::path::Path>) -> anyhow::Result<Auth> {
        let name_key = if !sec.name_key.is_empty() {
            let v = hex::decode(&sec.name_key)?;
            v.try_into().map_err(|_| anyhow::anyhow!("security.name_key must be 32 bytes"))?
        } else if let Some(dir) = data_dir {
            load_or_create_key(&dir.join("name.key"))?
        } else {
            random_bytes::<32>()
        };
        let params = Params::new(sec.argon2_m_kib, sec.argon2_t, sec.argon2_p, None)
            .map_err(|e| anyhow::anyhow!("argon2 parameters: {e}"))?;
        Ok(Auth { name_key, argon: Argon2::new(Algorithm::Argon2id, Version::V0x13, params) })
    }

    /// The stored key of a name (after [`check_name`]).
    pub fn name_key(&self, name: &str) -> NameKey {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.name_key).expect("any key length");
        mac.update(name.to_lowercase().as_bytes());
        mac.finalize().into_bytes().into()
    }

    /// argon2id PHC string of `password`. Slow by design: call on a worker thread.
    pub fn hash_password(&self, password: &str) -> Result<String, ErrorCode> {
        let salt = SaltString::encode_b64(&random_bytes::<16>()).map_err(|_| ErrorCode::Internal)?;
        self.argon
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|_| ErrorCode::Internal)
    }

    /// Check `password` against a stored PHC string (its own parameters apply). Slow by design.
    pub fn verify_password(&self, hash: &str, password: &str) -> bool {
        match PasswordHash::new(hash) {
            Ok(parsed) => self.argon.verify_password(password.as_bytes(), &parsed).is_ok(),
            Err(_) => false,
        }
    }
}

/// Read a 32-byte hex key from `path`, or create it (mode 0600) with a random key.
fn load_or_create_key(path: &std::path::Path) -> anyhow::Result<[u8; 32]> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let v = hex::decode(text.trim()).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            v.try_into().map_err(|_| anyhow::anyhow!("{}: the key must be 32 bytes", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)?;
            }
            let key = random_bytes::<32>();
            let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path)?;
            writeln!(f, "{}", hex::encode(key))?;
            f.sync_all()?;
            Ok(key)
        }
        Err(e) => Err(anyhow::anyhow!("{}: {e}", path.display())),
    }
}

/// 1..=64 bytes of UTF-8 without control characters and without leading or trailing spaces.
pub fn check_name(name: &str) -> Result<(), ErrorCode> {
    let ok = !name.is_empty()
        && name.len() <= NAME_BYTES_MAX
        && !name.chars().any(char::is_control)
        && name.trim() == name;
    ok.then_some(()).ok_or(ErrorCode::InvalidName)
}

/// 8..=256 bytes.
pub fn check_password(password: &str) -> Result<(), ErrorCode> {
    (PASSWORD_BYTES_MIN..=PASSWORD_BYTES_MAX)
        .contains(&password.len())
        .then_some(())
        .ok_or(ErrorCode::InvalidPassword)
}

pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    getrandom::getrandom(&mut b).expect("the OS random source works");
    b
}

/// A fresh token for `user`: the text handed to the client, and the hash the server keeps.
pub fn new_token(user: u64) -> (String, [u8; 32]) {
    let secret = random_bytes::<16>();
    let text = format!("{user:016x}{}", hex::encode(secret));
    (text, token_hash(&secret))
}

/// Split a token's text into its user id and the hash of its secret.
pub fn parse_token(text: &str) -> Option<(u64, [u8; 32])> {
    if text.len() != TOKEN_CHARS || !text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
        return None;
    }
    let user = u64::from_str_radix(&text[..16], 16).ok()?;
    let secret = hex::decode(&text[16..]).ok()?;
    Some((user, token_hash(&secret)))
}

fn token_hash(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Names are keyed case-insensitively and the key depends on the server key.
    #[test]
    fn name_keys() {
        let sec = Security { argon2_m_kib: 64, argon2_t: 1, ..Security::default() };
        let a = Auth::new(&sec, None).unwrap();
        let b = Auth::new(&sec, None).unwrap();
        assert_eq!(a.name_key("Alice"), a.name_key("alice"));
        assert_ne!(a.name_key("alice"), a.name_key("bob"));
        assert_ne!(a.name_key("alice"), b.name_key("alice"), "random per-process key");
        assert!(check_name(" alice").is_err() && check_name("").is_err() && check_name("a\nb").is_err());
        assert!(check_name("ålice").is_ok());
        // a generated key is kept in the data directory and found again
        let dir = tempfile::tempdir().unwrap();
        let c = Auth::new(&sec, Some(dir.path())).unwrap();
        let d = Auth::new(&sec, Some(dir.path())).unwrap();
        assert_eq!(c.name_key("alice"), d.name_key("alice"));
    }

    /// Password hashes verify only the right password.
    #[test]
    fn passwords() {
        let sec = Security { argon2_m_kib: 64, argon2_t: 1, ..Security::default() };
        let a = Auth::new(&sec, None).unwrap();
        let h = a.hash_password("correct horse").unwrap();
        assert!(h.starts_with("$argon2id$"));
        assert!(a.verify_password(&h, "correct horse"));
        assert!(!a.verify_password(&h, "wrong horse"));
    }

    /// Tokens carry their user and parse back; garbage does not parse.
    #[test]
    fn tokens() {
        let (text, hash) = new_token(42);
        assert_eq!(parse_token(&text), Some((42, hash)));
        assert_eq!(parse_token("zz"), None);
        assert_eq!(parse_token(&"g".repeat(48)), None);
        assert_eq!(parse_token(&text.to_uppercase()), None, "only lowercase hex");
        assert_eq!(parse_token(&format!("+{}", &text[1..])), None);
    }
}
