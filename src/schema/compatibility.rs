//! JSON Schema compatibility checks for the schema registry, with Confluent-style modes.
//!
//! A payload schema registered under a subject must stay compatible with the subject's earlier
//! versions according to the subject's [`CompatibilityMode`]. Every mode reduces to one rule,
//! [`can_read`]: can every document that is valid under the *writer* schema be read (validated)
//! by the *reader* schema? BACKWARD means the new schema reads data written with the latest
//! previous schema, FORWARD means the latest previous schema reads data written with the new
//! one, FULL means both, and the `*_TRANSITIVE` modes check against every previous version.
//!
//! The checker understands the JSON Schema subset that `schemars` 1.x (draft 2020-12) emits for
//! our payload structs, and hand-written schemas of the same subset: `type` (a string or an
//! array, `"null"` included), `properties`, `required`, `additionalProperties`, `enum`, `const`,
//! `items`, `$ref` into the same document (`$defs` or `definitions`), `anyOf`/`oneOf`/`allOf`,
//! `format`, `pattern`, `multipleOf`, `minimum`/`maximum` (and their exclusive forms),
//! `minLength`/`maxLength`, `minItems`/`maxItems`, `uniqueItems` and
//! `minProperties`/`maxProperties`.
//!
//! Reading rules, applied recursively through properties, array items and `$ref`s (each side's
//! `$ref`s are resolved in that side's own document):
//!
//! - Unions (`anyOf`/`oneOf`, and every entry of a `type` array, `"null"` included) are split
//!   into branches; every writer branch must be readable by some reader branch. A schema that is
//!   not a union is a one-branch union.
//! - Types must match, except that a reader `number` reads a writer `integer` (widening).
//! - A property the reader requires must be required by the writer.
//! - A property only the writer declares is fine unless the reader forbids additional
//!   properties (`additionalProperties: false`) or constrains them with a schema that cannot
//!   read it.
//! - Every value of a writer `enum`/`const` must be accepted by the reader; a reader `enum`
//!   cannot read an unrestricted writer.
//! - A reader `format` (on strings) or `pattern` must be present and equal in the writer.
//! - Numeric, length, item-count and property-count bounds may only be widened by the reader.
//! - Annotations and keywords outside the subset (`title`, `description`, `$schema`, `default`,
//!   `examples`, `prefixItems`, `patternProperties`, `not`, ...) are ignored.
//!
//! Deliberate simplifications:
//!
//! - A writer object that does not mention `additionalProperties` is assumed to carry only the
//!   properties it declares (this is what serde-derived structs produce). When the writer says
//!   `additionalProperties: true` or gives a schema, its extra properties are checked against the
//!   reader's.
//! - A schema without `type` is read as the type its keywords imply (`properties` means object,
//!   `items` array, `minLength` string, `minimum` number), and as any type otherwise.
//! - Keywords next to a `$ref` are combined with the target (the target wins on conflicts);
//!   unresolvable references are reported as incompatibilities.
//! - Recursive schemas are compared coinductively: a reader/writer pair that is already being
//!   compared further up is assumed compatible.

use std::collections::{BTreeSet, HashSet};
use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// How a new schema version must relate to the previously registered versions of its subject.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CompatibilityMode {
    /// No compatibility check: any schema may be registered.
    None,
    /// The new schema can read data written with the latest previous schema.
    #[default]
    Backward,
    /// The new schema can read data written with every previous schema.
    BackwardTransitive,
    /// The latest previous schema can read data written with the new schema.
    Forward,
    /// Every previous schema can read data written with the new schema.
    ForwardTransitive,
    /// Both [`Backward`](Self::Backward) and [`Forward`](Self::Forward).
    Full,
    /// Both [`BackwardTransitive`](Self::BackwardTransitive) and
    /// [`ForwardTransitive`](Self::ForwardTransitive).
    FullTransitive,
}

impl CompatibilityMode {
    /// Every mode, in the order of the declaration.
    pub const ALL: [Self; 7] = [
        Self::None,
        Self::Backward,
        Self::BackwardTransitive,
        Self::Forward,
        Self::ForwardTransitive,
        Self::Full,
        Self::FullTransitive,
    ];

    /// The registry name of the mode, as used by serde, [`Display`](fmt::Display) and
    /// [`FromStr`].
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::None => "NONE",
            Self::Backward => "BACKWARD",
            Self::BackwardTransitive => "BACKWARD_TRANSITIVE",
            Self::Forward => "FORWARD",
            Self::ForwardTransitive => "FORWARD_TRANSITIVE",
            Self::Full => "FULL",
            Self::FullTransitive => "FULL_TRANSITIVE",
        }
    }

    /// Whether the mode checks against every previous version rather than only the latest.
    pub const fn is_transitive(self) -> bool {
        matches!(
            self,
            Self::BackwardTransitive | Self::ForwardTransitive | Self::FullTransitive
        )
    }

    /// Whether the new schema must read data written with previous schemas.
    pub const fn checks_backward(self) -> bool {
        matches!(
            self,
            Self::Backward | Self::BackwardTransitive | Self::Full | Self::FullTransitive
        )
    }

    /// Whether previous schemas must read data written with the new schema.
    pub const fn checks_forward(self) -> bool {
        matches!(
            self,
            Self::Forward | Self::ForwardTransitive | Self::Full | Self::FullTransitive
        )
    }
}

impl fmt::Display for CompatibilityMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error returned when parsing an unknown [`CompatibilityMode`] name.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown compatibility mode `{input}`; expected one of NONE, BACKWARD, BACKWARD_TRANSITIVE, \
     FORWARD, FORWARD_TRANSITIVE, FULL, FULL_TRANSITIVE"
)]
pub struct ParseCompatibilityModeError {
    /// The text that failed to parse.
    pub input: String,
}

impl FromStr for CompatibilityMode {
    type Err = ParseCompatibilityModeError;

    /// Parses the registry name of a mode (`BACKWARD_TRANSITIVE`), ignoring ASCII case and
    /// surrounding whitespace.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let name = s.trim();
        Self::ALL
            .into_iter()
            .find(|mode| mode.as_str().eq_ignore_ascii_case(name))
            .ok_or_else(|| ParseCompatibilityModeError { input: s.to_owned() })
    }
}

