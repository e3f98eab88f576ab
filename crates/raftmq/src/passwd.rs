//! `raftmq passwd FILE USER [--password-stdin] [--delete]`: edits a password file.
//!
//! The file is rewritten atomically (a temporary file in the same directory, then a rename),
//! keeping its comments; a running broker picks the change up by itself.

use crate::cli::PasswdArgs;
use anyhow::{Context as _, bail};
use raftmq_server::auth::passwd::{PasswordFile, hash_password, invalid_username};
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;

/// Runs the command; returns what was done, for the user.
pub fn run(args: &PasswdArgs) -> anyhow::Result<String> {
    if let Some(problem) = invalid_username(&args.username) {
        bail!("invalid user name `{}`: {problem}", args.username);
    }
    let mut file = read(&args.file)?;
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
    file.set(
        &args.username,
        hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?,
    );
    write(&args.file, &file)?;
    Ok(format!(
        "{} `{}` in {}",
        if existed { "updated" } else { "added" },
        args.username,
        args.file.display()
    ))
}

/// The password file at `path` (empty if it does not exist).
fn read(path: &Path) -> anyhow::Result<PasswordFile> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            PasswordFile::parse(&text).with_context(|| format!("reading {}", path.display()))
        }
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
        };
        assert!(run(&args).expect("delete").contains("removed"));
        assert!(run(&args).is_err(), "deleting twice fails");
        let back = read(&path).expect("read");
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
}
