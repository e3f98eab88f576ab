//! The conformance matrix (`docs/conformance.md`) and the tests agree.
//!
//! Every row of the matrix is one normative statement of MQTT 3.1.1 or 5.0, identified by its
//! version and its id (`MQTT-3.1.2-6`: the same id means different things in the two versions).
//! A test covering statements says so in its doc comment, one version per line:
//!
//! ```text
//! /// Conformance (3.1.1): [MQTT-3.1.2-24]
//! /// Conformance (5.0): [MQTT-3.1.2-22] [MQTT-3.1.2-23]
//! ```
//!
//! This test reads the matrix and every `*.rs` file under `crates/` and `tests/`, and fails,
//! listing each disagreement, when: an id appears twice for one version; a row has an unknown
//! version or status; a `tested` row names no test, names a test that does not exist, or names
//! one that does not carry its id; a test carries an id the matrix lacks, or one whose row does
//! not list it as evidence; or a conformance line is malformed or not on a test.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

const VERSIONS: [&str; 2] = ["3.1.1", "5.0"];
const STATUSES: [&str; 5] = [
    "tested",
    "allowed choice",
    "not applicable",
    "untested",
    "deviation",
];
const TAG_PREFIX: &str = "Conformance (";

/// A statement: (version, id), e.g. ("5.0", "MQTT-3.1.2-6").
type Statement = (String, String);

struct Row {
    line: usize,
    status: String,
    /// For `tested` rows, the tests named as evidence (`file_stem::function`).
    tests: Vec<String>,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Whether `id` has the form `MQTT-<digits>.<digits>.<digits>-<digits>`.
fn is_statement_id(id: &str) -> bool {
    let Some(rest) = id.strip_prefix("MQTT-") else {
        return false;
    };
    let Some((section, number)) = rest.rsplit_once('-') else {
        return false;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let parts: Vec<&str> = section.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| digits(p)) && digits(number)
}

/// Parses the matrix: every table row whose first cell is a statement id.
fn parse_matrix(text: &str, errors: &mut Vec<String>) -> BTreeMap<Statement, Row> {
    let mut rows = BTreeMap::new();
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let Some(body) = line.trim().strip_prefix('|') else {
            continue;
        };
        let cells: Vec<&str> = body
            .trim_end_matches('|')
            .split('|')
            .map(str::trim)
            .collect();
        let id = cells[0].trim_matches('`');
        if !id.starts_with("MQTT-") {
            continue; // the header, its separator, or another table
        }
        if cells.len() != 6 {
            errors.push(format!(
                "conformance.md:{line_no}: {} cells, expected 6 (id | version | statement | applies to | status | evidence)",
                cells.len()
            ));
            continue;
        }
        let (version, status, evidence) = (cells[1], cells[4], cells[5]);
        if !is_statement_id(id) {
            errors.push(format!("conformance.md:{line_no}: malformed id {id:?}"));
        }
        if !VERSIONS.contains(&version) {
            errors.push(format!(
                "conformance.md:{line_no}: {id}: unknown version {version:?}"
            ));
        }
        if !STATUSES.contains(&status) {
            errors.push(format!(
                "conformance.md:{line_no}: {id}: unknown status {status:?}"
            ));
        }
        let tests: Vec<String> = if status == "tested" {
            evidence
                .split([',', ' '])
                .map(|t| t.trim().trim_matches('`'))
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect()
        } else {
            Vec::new()
        };
        if status == "tested" && tests.is_empty() {
            errors.push(format!(
                "conformance.md:{line_no}: {version} {id} is tested but names no test"
            ));
        }
        if status != "tested" && status != "untested" && evidence.is_empty() {
            errors.push(format!(
                "conformance.md:{line_no}: {version} {id} is {status} without saying why"
            ));
        }
        let key = (version.to_owned(), id.to_owned());
        if let Some(first) = rows.get(&key) {
            let first: &Row = first;
            errors.push(format!(
                "conformance.md:{line_no}: {version} {id} is already on line {}",
                first.line
            ));
            continue;
        }
        rows.insert(
            key,
            Row {
                line: line_no,
                status: status.to_owned(),
                tests,
            },
        );
    }
    rows
}

/// Every `*.rs` file under `dir`, skipping build output.
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The name of the function a line declares, if it does.
fn declared_fn(line: &str) -> Option<&str> {
    let mut rest = line.trim_start();
    for prefix in ["pub(crate) ", "pub ", "async ", "unsafe "] {
        rest = rest.strip_prefix(prefix).unwrap_or(rest);
    }
    let rest = rest.strip_prefix("async ").unwrap_or(rest);
    let name = rest.strip_prefix("fn ")?;
    let end = name.find(|c: char| !(c.is_alphanumeric() || c == '_'))?;
    Some(&name[..end])
}

/// Parses one conformance line (`Conformance (5.0): [MQTT-…] …`) into statements.
fn parse_tag_line(line: &str) -> Result<Vec<Statement>, String> {
    let rest = line
        .strip_prefix(TAG_PREFIX)
        .ok_or("not a conformance line")?;
    let (version, ids) = rest
        .split_once("):")
        .ok_or("expected `Conformance (<version>): [MQTT-…]`")?;
    if !VERSIONS.contains(&version) {
        return Err(format!("unknown version {version:?}"));
    }
    let mut statements = Vec::new();
    for word in ids.split_whitespace() {
        let id = word
            .strip_prefix('[')
            .and_then(|w| w.strip_suffix(']'))
            .filter(|id| is_statement_id(id))
            .ok_or_else(|| format!("{word:?} is not a statement id like [MQTT-3.1.2-6]"))?;
        statements.push((version.to_owned(), id.to_owned()));
    }
    if statements.is_empty() {
        return Err("no statement ids".into());
    }
    Ok(statements)
}