/// One reason why a schema cannot read data written with another.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Incompatibility {
    /// Logical location of the problem as a JSON pointer through `properties`, `items` and
    /// `additionalProperties` (`$ref`s and unions are looked through), e.g.
    /// `/properties/address/properties/city`; `/` is the schema root.
    pub path: String,
    /// A sentence naming the field, e.g. "field `quantity` changed type from integer to string".
    pub message: String,
    /// The registered version the candidate was checked against, when produced by [`check`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub against_version: Option<u32>,
}

impl fmt::Display for Incompatibility {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// Checks `candidate` against the subject's `history` under `mode`.
///
/// `history` holds the previously registered schemas of the subject as `(version, schema)`,
/// oldest first; the non-transitive modes only look at its last entry. An empty result means the
/// candidate is compatible; an empty history is always compatible, and so is every candidate
/// under [`CompatibilityMode::None`]. Each incompatibility carries the version it was found
/// against, and its message says which side was reading.
pub fn check(mode: CompatibilityMode, history: &[(u32, &Value)], candidate: &Value) -> Vec<Incompatibility> {
    if mode == CompatibilityMode::None {
        return Vec::new();
    }
    let targets = if mode.is_transitive() {
        history
    } else {
        history.last().map(std::slice::from_ref).unwrap_or_default()
    };
    let mut found = Vec::new();
    for &(version, previous) in targets {
        if mode.checks_backward() {
            found.extend(can_read(candidate, previous).into_iter().map(|issue| Incompatibility {
                message: format!(
                    "{} (new schema reading data written with version {version})",
                    issue.message
                ),
                against_version: Some(version),
                ..issue
            }));
        }
        if mode.checks_forward() {
            found.extend(can_read(previous, candidate).into_iter().map(|issue| Incompatibility {
                message: format!(
                    "{} (version {version} reading data written with the new schema)",
                    issue.message
                ),
                against_version: Some(version),
                ..issue
            }));
        }
    }
    found
}

/// The core rule: can every document valid under `writer` be read (validated) by `reader`?
///
/// Returns the reasons it cannot; an empty result means it can. See the module documentation for
/// the rules.
pub fn can_read(reader: &Value, writer: &Value) -> Vec<Incompatibility> {
    let mut checker = Checker {
        reader_root: reader,
        writer_root: writer,
        active: HashSet::new(),
        depth: 0,
    };
    checker.schema(reader, writer, &Loc::root())
}

/// How deep nested schemas may go before the checker gives up (reported as incompatible).
const MAX_DEPTH: usize = 128;

/// How many `$ref`/`anyOf`/`allOf` indirections a single schema may chain.
const MAX_INDIRECTIONS: usize = 32;

/// How many enum values a message lists before summarising the rest.
const MAX_LISTED_VALUES: usize = 8;

/// The schema that accepts everything.
static ANY: Value = Value::Bool(true);

/// The JSON Schema instance types. The order (null last) is the order used in messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum JsonType {
    /// `true` or `false`.
    Boolean,
    /// A number without a fractional part.
    Integer,
    /// Any number.
    Number,
    /// A string.
    String,
    /// An array.
    Array,
    /// An object.
    Object,
    /// `null`.
    Null,
}

impl JsonType {
    /// Parses a `type` keyword entry; unknown names yield `None`.
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "boolean" => Self::Boolean,
            "integer" => Self::Integer,
            "number" => Self::Number,
            "string" => Self::String,
            "array" => Self::Array,
            "object" => Self::Object,
            "null" => Self::Null,
            _ => return None,
        })
    }

    /// The `type` keyword name.
    const fn name(self) -> &'static str {
        match self {
            Self::Boolean => "boolean",
            Self::Integer => "integer",
            Self::Number => "number",
            Self::String => "string",
            Self::Array => "array",
            Self::Object => "object",
            Self::Null => "null",
        }
    }

    /// The most specific type of a JSON value (integral numbers are integers).
    fn of(value: &Value) -> Self {
        match value {
            Value::Null => Self::Null,
            Value::Bool(_) => Self::Boolean,
            Value::Number(n) if n.is_i64() || n.is_u64() => Self::Integer,
            Value::Number(n) if n.as_f64().is_some_and(|f| f.fract() == 0.0) => Self::Integer,
            Value::Number(_) => Self::Number,
            Value::String(_) => Self::String,
            Value::Array(_) => Self::Array,
            Value::Object(_) => Self::Object,
        }
    }

    /// Whether a schema of this type accepts every value of the `data` type.
    fn can_hold(self, data: Self) -> bool {
        self == data || (self == Self::Number && data == Self::Integer)
    }
}

/// Whether a reader branch of type `reader` (`None` = any) can hold writer data of type
/// `writer` (`None` = any).
fn type_can_hold(reader: Option<JsonType>, writer: Option<JsonType>) -> bool {
    match (reader, writer) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(r), Some(w)) => r.can_hold(w),
    }
}

/// Human name of a branch type (`None` = any).
fn type_name(ty: Option<JsonType>) -> &'static str {
    ty.map_or("any JSON value", JsonType::name)
}

/// Where the checker is: the logical JSON pointer and the dotted field name used in messages.
#[derive(Clone, Debug)]
struct Loc {
    /// JSON pointer through `properties`/`items`/`additionalProperties`; empty at the root.
    path: String,
    /// Dotted field name (`address.city`, `changedFields[]`); empty at the root.
    field: String,
}

impl Loc {
    /// The schema root.
    fn root() -> Self {
        Self {
            path: String::new(),
            field: String::new(),
        }
    }

    /// The property `name` of the object here.
    fn property(&self, name: &str) -> Self {
        let escaped = name.replace('~', "~0").replace('/', "~1");
        Self {
            path: format!("{}/properties/{escaped}", self.path),
            field: if self.field.is_empty() {
                name.to_owned()
            } else {
                format!("{}.{name}", self.field)
            },
        }
    }

    /// The items of the array here.
    fn items(&self) -> Self {
        Self {
            path: format!("{}/items", self.path),
            field: format!("{}[]", self.field),
        }
    }

    /// The undeclared (additional) properties of the object here.
    fn additional(&self) -> Self {
        Self {
            path: format!("{}/additionalProperties", self.path),
            field: if self.field.is_empty() {
                "*".to_owned()
            } else {
                format!("{}.*", self.field)
            },
        }
    }

    /// The subject of a message: "field `x`" or "the payload".
    fn subject(&self) -> String {
        if self.field.is_empty() {
            "the payload".to_owned()
        } else {
            format!("field `{}`", self.field)
        }
    }

