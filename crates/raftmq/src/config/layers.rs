//! The layers of the configuration (defaults, file, environment, flags) and how they merge.

use super::{Config, ENV_PREFIX, FLAG_ONLY_ENV_VARS, InvalidConfig};
use crate::docs;
use raftmq_core::config::ConfigProblem;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;
use toml::{Table, Value};

/// One configuration layer above the file (environment or flags): a partial table, plus where
/// each key came from (so a problem with its value can name the variable or flag) and the
/// problems found while building it.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Layer {
    /// The keys this layer sets.
    pub table: Table,
    /// Dotted key → what set it (`RAFTMQ_MQTT__MAX_INFLIGHT`, `--node-id`).
    pub sources: BTreeMap<String, String>,
    /// Problems found building the layer (unknown variables, say).
    pub problems: Vec<ConfigProblem>,
}

impl Layer {
    /// Sets the dotted `key` to `value`, remembering `source`.
    pub fn set(&mut self, key: &str, value: Value, source: impl Into<String>) {
        let path: Vec<&str> = key.split('.').collect();
        set_path(&mut self.table, &path, value);
        self.sources.insert(key.to_owned(), source.into());
    }
}

/// The default configuration as a table: the bottom layer, and the schema that keys of the
/// other layers are checked against.
pub fn default_table() -> Table {
    match Value::try_from(Config::default()) {
        Ok(Value::Table(t)) => t,
        // Cannot happen (every field serializes to a TOML value; a unit test covers it); an
        // empty schema would make every key "unknown", which is loud rather than silent.
        _ => Table::new(),
    }
}

/// Merges `top` into `base`: tables merge key by key, anything else replaces.
pub fn overlay(base: &mut Table, top: Table) {
    for (key, value) in top {
        match (base.get_mut(&key), value) {
            (Some(Value::Table(b)), Value::Table(t)) => overlay(b, t),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

fn set_path(table: &mut Table, path: &[&str], value: Value) {
    match path {
        [] => {}
        [last] => {
            table.insert((*last).to_owned(), value);
        }
        [first, rest @ ..] => {
            let entry = table
                .entry((*first).to_owned())
                .or_insert_with(|| Value::Table(Table::new()));
            if !entry.is_table() {
                *entry = Value::Table(Table::new());
            }
            if let Value::Table(t) = entry {
                set_path(t, rest, value);
            }
        }
    }
}

/// Reads and parses a TOML config file (errors name the path).
pub fn read_file(path: &Path) -> anyhow::Result<Table> {
    use anyhow::Context as _;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading config file {}", path.display()))?;
    text.parse::<Table>()
        .with_context(|| format!("parsing config file {}", path.display()))
}

/// What a dotted key is, according to the default configuration and the documented optional
/// keys.
enum Slot<'a> {
    /// A key with a default value.
    Leaf(&'a Value),
    /// A key that is absent by default (an `Option` that defaults to `None`).
    Optional,
    /// A section (table) of keys.
    Section,
    Unknown,
}

fn lookup<'a>(schema: &'a Table, path: &[&str]) -> Slot<'a> {
    let mut table = schema;
    for (i, segment) in path.iter().enumerate() {
        match table.get(*segment) {
            Some(Value::Table(_)) if i + 1 == path.len() => return Slot::Section,
            Some(Value::Table(t)) => table = t,
            Some(v) if i + 1 == path.len() => return Slot::Leaf(v),
            _ => break,
        }
    }
    if docs::is_optional_key(&path.join(".")) {
        Slot::Optional
    } else {
        Slot::Unknown
    }
}

/// Parses an environment variable's value: as a TOML value when it is one (number, boolean,
/// array, quoted string, inline table), otherwise as the string itself. Date-times stay strings.
pub fn parse_env_value(raw: &str) -> Value {
    match raw.trim().parse::<Value>() {
        Ok(Value::Datetime(_)) | Err(_) => Value::String(raw.to_owned()),
        Ok(v) => v,
    }
}

/// Like [`parse_env_value`], guided by the default value of the key: a key whose default is a
/// string always takes the raw text (so `RAFTMQ_LOG__LEVEL=1` or a numeric-looking path is not
/// turned into a number), and a list key also accepts `a,b,c`.
fn env_value_for(raw: &str, default: Option<&Value>) -> Value {
    match default {
        Some(Value::String(_)) | None => Value::String(raw.to_owned()),
        Some(Value::Array(_)) => match parse_env_value(raw) {
            v @ Value::Array(_) => v,
            _ => Value::Array(
                raw.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| Value::String(s.to_owned()))
                    .collect(),
            ),
        },
        Some(_) => parse_env_value(raw),
    }
}