/// Scans a source file: the tests it defines (`stem::name`) with the statements each carries.
fn scan_tests(
    path: &Path,
    text: &str,
    tests: &mut BTreeMap<String, BTreeSet<Statement>>,
    duplicates: &mut BTreeSet<String>,
    errors: &mut Vec<String>,
) {
    let stem = path
        .file_stem()
        .and_then(|s| s.to_str())
        .expect("a UTF-8 file name");
    let shown = path.display();
    // The doc comments and attributes above the current line.
    let mut tags: Vec<(usize, Vec<Statement>)> = Vec::new();
    // Lines of those doc comments naming statements outside a conformance line.
    let mut untagged: Vec<usize> = Vec::new();
    let mut is_test = false;
    let mut in_block = false;
    for (index, line) in text.lines().enumerate() {
        let line_no = index + 1;
        let trimmed = line.trim();
        if let Some(doc) = trimmed.strip_prefix("///") {
            let doc = doc.trim();
            if doc.starts_with(TAG_PREFIX) {
                match parse_tag_line(doc) {
                    Ok(statements) => tags.push((line_no, statements)),
                    Err(e) => errors.push(format!("{shown}:{line_no}: {e}")),
                }
            } else if doc.contains("[MQTT-") {
                untagged.push(line_no);
            }
            in_block = true;
            continue;
        }
        if trimmed.starts_with("#[") {
            is_test |= trimmed.starts_with("#[test]") || trimmed.starts_with("#[tokio::test");
            in_block = true;
            continue;
        }
        if in_block {
            match declared_fn(line) {
                Some(name) if is_test => {
                    for line in untagged.drain(..) {
                        errors.push(format!(
                            "{shown}:{line}: a test's statement ids must be on a `Conformance (<version>):` line"
                        ));
                    }
                    let key = format!("{stem}::{name}");
                    let carried: BTreeSet<Statement> =
                        tags.drain(..).flat_map(|(_, s)| s).collect();
                    if tests.insert(key.clone(), carried).is_some() {
                        duplicates.insert(key);
                    }
                }
                _ => {
                    for (tag_line, _) in &tags {
                        errors.push(format!(
                            "{shown}:{tag_line}: conformance line not on a #[test] function"
                        ));
                    }
                }
            }
        }
        tags.clear();
        untagged.clear();
        is_test = false;
        in_block = false;
    }
}

#[test]
fn conformance_matrix_and_test_tags_agree() {
    let root = workspace_root();
    let matrix_path = root.join("docs/conformance.md");
    let matrix = std::fs::read_to_string(&matrix_path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", matrix_path.display()));
    let mut errors = Vec::new();
    let rows = parse_matrix(&matrix, &mut errors);

    let mut files = Vec::new();
    rust_files(&root.join("crates"), &mut files);
    rust_files(&root.join("tests"), &mut files);
    files.sort();
    let mut tests = BTreeMap::new();
    let mut duplicates = BTreeSet::new();
    for file in &files {
        let text = std::fs::read_to_string(file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let relative = file.strip_prefix(&root).unwrap_or(file);
        scan_tests(relative, &text, &mut tests, &mut duplicates, &mut errors);
    }
    assert!(
        tests.len() > 100,
        "found only {} tests: is the scan broken?",
        tests.len()
    );

    // Rows that say `tested` name existing tests that carry their id.
    for ((version, id), row) in &rows {
        let statement = (version.clone(), id.clone());
        for test in &row.tests {
            if duplicates.contains(test) {
                errors.push(format!(
                    "conformance.md:{}: {version} {id}: more than one test is called {test}",
                    row.line
                ));
            }
            match tests.get(test) {
                None => errors.push(format!(
                    "conformance.md:{}: {version} {id}: evidence {test} is not a test",
                    row.line
                )),
                Some(carried) if !carried.contains(&statement) => errors.push(format!(
                    "conformance.md:{}: {version} {id}: {test} does not carry this id",
                    row.line
                )),
                Some(_) => {}
            }
        }
    }
    // Every id a test carries is in the matrix, as `tested` with that test as evidence.
    for (test, carried) in &tests {
        for statement @ (version, id) in carried {
            match rows.get(statement) {
                None => errors.push(format!(
                    "{test} carries {version} {id}, which is not in the matrix"
                )),
                Some(row) if !row.tests.contains(test) => errors.push(format!(
                    "{test} carries {version} {id}, but conformance.md:{} ({}) does not name it",
                    row.line, row.status
                )),
                Some(_) => {}
            }
        }
    }

    let mut summary = String::new();
    for version in VERSIONS {
        let counts: Vec<String> = STATUSES
            .iter()
            .map(|status| {
                let n = rows
                    .iter()
                    .filter(|((v, _), row)| v == version && &row.status == status)
                    .count();
                format!("{n} {status}")
            })
            .collect();
        let total = rows.keys().filter(|(v, _)| v == version).count();
        writeln!(
            summary,
            "MQTT {version}: {total} statements: {}",
            counts.join(", ")
        )
        .expect("write to a String");
    }
    println!("{summary}");
    assert!(
        errors.is_empty(),
        "{} disagreement(s) between docs/conformance.md and the tests:\n{}\n\n{summary}",
        errors.len(),
        errors.join("\n")
    );
    for version in VERSIONS {
        assert!(
            rows.keys().any(|(v, _)| v == version),
            "no MQTT {version} statements in the matrix"
        );
    }
}