    /// An incompatibility at this location; the message is built from [`Self::subject`].
    fn issue(&self, predicate: impl fmt::Display) -> Incompatibility {
        Incompatibility {
            path: if self.path.is_empty() {
                "/".to_owned()
            } else {
                self.path.clone()
            },
            message: format!("{} {predicate}", self.subject()),
            against_version: None,
        }
    }
}

/// One alternative of a schema after `$ref`, `allOf`, `anyOf`/`oneOf` and `type` arrays have
/// been resolved: a schema object with at most one `type`.
type Branch = Map<String, Value>;

/// Resolves `$ref`s at the top of `schema` within `root`, merging sibling keywords into the
/// target (the target wins on conflicts).
fn resolve(root: &Value, schema: &Value) -> Result<Value, String> {
    let mut current = schema.clone();
    for _ in 0..MAX_INDIRECTIONS {
        let Value::Object(map) = &current else {
            return Ok(current);
        };
        let Some(reference) = map.get("$ref") else {
            return Ok(current);
        };
        let Some(reference) = reference.as_str() else {
            return Err("`$ref` must be a string".to_owned());
        };
        let target = lookup(root, reference)
            .ok_or_else(|| format!("cannot resolve `$ref` `{reference}` within the same document"))?;
        let siblings = map
            .iter()
            .filter(|(key, _)| key.as_str() != "$ref")
            .map(|(key, value)| (key.clone(), value.clone()));
        current = match target {
            Value::Object(target) => {
                let mut merged = target.clone();
                for (key, value) in siblings {
                    merged.entry(key).or_insert(value);
                }
                Value::Object(merged)
            }
            Value::Bool(true) => Value::Object(siblings.collect()),
            other => other.clone(),
        };
    }
    Err(format!(
        "more than {MAX_INDIRECTIONS} chained `$ref`s (circular reference?)"
    ))
}

/// Looks up a same-document reference (`#`, `#/$defs/Name`, `#/definitions/Name`, any pointer).
fn lookup<'v>(root: &'v Value, reference: &str) -> Option<&'v Value> {
    let pointer = reference.strip_prefix('#')?;
    if pointer.is_empty() {
        Some(root)
    } else {
        root.pointer(pointer)
    }
}

/// Splits a schema into its branches (see [`Branch`]). An empty result accepts nothing.
fn expand(root: &Value, schema: &Value, depth: usize) -> Result<Vec<Branch>, String> {
    if depth > MAX_INDIRECTIONS {
        return Err(format!(
            "more than {MAX_INDIRECTIONS} nested `$ref`/`anyOf`/`allOf` levels"
        ));
    }
    let mut map = match resolve(root, schema)? {
        Value::Bool(true) => return Ok(vec![Map::new()]),
        Value::Bool(false) => return Ok(Vec::new()),
        Value::Object(map) => map,
        _ => return Err("a schema must be an object or a boolean".to_owned()),
    };
    if !merge_all_of(root, &mut map, depth)? {
        return Ok(Vec::new());
    }
    let alternatives = match map.remove("anyOf") {
        Some(any_of) => Some(any_of),
        None => map.remove("oneOf"),
    };
    let Some(alternatives) = alternatives else {
        return Ok(split_types(map));
    };
    let Value::Array(alternatives) = alternatives else {
        return Err("`anyOf`/`oneOf` must be an array".to_owned());
    };
    let mut branches = Vec::new();
    for alternative in &alternatives {
        for mut branch in expand(root, alternative, depth + 1)? {
            for (key, value) in &map {
                branch.entry(key.clone()).or_insert_with(|| value.clone());
            }
            branches.extend(expand(root, &Value::Object(branch), depth + 1)?);
        }
    }
    Ok(branches)
}

/// Folds an `allOf` into `map`: properties and required lists are united, other keywords are
/// added when absent. Returns `false` when a member accepts nothing.
fn merge_all_of(root: &Value, map: &mut Branch, depth: usize) -> Result<bool, String> {
    let Some(all_of) = map.remove("allOf") else {
        return Ok(true);
    };
    let Value::Array(members) = all_of else {
        return Err("`allOf` must be an array".to_owned());
    };
    if depth > MAX_INDIRECTIONS {
        return Err(format!("more than {MAX_INDIRECTIONS} nested `allOf` levels"));
    }
    for member in &members {
        let mut member = match resolve(root, member)? {
            Value::Bool(true) => continue,
            Value::Bool(false) => return Ok(false),
            Value::Object(member) => member,
            _ => return Err("`allOf` members must be schemas".to_owned()),
        };
        if !merge_all_of(root, &mut member, depth + 1)? {
            return Ok(false);
        }
        for (key, value) in member {
            match (key.as_str(), map.get_mut(&key), value) {
                ("properties", Some(Value::Object(existing)), Value::Object(added)) => {
                    for (name, schema) in added {
                        existing.entry(name).or_insert(schema);
                    }
                }
                ("required", Some(Value::Array(existing)), Value::Array(added)) => {
                    for name in added {
                        if !existing.contains(&name) {
                            existing.push(name);
                        }
                    }
                }
                (_, Some(_), _) => {}
                (_, None, value) => {
                    map.insert(key, value);
                }
            }
        }
    }
    Ok(true)
}

/// Splits a schema with a `type` array into one branch per type.
fn split_types(map: Branch) -> Vec<Branch> {
    let Some(Value::Array(types)) = map.get("type") else {
        return vec![map];
    };
    let mut distinct: Vec<Value> = Vec::new();
    for ty in types {
        if !distinct.contains(ty) {
            distinct.push(ty.clone());
        }
    }
    distinct
        .into_iter()
        .map(|ty| {
            let mut branch = map.clone();
            branch.insert("type".to_owned(), ty);
            branch
        })
        .collect()
}

/// The type of a branch: its `type` keyword, or the type its keywords imply when it has no
/// `type`, `enum` or `const`; `None` means any type.
fn branch_type(branch: &Branch) -> Option<JsonType> {
    if let Some(ty) = branch.get("type") {
        return ty.as_str().and_then(JsonType::parse);
    }
    if branch.contains_key("enum") || branch.contains_key("const") {
        return None;
    }
    let has = |keywords: &[&str]| keywords.iter().any(|k| branch.contains_key(*k));
    if has(&[
        "properties",
        "required",
        "additionalProperties",
        "minProperties",
        "maxProperties",
    ]) {
        Some(JsonType::Object)
    } else if has(&["items", "minItems", "maxItems", "uniqueItems"]) {
        Some(JsonType::Array)
    } else if has(&["minLength", "maxLength", "pattern"]) {
        Some(JsonType::String)
    } else if has(&[
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
    ]) {
        Some(JsonType::Number)
    } else {
        None
    }
}

