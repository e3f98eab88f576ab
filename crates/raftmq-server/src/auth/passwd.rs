//! The password file: one `username:hash` per line, `#` comment lines and blank lines allowed.
//! Hashes are Argon2id in PHC string format (`$argon2id$v=19$m=19456,t=2,p=1$<salt>$<hash>`),
//! created by `raftmq passwd`. Parsing and formatting take text; reading and writing the file
//! is the caller's business.

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2};
use std::collections::HashMap;

/// A problem in a password file, with its 1-based line number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {message}")]
pub struct PasswdError {
    pub line: usize,
    pub message: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Line {
    /// A comment or blank line, kept verbatim so `raftmq passwd` preserves it.
    Other(String),
    Entry {
        user: String,
        hash: String,
    },
}

/// A parsed password file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PasswordFile {
    lines: Vec<Line>,
    index: HashMap<String, usize>,
}

/// Why a user name cannot go in the password file (`None` when it can).
pub fn invalid_username(user: &str) -> Option<&'static str> {
    if user.is_empty() {
        Some("the user name is empty")
    } else if user.contains(':') {
        Some("a user name cannot contain `:`")
    } else if user.chars().any(char::is_whitespace) {
        Some("a user name cannot contain white space")
    } else if user.starts_with('#') {
        Some("a user name cannot start with `#`")
    } else {
        None
    }
}

impl PasswordFile {
    /// Parses the text of a password file; the first problem is returned with its line.
    pub fn parse(text: &str) -> Result<PasswordFile, PasswdError> {
        Self::parse_with(text, check_hash)
    }

    /// Parses a file of the same `username:value` layout whose values `check` validates (the
    /// SCRAM credentials file).
    pub fn parse_with<E: std::fmt::Display>(
        text: &str,
        check: impl Fn(&str) -> Result<(), E>,
    ) -> Result<PasswordFile, PasswdError> {
        let mut file = PasswordFile::default();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let err = |message: String| PasswdError { line, message };
            let trimmed = raw.trim();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                file.lines.push(Line::Other(raw.to_owned()));
                continue;
            }
            let Some((user, hash)) = trimmed.split_once(':') else {
                return Err(err("expected `username:hash`".into()));
            };
            if let Some(problem) = invalid_username(user) {
                return Err(err(problem.into()));
            }
            check(hash).map_err(|m| err(format!("user `{user}`: {m}")))?;
            if file.index.contains_key(user) {
                return Err(err(format!("user `{user}` appears twice")));
            }
            file.index.insert(user.to_owned(), file.lines.len());
            file.lines.push(Line::Entry {
                user: user.to_owned(),
                hash: hash.to_owned(),
            });
        }
        Ok(file)
    }

    /// The stored hash of `user`.
    pub fn get(&self, user: &str) -> Option<&str> {
        match self.lines.get(*self.index.get(user)?) {
            Some(Line::Entry { hash, .. }) => Some(hash),
            _ => None,
        }
    }

    /// Every `(user, value)`, in file order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> {
        self.lines.iter().filter_map(|l| match l {
            Line::Entry { user, hash } => Some((user.as_str(), hash.as_str())),
            Line::Other(_) => None,
        })
    }

    /// Number of users.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    /// Whether there are no users.
    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    /// Adds `user` or replaces their hash.
    pub fn set(&mut self, user: &str, hash: String) {
        match self.index.get(user) {
            Some(&i) => {
                self.lines[i] = Line::Entry {
                    user: user.to_owned(),
                    hash,
                }
            }
            None => {
                self.index.insert(user.to_owned(), self.lines.len());
                self.lines.push(Line::Entry {
                    user: user.to_owned(),
                    hash,
                });
            }
        }
    }

    /// Removes `user`; returns whether they existed.
    pub fn remove(&mut self, user: &str) -> bool {
        let Some(i) = self.index.remove(user) else {
            return false;
        };
        self.lines.remove(i);
        for v in self.index.values_mut() {
            if *v > i {
                *v -= 1;
            }
        }
        true
    }

    /// The file's text (comments kept in place).
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        for line in &self.lines {
            match line {
                Line::Other(s) => out.push_str(s),
                Line::Entry { user, hash } => {
                    out.push_str(user);
                    out.push(':');
                    out.push_str(hash);
                }
            }
            out.push('\n');
        }
        out
    }
}

fn check_hash(hash: &str) -> Result<(), String> {
    let parsed = PasswordHash::new(hash)
        .map_err(|e| format!("not a PHC hash string ({e}); create entries with `raftmq passwd`"))?;
    if parsed.algorithm != Algorithm::Argon2id.ident() {
        return Err(format!(
            "unsupported algorithm `{}` (expected argon2id)",
            parsed.algorithm
        ));
    }
    if parsed.hash.is_none() || parsed.salt.is_none() {
        return Err("the hash or salt is missing".into());
    }
    argon2::Params::try_from(&parsed)
        .map(drop)
        .map_err(|e| format!("invalid argon2id parameters ({e})"))
}

/// Hashes `password` with Argon2id (the `argon2` crate's defaults: 19 MiB, 2 passes, 1 lane,
/// as OWASP recommends) and a random salt, in PHC string format.
pub fn hash_password(password: &[u8]) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password, &salt)
        .map(|h| h.to_string())
        .map_err(|e| format!("hashing failed: {e}"))
}

/// Whether `password` matches the PHC `hash` (CPU-heavy: run it off the async workers).
pub fn verify_password(hash: &str, password: &[u8]) -> bool {
    PasswordHash::new(hash).is_ok_and(|h| Argon2::default().verify_password(password, &h).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_then_verify() {
        let hash = hash_password(b"s3cret").expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, b"s3cret"));
        assert!(!verify_password(&hash, b"wrong"));
        assert!(!verify_password("garbage", b"s3cret"));
        // A second hash of the same password has another salt.
        assert_ne!(hash_password(b"s3cret").expect("hash"), hash);
    }

    #[test]
    fn parse_set_remove_keep_comments() {
        let hash = hash_password(b"pw").expect("hash");
        let text = format!("# users\n\nalice:{hash}\nbob:{hash}\n");
        let mut file = PasswordFile::parse(&text).expect("parse");
        assert_eq!(file.len(), 2);
        assert_eq!(file.get("alice"), Some(hash.as_str()));
        assert_eq!(file.get("carol"), None);
        assert_eq!(file.to_text(), text);
        assert!(file.remove("alice"));
        assert!(!file.remove("alice"));
        file.set("carol", hash.clone());
        file.set("bob", hash.clone());
        assert_eq!(
            file.to_text(),
            format!("# users\n\nbob:{hash}\ncarol:{hash}\n")
        );
        assert_eq!(file.get("carol"), Some(hash.as_str()));
    }

    #[test]
    fn errors_name_the_line() {
        let hash = hash_password(b"pw").expect("hash");
        let cases = [
            ("# c\nalice\n".to_owned(), 2, "username:hash"),
            (":x\n".to_owned(), 1, "empty"),
            ("alice:plaintext\n".to_owned(), 1, "PHC"),
            (
                "a:$argon2i$v=19$m=16,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo\n".to_owned(),
                1,
                "argon2id",
            ),
            (format!("a:{hash}\n\na:{hash}\n"), 3, "twice"),
            (format!("a b:{hash}\n"), 1, "white space"),
        ];
        for (text, line, needle) in cases {
            let e = PasswordFile::parse(&text).expect_err(&text);
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.to_string().contains(needle), "{text:?}: {e}");
        }
    }
}
