//! `raftmq passwd FILE USER [--password-stdin] [--delete] [--scram]`: edits a password file
//! (Argon2id hashes), or with `--scram` a SCRAM credentials file (salted SCRAM-SHA-256 and
//! SCRAM-SHA-512 keys: an Argon2id hash cannot serve SCRAM, whose client proves it knows a
//! PBKDF2-derived key).
//!
//! The file is rewritten atomically (a temporary file in the same directory, then a rename),
//! keeping its comments; a running broker picks the change up by itself.

use crate::cli::PasswdArgs;
use anyhow::{Context as _, bail};
use raftmq_server::auth::passwd::{PasswordFile, hash_password, invalid_username};
use raftmq_server::auth::scram::{self, Credential, Mechanism};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

/// Runs the command; returns what was done, for the user.
pub fn run(args: &PasswdArgs) -> anyhow::Result<String> {
    if let Some(problem) = invalid_username(&args.username) {
        bail!("invalid user name `{}`: {problem}", args.username);
    }
    let mut file = read(&args.file, args.scram)?;
    if args.delete {
        if !file.remove(&args.username) {
            bail!("user `{}` is not in {}", args.username, args.file.display());
        }
        write(&args.file, &file)?;
        return Ok(format!(
            "removed `{}` from {}",
            args.username,
            args.file.display()
        ));
    }
    let password = if args.password_stdin {
        read_line(&mut std::io::stdin().lock())?
    } else if std::io::stdin().is_terminal() {
        let first = prompt("Password: ")?;
        let again = prompt("Again: ")?;
        if first != again {
            bail!("the passwords differ");
        }
        first
    } else {
        bail!(
            "standard input is not a terminal: pass the password on standard input with \
             --password-stdin (e.g. `printf '%s\\n' \"$PASSWORD\" | raftmq passwd FILE USER \
             --password-stdin`)"
        );
    };
    if password.is_empty() {
        bail!("the password is empty");
    }
    let existed = file.get(&args.username).is_some();
    let value = if args.scram {
        let credentials = Mechanism::ALL
            .into_iter()
            .map(|m| Credential::generate(m, password.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(anyhow::Error::msg)?;
        scram::format_credentials(&credentials)
    } else {
        hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?
    };
    file.set(&args.username, value);
    write(&args.file, &file)?;
    Ok(format!(
        "{} `{}` in {}",
        if existed { "updated" } else { "added" },
        args.username,
        args.file.display()
    ))
}

/// The password file (or SCRAM credentials file) at `path` (empty if it does not exist).
fn read(path: &Path, scram: bool) -> anyhow::Result<PasswordFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => if scram {
            scram::parse_file(&text)
        } else {
            PasswordFile::parse(&text)
        }
        .with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(PasswordFile::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes `file` to `path` atomically: a new file is readable by its owner only, an existing
/// one keeps its permissions.
fn write(path: &Path, file: &PasswordFile) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt as _;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map_or_else(|| "passwd".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An existing file keeps its permissions (e.g. group-readable for the broker's user).
        if let Ok(meta) = std::fs::metadata(path) {
            std::fs::set_permissions(&tmp, meta.permissions())?;
        }
        out.write_all(file.to_text().as_bytes())?;
        out.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

/// The first line of `input`, without its line ending.
fn read_line(input: &mut impl BufRead) -> anyhow::Result<String> {
    let mut line = String::new();
    input
        .read_line(&mut line)
        .context("reading the password from standard input")?;
    let trimmed = line.strip_suffix('\n').unwrap_or(&line);
    Ok(trimmed.strip_suffix('\r').unwrap_or(trimmed).to_owned())
}

/// Asks for a password on the terminal without echoing it (`stty -echo` around the read).
fn prompt(label: &str) -> anyhow::Result<String> {
    let mut err = std::io::stderr();
    let _ = write!(err, "{label}");
    let _ = err.flush();
    let stty = |arg: &str| {
        std::process::Command::new("stty")
            .arg(arg)
            .stdin(std::process::Stdio::inherit())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !stty("-echo") {
        bail!("cannot turn off terminal echo (stty): use --password-stdin");
    }
    let line = read_line(&mut std::io::stdin().lock());
    stty("echo");
    let _ = writeln!(err);
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use raftmq_server::auth::passwd::verify_password;

    #[test]
    fn read_line_strips_the_line_ending_only() {
        let mut input: &[u8] = b" pass word \r\nsecond\n";
        assert_eq!(read_line(&mut input).expect("line"), " pass word ");
        let mut input: &[u8] = b"no-newline";
        assert_eq!(read_line(&mut input).expect("line"), "no-newline");
    }

    #[test]
    fn delete_and_update_rewrite_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("passwd");
        let mut file = PasswordFile::default();
        file.set("alice", hash_password(b"a").expect("hash"));
        file.set("bob", hash_password(b"b").expect("hash"));
        write(&path, &file).expect("write");
        let args = PasswdArgs {
            file: path.clone(),
            username: "alice".into(),
            password_stdin: false,
            delete: true,
            scram: false,
        };
        assert!(run(&args).expect("delete").contains("removed"));
        assert!(run(&args).is_err(), "deleting twice fails");
        let back = read(&path, false).expect("read");
        assert_eq!(back.get("alice"), None);
        assert!(verify_password(back.get("bob").expect("bob"), b"b"));
        use std::os::unix::fs::PermissionsExt as _;
        let mode = |p: &Path| std::fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).expect("chmod");
        write(&path, &back).expect("write");
        assert_eq!(mode(&path), 0o640, "an existing file keeps its permissions");
        let bad = PasswdArgs {
            username: "a:b".into(),
            ..args
        };
        assert!(run(&bad).expect_err("bad name").to_string().contains("`:`"));
    }

    #[test]
    fn scram_files_hold_salted_keys_that_a_client_proves() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("scram");
        let mut file = PasswordFile::default();
        let credentials: Vec<Credential> = Mechanism::ALL
            .into_iter()
            .map(|m| Credential::generate(m, b"pencil").expect("salt"))
            .collect();
        file.set("carol", scram::format_credentials(&credentials));
        write(&path, &file).expect("write");
        let text = std::fs::read_to_string(&path).expect("read");
        assert!(!text.contains("pencil"));
        assert!(text.starts_with("carol:SCRAM-SHA-256$4096:"), "{text}");
        let store = std::sync::Arc::new(scram::ScramStore::parse(&text).expect("valid"));
        for m in Mechanism::ALL {
            let mut server = scram::ServerExchange::new(m, store.clone(), "c");
            let mut client = scram::ClientExchange::new(m, "carol", b"pencil", "n0nce");
            let first = server
                .server_first(client.client_first().as_bytes())
                .expect("first");
            let last = client.client_final(first.as_bytes()).expect("final");
            let (user, _) = server
                .server_final(last.as_bytes())
                .expect("proof accepted");
            assert_eq!(user, "carol");
        }
        // A SCRAM file is not a password file, nor the other way round.
        assert!(read(&path, false).is_err());
        assert!(read(&path, true).is_ok());
        let args = PasswdArgs {
            file: path.clone(),
            username: "carol".into(),
            password_stdin: false,
            delete: true,
            scram: true,
        };
        assert!(run(&args).expect("delete").contains("removed"));
        assert_eq!(read(&path, true).expect("read").len(), 0);
    }
}