/// The explicit `type` of a branch, used to filter the enum values it can produce.
fn declared_type(branch: &Branch) -> Option<JsonType> {
    branch.get("type").and_then(Value::as_str).and_then(JsonType::parse)
}

/// The finite set of values a branch allows (`const`/`enum`), if it has one.
fn finite_values(branch: &Branch) -> Option<Vec<&Value>> {
    let from_enum = match branch.get("enum") {
        Some(Value::Array(values)) => Some(values.iter().collect::<Vec<_>>()),
        _ => None,
    };
    match (branch.get("const"), from_enum) {
        (Some(constant), Some(values)) => Some(values.into_iter().filter(|v| json_eq(v, constant)).collect()),
        (Some(constant), None) => Some(vec![constant]),
        (None, values) => values,
    }
}

/// JSON equality with numbers compared by value (`1` equals `1.0`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(x), Some(y)) => x == y,
            _ => match (x.as_u64(), y.as_u64()) {
                (Some(x), Some(y)) => x == y,
                _ => x.as_f64() == y.as_f64(),
            },
        },
        (Value::Array(x), Value::Array(y)) => x.len() == y.len() && x.iter().zip(y).all(|(x, y)| json_eq(x, y)),
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(key, x)| y.get(key).is_some_and(|y| json_eq(x, y)))
        }
        _ => a == b,
    }
}

/// Describes enum values for a message: `the value "A"` or `the values "A", "B"`.
fn describe_values(values: &[&Value]) -> String {
    let listed: Vec<String> = values.iter().take(MAX_LISTED_VALUES).map(|v| v.to_string()).collect();
    let mut text = listed.join(", ");
    if values.len() > MAX_LISTED_VALUES {
        text.push_str(&format!(" and {} more", values.len() - MAX_LISTED_VALUES));
    }
    if values.len() == 1 {
        format!("the value {text}")
    } else {
        format!("the values {text}")
    }
}

/// A numeric bound: the limit and whether it is exclusive.
#[derive(Clone, Copy, Debug)]
struct Bound {
    /// The limit.
    value: f64,
    /// Whether the limit itself is excluded.
    exclusive: bool,
}

impl fmt::Display for Bound {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.exclusive {
            write!(f, "{} exclusive", self.value)
        } else {
            write!(f, "{}", self.value)
        }
    }
}

/// Which end of a range a bound limits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// `minimum`/`exclusiveMinimum`.
    Lower,
    /// `maximum`/`exclusiveMaximum`.
    Upper,
}

impl End {
    /// The inclusive and exclusive keywords of this end.
    const fn keywords(self) -> (&'static str, &'static str) {
        match self {
            Self::Lower => ("minimum", "exclusiveMinimum"),
            Self::Upper => ("maximum", "exclusiveMaximum"),
        }
    }

    /// Whether bound `a` is strictly tighter than bound `b` at this end.
    fn tighter(self, a: Bound, b: Bound) -> bool {
        let further_in = match self {
            Self::Lower => a.value > b.value,
            Self::Upper => a.value < b.value,
        };
        further_in || (a.value == b.value && a.exclusive && !b.exclusive)
    }
}

/// The effective numeric bound of a branch at `end` (the tighter of the inclusive and exclusive
/// keywords; draft-4 boolean `exclusiveMinimum`/`exclusiveMaximum` are understood). For integer
/// data the bound is normalised to an inclusive integer.
fn numeric_bound(branch: &Branch, end: End, integer_data: bool) -> Option<Bound> {
    let (inclusive_key, exclusive_key) = end.keywords();
    let mut bound = branch.get(inclusive_key).and_then(Value::as_f64).map(|value| Bound {
        value,
        exclusive: false,
    });
    match branch.get(exclusive_key) {
        Some(Value::Number(n)) => {
            if let Some(value) = n.as_f64() {
                let exclusive = Bound { value, exclusive: true };
                if bound.is_none_or(|b| end.tighter(exclusive, b)) {
                    bound = Some(exclusive);
                }
            }
        }
        Some(Value::Bool(true)) => {
            if let Some(b) = &mut bound {
                b.exclusive = true;
            }
        }
        _ => {}
    }
    if !integer_data {
        return bound;
    }
    bound.map(|b| {
        let value = match (end, b.exclusive) {
            (End::Lower, true) => b.value.floor() + 1.0,
            (End::Lower, false) => b.value.ceil(),
            (End::Upper, true) => b.value.ceil() - 1.0,
            (End::Upper, false) => b.value.floor(),
        };
        Bound {
            value,
            exclusive: false,
        }
    })
}

/// Whether `value` lies within the numeric bounds of `branch`.
fn within_numeric_bounds(branch: &Branch, value: f64) -> bool {
    let lower = numeric_bound(branch, End::Lower, false);
    let upper = numeric_bound(branch, End::Upper, false);
    lower.is_none_or(|b| value > b.value || (!b.exclusive && value == b.value))
        && upper.is_none_or(|b| value < b.value || (!b.exclusive && value == b.value))
}

/// Reads a non-negative count keyword (`minLength`, `maxItems`, ...).
fn count(branch: &Branch, keyword: &str) -> Option<f64> {
    branch.get(keyword).and_then(Value::as_f64)
}

/// Whether `len` satisfies the `min_key`/`max_key` counts of `branch`.
fn within_counts(branch: &Branch, min_key: &str, max_key: &str, len: usize) -> bool {
    // Lengths of in-memory JSON values are far below 2^53, so the conversion is exact.
    let len = len as f64;
    count(branch, min_key).is_none_or(|min| len >= min) && count(branch, max_key).is_none_or(|max| len <= max)
}

/// How an object treats properties it does not declare.
#[derive(Clone, Copy, Debug)]
enum Additional<'v> {
    /// `additionalProperties` is absent (open for readers; assumed unused by writers).
    Unspecified,
    /// `additionalProperties: true` or `{}`-like: anything goes.
    Any,
    /// `additionalProperties: false`.
    Never,
    /// `additionalProperties` is a schema.
    Schema(&'v Value),
}