/// The environment layer: every `RAFTMQ_<SECTION>__<KEY>` variable in `vars` (path segments
/// separated by a double underscore, e.g. `RAFTMQ_MQTT__MAX_INFLIGHT`, `RAFTMQ_NODE_ID`).
/// Variables naming no key are reported as problems keyed by the variable; other variables and
/// [`FLAG_ONLY_ENV_VARS`] are ignored.
pub fn env_layer<I>(vars: I) -> Layer
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let schema = default_table();
    let mut layer = Layer::default();
    let mut vars: Vec<(OsString, OsString)> = vars.into_iter().collect();
    vars.sort();
    for (name, value) in vars {
        let Some(name) = name.to_str() else { continue };
        let Some(rest) = name.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        if FLAG_ONLY_ENV_VARS.contains(&name) {
            continue;
        }
        let problem = |problem: String| ConfigProblem {
            key: name.to_owned(),
            problem,
        };
        let lower = rest.to_ascii_lowercase();
        let path: Vec<&str> = lower.split("__").collect();
        let dotted = path.join(".");
        if path.iter().any(|s| s.is_empty()) {
            layer.problems.push(problem(format!(
                "not a setting (expected {ENV_PREFIX}<SECTION>__<KEY>, e.g. {ENV_PREFIX}MQTT__MAX_INFLIGHT)"
            )));
            continue;
        }
        let default = match lookup(&schema, &path) {
            Slot::Leaf(v) => Some(v),
            Slot::Optional => None,
            Slot::Section => {
                layer.problems.push(problem(format!(
                    "names the [{dotted}] section; set its keys one by one, e.g. {name}__<KEY>"
                )));
                continue;
            }
            Slot::Unknown => {
                layer.problems.push(problem(format!(
                    "unknown setting (there is no key `{dotted}`)"
                )));
                continue;
            }
        };
        let Ok(value) = value.into_string() else {
            layer
                .problems
                .push(problem("value is not valid UTF-8".to_owned()));
            continue;
        };
        layer.set(&dotted, env_value_for(&value, default), name);
    }
    layer
}

/// Merges the layers over the defaults and checks the result; problems with a value set by the
/// environment or a flag name the variable or flag.
pub fn resolve(file: Option<Table>, env: Layer, flags: Layer) -> Result<Config, InvalidConfig> {
    let mut table = default_table();
    if let Some(file) = file {
        overlay(&mut table, file);
    }
    let mut sources = env.sources;
    let mut problems = env.problems;
    overlay(&mut table, env.table);
    sources.extend(flags.sources);
    problems.extend(flags.problems);
    overlay(&mut table, flags.table);
    match Config::check(&table) {
        Ok(config) if problems.is_empty() => Ok(config),
        Ok(_) => Err(InvalidConfig(problems)),
        Err(found) => {
            problems.extend(found.into_iter().map(|mut p| {
                if let Some(source) = sources.get(&p.key) {
                    p.problem = format!("{} (set by {source})", p.problem);
                }
                p
            }));
            Err(InvalidConfig(problems))
        }
    }
}

/// Loads the configuration: defaults, then `file`, then the `RAFTMQ_*` variables in `env`, then
/// `flags`.
pub fn load<I>(file: Option<&Path>, env: I, flags: Layer) -> anyhow::Result<Config>
where
    I: IntoIterator<Item = (OsString, OsString)>,
{
    let file = file.map(read_file).transpose()?;
    Ok(resolve(file, env_layer(env), flags)?)
}