impl<'v> Additional<'v> {
    /// The `additionalProperties` policy of a branch.
    fn of(branch: &'v Branch) -> Self {
        match branch.get("additionalProperties") {
            Some(Value::Bool(true)) => Self::Any,
            Some(Value::Bool(false)) => Self::Never,
            Some(schema @ Value::Object(_)) => Self::Schema(schema),
            _ => Self::Unspecified,
        }
    }

    /// The schema a reader applies to a property it does not declare (`None` = rejected).
    fn reader_schema(self) -> Option<&'v Value> {
        match self {
            Self::Unspecified | Self::Any => Some(&ANY),
            Self::Never => None,
            Self::Schema(schema) => Some(schema),
        }
    }

    /// The schema of the undeclared properties a writer may produce (`None` = none).
    fn writer_schema(self) -> Option<&'v Value> {
        match self {
            Self::Unspecified | Self::Never => None,
            Self::Any => Some(&ANY),
            Self::Schema(schema) => Some(schema),
        }
    }
}

/// The `properties` of a branch (empty when absent).
fn properties(branch: &Branch) -> &Map<String, Value> {
    static EMPTY: std::sync::OnceLock<Map<String, Value>> = std::sync::OnceLock::new();
    match branch.get("properties") {
        Some(Value::Object(properties)) => properties,
        _ => EMPTY.get_or_init(Map::new),
    }
}

/// The `required` property names of a branch.
fn required(branch: &Branch) -> BTreeSet<&str> {
    match branch.get("required") {
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).collect(),
        _ => BTreeSet::new(),
    }
}

/// The `items` schema of a branch (`true` when absent or in the draft-4 tuple form).
fn items(branch: &Branch) -> &Value {
    match branch.get("items") {
        Some(schema @ (Value::Object(_) | Value::Bool(_))) => schema,
        _ => &ANY,
    }
}

/// Whether `value` is valid under `schema` (a pragmatic validator for the supported subset,
/// used to check enum values).
fn schema_accepts(root: &Value, schema: &Value, value: &Value, depth: usize) -> bool {
    depth <= MAX_DEPTH
        && expand(root, schema, 0).is_ok_and(|branches| {
            branches
                .iter()
                .any(|branch| branch_accepts(root, branch, value, depth + 1))
        })
}

/// Whether `value` is valid under one branch.
fn branch_accepts(root: &Value, branch: &Branch, value: &Value, depth: usize) -> bool {
    if branch_type(branch).is_some_and(|ty| !ty.can_hold(JsonType::of(value))) {
        return false;
    }
    if finite_values(branch).is_some_and(|allowed| !allowed.iter().any(|v| json_eq(v, value))) {
        return false;
    }
    match value {
        Value::Number(n) => n.as_f64().is_none_or(|number| within_numeric_bounds(branch, number)),
        Value::String(s) => within_counts(branch, "minLength", "maxLength", s.chars().count()),
        Value::Array(elements) => {
            within_counts(branch, "minItems", "maxItems", elements.len())
                && elements
                    .iter()
                    .all(|element| schema_accepts(root, items(branch), element, depth))
        }
        Value::Object(object) => {
            let declared = properties(branch);
            let additional = Additional::of(branch).reader_schema();
            within_counts(branch, "minProperties", "maxProperties", object.len())
                && required(branch).iter().all(|name| object.contains_key(*name))
                && object.iter().all(|(name, property)| {
                    declared
                        .get(name)
                        .or(additional)
                        .is_some_and(|schema| schema_accepts(root, schema, property, depth))
                })
        }
        Value::Null | Value::Bool(_) => true,
    }
}

/// The recursive comparison of a reader document with a writer document.
struct Checker<'a> {
    /// The reader's whole document, for its `$ref`s.
    reader_root: &'a Value,
    /// The writer's whole document, for its `$ref`s.
    writer_root: &'a Value,
    /// Reader/writer schema pairs currently being compared (for recursive schemas).
    active: HashSet<(String, String)>,
    /// Current nesting depth.
    depth: usize,
}

impl Checker<'_> {
    /// Compares a reader schema with a writer schema at `loc`.
    fn schema(&mut self, reader: &Value, writer: &Value, loc: &Loc) -> Vec<Incompatibility> {
        if self.depth >= MAX_DEPTH {
            return vec![loc.issue(format_args!(
                "is nested more than {MAX_DEPTH} levels deep and cannot be checked"
            ))];
        }
        let key = (reader.to_string(), writer.to_string());
        if !self.active.insert(key.clone()) {
            // Same pair further up: a recursive schema. Assume compatible (coinduction).
            return Vec::new();
        }
        self.depth += 1;
        let found = self.schema_pair(reader, writer, loc);
        self.depth -= 1;
        self.active.remove(&key);
        found
    }

    /// [`Self::schema`] without the recursion bookkeeping.
    fn schema_pair(&mut self, reader: &Value, writer: &Value, loc: &Loc) -> Vec<Incompatibility> {
        let readers = match expand(self.reader_root, reader, 0) {
            Ok(branches) => branches,
            Err(e) => return vec![loc.issue(format_args!("has an unusable reader schema: {e}"))],
        };
        let writers = match expand(self.writer_root, writer, 0) {
            Ok(branches) => branches,
            Err(e) => return vec![loc.issue(format_args!("has an unusable writer schema: {e}"))],
        };
        let mut found = Vec::new();
        for writer_branch in &writers {
            match finite_values(writer_branch) {
                Some(values) => found.extend(self.values(&readers, writer_branch, &values, loc)),
                None => found.extend(self.branch_in_union(&readers, writer_branch, loc)),
            }
        }
        found
    }

    /// Checks that every enum/const value a writer branch produces is accepted by the reader.
    fn values(&self, readers: &[Branch], writer: &Branch, values: &[&Value], loc: &Loc) -> Vec<Incompatibility> {
        let produced_type = declared_type(writer);
        let mut wrong_types = BTreeSet::new();
        let mut rejected = Vec::new();
        for &value in values {
            let value_type = JsonType::of(value);
            if produced_type.is_some_and(|ty| !ty.can_hold(value_type)) {
                continue; // This branch of a split `type` array cannot produce it.
            }
            if readers
                .iter()
                .any(|reader| branch_accepts(self.reader_root, reader, value, 0))
            {
                continue;
            }
            if readers
                .iter()
                .any(|reader| type_can_hold(branch_type(reader), Some(value_type)))
            {
                rejected.push(value);
            } else {
                wrong_types.insert(value_type);
            }
        }
        let mut found: Vec<Incompatibility> = wrong_types
            .into_iter()
            .map(|ty| type_mismatch(readers, Some(ty), loc))
            .collect();
        if !rejected.is_empty() {
            found.push(loc.issue(format_args!(
                "does not accept {} that the writer may produce",
                describe_values(&rejected)
            )));
        }
        found
    }

    /// Checks that a (non-enum) writer branch is readable by at least one reader branch, and
    /// reports the most relevant reasons when it is not.
    fn branch_in_union(&mut self, readers: &[Branch], writer: &Branch, loc: &Loc) -> Vec<Incompatibility> {
        if readers.is_empty() {
            return vec![loc.issue("accepts no value at all in the reader")];
        }
        let mut attempts = Vec::with_capacity(readers.len());
        for reader in readers {
            let found = self.branch(reader, writer, loc);
            if found.is_empty() {
                return found;
            }
            attempts.push((reader, found));
        }
        if attempts.len() == 1 {
            return attempts.pop().map(|(_, found)| found).unwrap_or_default();
        }
        let writer_type = branch_type(writer);
        attempts
            .into_iter()
            .filter(|(reader, _)| type_can_hold(branch_type(reader), writer_type))
            .map(|(_, found)| found)
            .min_by_key(Vec::len)
            .unwrap_or_else(|| vec![type_mismatch(readers, writer_type, loc)])
    }

    /// Compares one reader branch with one writer branch that is not an enum.
    fn branch(&mut self, reader: &Branch, writer: &Branch, loc: &Loc) -> Vec<Incompatibility> {
        let writer_type = branch_type(writer);
        if let Some(allowed) = finite_values(reader) {
            if writer_type == Some(JsonType::Null) && allowed.iter().any(|v| v.is_null()) {
                return Vec::new();
            }
            return vec![loc.issue(format_args!(
                "is restricted to {} by the reader but the writer may produce any {}",
                describe_values(&allowed),
                type_name(writer_type)
            ))];
        }
        let Some(reader_type) = branch_type(reader) else {
            return Vec::new();
        };
        if !type_can_hold(Some(reader_type), writer_type) {
            return vec![type_mismatch(std::slice::from_ref(reader), writer_type, loc)];
        }
        let mut found = Vec::new();
        match reader_type {
            JsonType::String => strings(reader, writer, loc, &mut found),
            JsonType::Integer | JsonType::Number => numbers(reader, writer, loc, &mut found),
            JsonType::Array => {
                counts(reader, writer, ("minItems", "maxItems"), loc, &mut found);
                if reader.get("uniqueItems") == Some(&Value::Bool(true))
                    && writer.get("uniqueItems") != Some(&Value::Bool(true))
                {
                    found.push(loc.issue("requires unique items in the reader but not in the writer"));
                }
                found.extend(self.schema(items(reader), items(writer), &loc.items()));
            }
            JsonType::Object => self.objects(reader, writer, loc, &mut found),
            JsonType::Boolean | JsonType::Null => {}
        }
        found
    }

    /// Compares the properties of two object branches.
    fn objects(&mut self, reader: &Branch, writer: &Branch, loc: &Loc, found: &mut Vec<Incompatibility>) {
        let reader_properties = properties(reader);
        let writer_properties = properties(writer);
        let reader_required = required(reader);
        let writer_required = required(writer);
        let reader_additional = Additional::of(reader);
        let writer_extra = Additional::of(writer).writer_schema();

        let reader_names: BTreeSet<&str> = reader_properties
            .keys()
            .map(String::as_str)
            .chain(reader_required.iter().copied())
            .collect();
        for &name in &reader_names {
            let field = loc.property(name);
            if reader_required.contains(name) && !writer_required.contains(name) {
                found.push(field.issue("is required by the reader but may be missing in the writer's data"));
            }
            let reader_schema = reader_properties.get(name).or(reader_additional.reader_schema());
            let writer_schema = writer_properties
                .get(name)
                .or(writer_extra)
                .or(writer_required.contains(name).then_some(&ANY));
            match (reader_schema, writer_schema) {
                (Some(reader_schema), Some(writer_schema)) => {
                    found.extend(self.schema(reader_schema, writer_schema, &field));
                }
                (None, Some(_)) => found
                    .push(field.issue("is written by the writer but the reader does not allow additional properties")),
                (_, None) => {}
            }
        }

        let writer_only: BTreeSet<&str> = writer_properties
            .keys()
            .map(String::as_str)
            .chain(writer_required.iter().copied())
            .filter(|name| !reader_names.contains(name))
            .collect();
        for name in writer_only {
            let field = loc.property(name);
            match reader_additional {
                Additional::Never => found
                    .push(field.issue("is written by the writer but the reader does not allow additional properties")),
                Additional::Schema(reader_schema) => {
                    let writer_schema = writer_properties.get(name).unwrap_or(&ANY);
                    found.extend(self.schema(reader_schema, writer_schema, &field));
                }
                Additional::Unspecified | Additional::Any => {}
            }
        }

        if let Some(writer_extra) = writer_extra {
            match reader_additional {
                Additional::Never => found.push(loc.issue(
                    "may carry additional properties in the writer's data but the reader does not \
                     allow them",
                )),
                Additional::Schema(reader_schema) => {
                    found.extend(self.schema(reader_schema, writer_extra, &loc.additional()));
                }
                Additional::Unspecified | Additional::Any => {}
            }
        }

        counts(reader, writer, ("minProperties", "maxProperties"), loc, found);
    }
}

/// The incompatibility for writer data of `writer_type` that no reader branch's type can hold.
fn type_mismatch(readers: &[Branch], writer_type: Option<JsonType>, loc: &Loc) -> Incompatibility {
    if writer_type == Some(JsonType::Null) {
        return loc.issue("may be null in the writer's data but the reader does not accept null");
    }
    let reader_types: BTreeSet<Option<JsonType>> = readers.iter().map(branch_type).collect();
    let reader_types: Vec<&str> = reader_types.into_iter().map(type_name).collect();
    match writer_type {
        Some(writer_type) => loc.issue(format_args!(
            "changed type from {} to {}",
            writer_type.name(),
            reader_types.join(" or ")
        )),
        None => loc.issue(format_args!(
            "may hold any JSON value in the writer's data but the reader requires {}",
            reader_types.join(" or ")
        )),
    }
}

/// String rules: `format`, `pattern` and length bounds.
fn strings(reader: &Branch, writer: &Branch, loc: &Loc, found: &mut Vec<Incompatibility>) {
    let writer_format = writer.get("format").and_then(Value::as_str);
    if let Some(reader_format) = reader.get("format").and_then(Value::as_str) {
        match writer_format {
            Some(writer_format) if writer_format == reader_format => {}
            Some(writer_format) => found.push(loc.issue(format_args!(
                "changed format from `{writer_format}` to `{reader_format}`"
            ))),
            None => found.push(loc.issue(format_args!(
                "requires format `{reader_format}` in the reader but the writer does not \
                 constrain its format"
            ))),
        }
    }
    let writer_pattern = writer.get("pattern").and_then(Value::as_str);
    if let Some(reader_pattern) = reader.get("pattern").and_then(Value::as_str) {
        match writer_pattern {
            Some(writer_pattern) if writer_pattern == reader_pattern => {}
            Some(writer_pattern) => found.push(loc.issue(format_args!(
                "changed pattern from `{writer_pattern}` to `{reader_pattern}`"
            ))),
            None => found.push(loc.issue(format_args!(
                "requires pattern `{reader_pattern}` in the reader but the writer has none"
            ))),
        }
    }
    counts(reader, writer, ("minLength", "maxLength"), loc, found);
}

/// Numeric rules: bounds (widening only) and `multipleOf`.
fn numbers(reader: &Branch, writer: &Branch, loc: &Loc, found: &mut Vec<Incompatibility>) {
    let integer_data = branch_type(writer) == Some(JsonType::Integer);
    for end in [End::Lower, End::Upper] {
        let reader_bound = numeric_bound(reader, end, integer_data);
        let writer_bound = numeric_bound(writer, end, integer_data);
        let narrower = match (reader_bound, writer_bound) {
            (None, _) => false,
            (Some(_), None) => true,
            (Some(r), Some(w)) => end.tighter(r, w),
        };
        if let (true, Some(reader_bound)) = (narrower, reader_bound) {
            let keyword = end.keywords().0;
            let writer_text = writer_bound.map_or_else(|| "none".to_owned(), |b| b.to_string());
            found.push(loc.issue(format_args!(
                "has a narrower {keyword} in the reader ({reader_bound}) than in the writer \
                 ({writer_text})"
            )));
        }
    }
    if let Some(reader_step) = reader.get("multipleOf").and_then(Value::as_f64) {
        let writer_step = writer
            .get("multipleOf")
            .and_then(Value::as_f64)
            .or(integer_data.then_some(1.0));
        let divides = writer_step.is_some_and(|w| reader_step > 0.0 && ((w / reader_step).fract()).abs() < 1e-9);
        if !divides {
            found.push(loc.issue(format_args!(
                "requires multiples of {reader_step} in the reader but the writer does not"
            )));
        }
    }
}

/// Count rules (`minLength`/`maxLength`, `minItems`/`maxItems`, ...): the reader may only widen.
fn counts(
    reader: &Branch,
    writer: &Branch,
    (min_key, max_key): (&str, &str),
    loc: &Loc,
    found: &mut Vec<Incompatibility>,
) {
    let reader_min = count(reader, min_key).unwrap_or(0.0);
    let writer_min = count(writer, min_key).unwrap_or(0.0);
    if reader_min > writer_min {
        found.push(loc.issue(format_args!(
            "has a narrower {min_key} in the reader ({reader_min}) than in the writer \
             ({writer_min})"
        )));
    }
    if let Some(reader_max) = count(reader, max_key) {
        let writer_max = count(writer, max_key);
        if writer_max.is_none_or(|w| w > reader_max) {
            let writer_text = writer_max.map_or_else(|| "none".to_owned(), |w| w.to_string());
            found.push(loc.issue(format_args!(
                "has a narrower {max_key} in the reader ({reader_max}) than in the writer \
                 ({writer_text})"
            )));
        }
    }
}

#[cfg(test)]
#[path = "compatibility_cases.rs"]
mod cases;

#[cfg(test)]
mod tests {
    //! Table-driven cases for every mode and rule, plus checks on real `schemars` output.

    use super::cases::*;
    use super::*;
    use CompatibilityMode::{Backward, BackwardTransitive, Forward, FullTransitive};
    use serde_json::json;

    /// Runs every table case and reports all failures at once.
    #[test]
    fn table() {
        let cases = cases();
        assert!(cases.len() >= 24, "only {} cases", cases.len());
        let modes: HashSet<CompatibilityMode> = cases.iter().map(|c| c.mode).collect();
        assert_eq!(modes.len(), CompatibilityMode::ALL.len(), "every mode is covered");

        let mut failures = Vec::new();
        for case in &cases {
            let history: Vec<(u32, &Value)> = (1..).zip(case.history.iter()).collect();
            let found = check(case.mode, &history, &case.candidate);
            let rendered: Vec<String> = found
                .iter()
                .map(|i| format!("{i} [against {:?}]", i.against_version))
                .collect();
            match &case.expect {
                Expect::Compatible if found.is_empty() => {}
                Expect::Compatible => failures.push(format!("{}: expected compatible, got {rendered:#?}", case.name)),
                Expect::Incompatible { contains, against } => {
                    let matched = found
                        .iter()
                        .any(|i| i.message.contains(contains) && against.is_none_or(|v| i.against_version == Some(v)));
                    if !matched {
                        failures.push(format!(
                            "{}: expected an incompatibility containing {contains:?} \
                             (against {against:?}), got {rendered:#?}",
                            case.name
                        ));
                    }
                    for issue in &found {
                        if !issue.message.contains("field `") && !issue.message.contains("the payload") {
                            failures.push(format!("{}: message names no field: {issue}", case.name));
                        }
                    }
                }
            }
        }
        assert!(
            failures.is_empty(),
            "{} failing case(s):\n{}",
            failures.len(),
            failures.join("\n")
        );
    }

    /// `can_read` gives the logical path, a field-naming message and no version.
    #[test]
    fn can_read_reports_path_and_no_version() {
        let reader = with_defs(&["RECEIPT"], &["street", "city", "postalCode"], true);
        let writer = with_defs(&["RECEIPT"], &["street", "city"], true);
        let found = can_read(&reader, &writer);
        assert_eq!(
            found,
            vec![Incompatibility {
                path: "/properties/address/properties/postalCode".to_owned(),
                message: "field `address.postalCode` is required by the reader but may be \
                          missing in the writer's data"
                    .to_owned(),
                against_version: None,
            }]
        );
        assert_eq!(
            found[0].to_string(),
            "/properties/address/properties/postalCode: field `address.postalCode` is required \
             by the reader but may be missing in the writer's data"
        );
        assert!(can_read(&writer, &reader).is_empty());
    }

    /// Mode names agree across serde, `Display` and `FromStr`.
    #[test]
    fn mode_names_round_trip() {
        assert_eq!(CompatibilityMode::default(), Backward);
        for mode in CompatibilityMode::ALL {
            let name = mode.to_string();
            assert_eq!(name.parse::<CompatibilityMode>(), Ok(mode));
            assert_eq!(serde_json::to_value(mode).expect("serialize"), json!(name));
            assert_eq!(
                serde_json::from_value::<CompatibilityMode>(json!(name)).expect("deserialize"),
                mode
            );
        }
        assert_eq!(BackwardTransitive.to_string(), "BACKWARD_TRANSITIVE");
        assert_eq!("full_transitive".parse::<CompatibilityMode>(), Ok(FullTransitive));
        assert!("SIDEWAYS".parse::<CompatibilityMode>().is_err());
    }

    /// Version 1 of a payload, as a Rust type.
    #[allow(dead_code)]
    mod v1 {
        use schemars::JsonSchema;

        /// A postal address.
        #[derive(JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct Address {
            pub street: String,
            pub city: String,
        }

        /// Why stock changed.
        #[derive(JsonSchema)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum StockChangeReason {
            Receipt,
            Sale,
            Adjustment,
        }

        /// The payload.
        #[derive(JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct StockLevelChanged {
            pub inventory_item_id: uuid::Uuid,
            pub previous_quantity: i64,
            pub new_quantity: i64,
            pub change_reason: StockChangeReason,
            pub description: Option<String>,
            pub address: Option<Address>,
            pub changed_fields: Vec<String>,
        }
    }

    /// Version 2: one more enum variant and one more optional field.
    #[allow(dead_code)]
    mod v2 {
        use schemars::JsonSchema;

        pub use super::v1::Address;

        /// Why stock changed.
        #[derive(JsonSchema)]
        #[serde(rename_all = "SCREAMING_SNAKE_CASE")]
        pub enum StockChangeReason {
            Receipt,
            Sale,
            Adjustment,
            Return,
        }

        /// The payload.
        #[derive(JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct StockLevelChanged {
            pub inventory_item_id: uuid::Uuid,
            pub previous_quantity: i64,
            pub new_quantity: i64,
            pub change_reason: StockChangeReason,
            pub description: Option<String>,
            pub address: Option<Address>,
            pub changed_fields: Vec<String>,
            pub warehouse_code: Option<String>,
        }
    }

    /// Version 3: the address gains a required postal code.
    #[allow(dead_code)]
    mod v3 {
        use schemars::JsonSchema;

        pub use super::v2::StockChangeReason;

        /// A postal address.
        #[derive(JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct Address {
            pub street: String,
            pub city: String,
            pub postal_code: String,
        }

        /// The payload.
        #[derive(JsonSchema)]
        #[serde(rename_all = "camelCase")]
        pub struct StockLevelChanged {
            pub inventory_item_id: uuid::Uuid,
            pub previous_quantity: i64,
            pub new_quantity: i64,
            pub change_reason: StockChangeReason,
            pub description: Option<String>,
            pub address: Option<Address>,
            pub changed_fields: Vec<String>,
            pub warehouse_code: Option<String>,
        }
    }

    /// A recursive type, to prove recursive `$ref`s terminate.
    #[allow(dead_code)]
    #[derive(JsonSchema)]
    #[serde(rename_all = "camelCase")]
    struct Category {
        name: String,
        children: Vec<Category>,
        parent: Option<Box<Category>>,
    }

    /// The checker handles what `schemars::schema_for!` really emits.
    #[test]
    fn real_schemars_output() {
        let v1 = serde_json::to_value(schemars::schema_for!(v1::StockLevelChanged)).expect("v1");
        let v2 = serde_json::to_value(schemars::schema_for!(v2::StockLevelChanged)).expect("v2");
        let v3 = serde_json::to_value(schemars::schema_for!(v3::StockLevelChanged)).expect("v3");

        // The shapes this checker must understand really are what schemars emits.
        assert!(v1["properties"]["address"]["anyOf"].is_array(), "{v1:#}");
        assert_eq!(v1["properties"]["description"]["type"], json!(["string", "null"]));
        assert_eq!(v1["properties"]["changeReason"]["$ref"], "#/$defs/StockChangeReason");

        assert!(check(FullTransitive, &[(1, &v1)], &v1).is_empty());
        assert!(check(Backward, &[(1, &v1)], &v2).is_empty(), "v2 reads v1 data");

        let forward = check(Forward, &[(1, &v1)], &v2);
        assert_eq!(forward.len(), 1, "{forward:#?}");
        assert_eq!(forward[0].path, "/properties/changeReason");
        assert!(forward[0].message.contains("\"RETURN\""), "{}", forward[0]);
        assert_eq!(forward[0].against_version, Some(1));

        let backward = check(BackwardTransitive, &[(1, &v1), (2, &v2)], &v3);
        assert_eq!(backward.len(), 2, "{backward:#?}");
        assert!(
            backward
                .iter()
                .all(|i| i.message.contains("field `address.postalCode` is required")),
            "{backward:#?}"
        );
        assert!(check(Forward, &[(1, &v1), (2, &v2)], &v3).is_empty());
    }

    /// Recursive `$ref`s neither loop forever nor hide real changes.
    #[test]
    fn recursive_schemas_terminate() {
        let tree = serde_json::to_value(schemars::schema_for!(Category)).expect("schema");
        assert!(check(FullTransitive, &[(1, &tree)], &tree).is_empty());

        let mut renamed = tree.clone();
        renamed["$defs"]["Category"]["properties"]["name"] = json!({ "type": "integer" });
        renamed["properties"]["name"] = json!({ "type": "integer" });
        let found = can_read(&renamed, &tree);
        assert!(
            found
                .iter()
                .any(|i| i.message == "field `name` changed type from string to integer"),
            "{found:#?}"
        );
    }
}
