//! The IoT Hub query language subset (hub-protocol spec §5), evaluated over service-view twin JSON.
//!
//! [`Query::parse`] turns the text of `POST /devices/query` into a [`Query`]: a hand-written
//! tokenizer and a recursive-descent parser. The parser never panics and never recurses without
//! bound: text longer than [`MAX_QUERY_LEN`] characters is [`QueryError::TooLong`], nesting
//! (parentheses, `NOT`, unary minus, function arguments) deeper than [`MAX_DEPTH`] is
//! [`QueryError::TooDeep`], and chains of `AND`, `OR` and arithmetic are flat lists, not nested
//! trees, so evaluating or dropping a parsed query stays shallow too.
//!
//! One stage per file: `lexer` (text to tokens), `parser` (tokens to the `ast`, bounded depth),
//! `eval` (a condition over one twin, three-valued) and `aggregation` (COUNT, SUM, AVG, MIN, MAX,
//! GROUP BY). This file is the public API; `tests.rs` pins it.
//!
//! Evaluation decisions (where the spec leaves room):
//! - Error positions are 0-based offsets in *characters* (not bytes) into the query text.
//! - Logic is three-valued, as in Azure's query engine: a missing property is *undefined*,
//!   every comparison involving undefined is undefined, `NOT undefined` is undefined,
//!   `false AND undefined` is false, `true OR undefined` is true. WHERE keeps a twin only when the
//!   condition is exactly boolean `true`.
//! - Comparisons work on primitives of the same type only: number/number, string/string,
//!   bool/bool (`false < true`), null/null (equal). Anything else, objects and arrays included,
//!   is undefined, so both `=` and `!=` are false. `x = null` is true only when `x` is an explicit
//!   JSON null; `IS_DEFINED` is true for an explicit null. Strings compare case-sensitively by
//!   code point. Integers compare exactly; an integer against a float compares as `f64`.
//! - `IN`/`NIN` (and `NOT IN`): undefined or a non-primitive value gives undefined; otherwise
//!   membership with `=` semantics, so `NIN` is the exact negation of `IN` for defined primitives
//!   (`5 NIN ['a']` is true).
//! - Arithmetic works on numbers only (anything else gives undefined). Integer results stay exact
//!   (falling back to `f64` on overflow); `/` gives an integer when it divides exactly.
//!   Division or `%` by zero, and non-finite results, are undefined.
//! - Root/system names (`deviceId`, `properties.desired`, `capabilities.iotEdge`, …) are matched
//!   case-insensitively and stored in canonical camelCase, so projections use the canonical key.
//!   Unknown roots and everything under `tags`/`desired`/`reported` are case-sensitive.
//!   A segment may also be written `['key']` or `[index]`.
//! - Besides `IS_DEFINED`, `STARTSWITH` and `ENDSWITH` (case-sensitive), the type checks
//!   `IS_NULL`, `IS_BOOL`, `IS_NUMBER`, `IS_STRING`, `IS_OBJECT`, `IS_ARRAY`, `IS_PRIMITIVE` and
//!   `CONTAINS(s, sub)` are accepted. `STARTS_WITH` (routing syntax), `ORDER BY`, unknown
//!   functions, aggregates outside SELECT and trailing text are syntax errors.
//! - Output keys: the alias, else the last path segment, else `$1`, `$2`, … in order for unnamed
//!   aggregates. If two items share a key, the later one wins.
//! - Aggregates: `COUNT()` counts rows. `SUM` adds the numbers it sees (other values are skipped;
//!   no numbers gives 0). `AVG` of no numbers is omitted from the row. `MIN`/`MAX` consider
//!   numbers and strings, numbers ordering before strings; with neither the key is omitted.
//!   Without GROUP BY there is always exactly one row. With GROUP BY, rows come in order of each
//!   group's first twin; twins where the group path is undefined form one group of their own,
//!   whose row omits the group key; numerically equal group values (`2`, `2.0`) share a group.
//! - TOP is reported by [`Query::top`]; the caller truncates the result list, for projections and
//!   aggregate rows alike.

mod aggregation;
mod ast;
mod eval;
mod lexer;
mod parser;
#[cfg(test)]
mod tests;

use serde_json::{Map, Value};

use ast::{Expr, ItemKind, Path, Select};
use eval::Val;

/// The longest query text accepted, in characters (Azure's limit).
pub const MAX_QUERY_LEN: usize = 8192;

/// How deeply expressions may nest: parentheses, `NOT`, unary minus and function arguments.
pub const MAX_DEPTH: usize = 64;

/// Why a query was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QueryError {
    /// The text is longer than [`MAX_QUERY_LEN`] characters.
    #[error("query is {len} characters long; the limit is {max}", max = MAX_QUERY_LEN)]
    TooLong { len: usize },
    /// The text does not follow the grammar; `position` is a 0-based character offset.
    #[error("syntax error at position {position}: {message}")]
    Syntax { position: usize, message: String },
    /// `FROM` names something other than `devices` or `devices.modules`.
    #[error("unsupported query source '{0}'; use devices or devices.modules")]
    UnsupportedSource(String),
    /// Expressions nest deeper than [`MAX_DEPTH`]; `position` is a 0-based character offset.
    #[error("query nests deeper than {max} levels (at position {position})", max = MAX_DEPTH)]
    TooDeep { position: usize },
}

fn syntax(position: usize, message: impl Into<String>) -> QueryError {
    QueryError::Syntax {
        position,
        message: message.into(),
    }
}

/// What a query reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// `FROM devices`: device twins.
    Devices,
    /// `FROM devices.modules`: module twins.
    DeviceModules,
}

/// A parsed query. Parse once, then evaluate against any number of twins.
#[derive(Debug, Clone, PartialEq)]
pub struct Query {
    top: Option<u64>,
    select: Select,
    source: Source,
    filter: Option<Expr>,
    group_by: Option<Path>,
}

impl Query {
    /// Parses query text. Never panics, whatever the input.
    pub fn parse(text: &str) -> Result<Query, QueryError> {
        // Byte length bounds the character count, so only long texts need counting.
        if text.len() > MAX_QUERY_LEN {
            let len = text.chars().count();
            if len > MAX_QUERY_LEN {
                return Err(QueryError::TooLong { len });
            }
        }
        parser::parse(text)
    }

    /// Where the query reads from.
    pub fn source(&self) -> Source {
        self.source
    }

    /// The `TOP n` cap on the number of results, if any. The caller applies it.
    pub fn top(&self) -> Option<u64> {
        self.top
    }

    /// True for `SELECT *` (results are whole twins, x-ms-item-type "twin"); false for
    /// projections/aggregates ("raw").
    pub fn is_select_star(&self) -> bool {
        matches!(self.select, Select::Star)
    }

    /// True if the query has an aggregate function in its SELECT list or a GROUP BY.
    pub fn is_aggregate(&self) -> bool {
        self.group_by.is_some()
            || match &self.select {
                Select::Star => false,
                Select::Items(items) => items
                    .iter()
                    .any(|item| !matches!(item.kind, ItemKind::Path(_))),
            }
    }

    /// Does this twin (service-view JSON) satisfy the WHERE clause? True if there is none.
    pub fn matches(&self, twin: &Value) -> bool {
        self.filter
            .as_ref()
            .is_none_or(|filter| matches!(filter.eval(twin), Val::Bool(true)))
    }

    /// The projection of one matching twin: `{key: value, …}` for the path items of the SELECT
    /// list, omitting paths that are undefined. For `SELECT *` this is the whole twin.
    /// Aggregate items are ignored here; use [`Query::aggregate`].
    pub fn project(&self, twin: &Value) -> Value {
        let items = match &self.select {
            Select::Star => return twin.clone(),
            Select::Items(items) => items,
        };
        let mut row = Map::new();
        for item in items {
            if let ItemKind::Path(path) = &item.kind
                && let Some(value) = path.lookup(twin)
            {
                row.insert(item.name.clone(), value.clone());
            }
        }
        Value::Object(row)
    }

    /// Aggregates the matching twins (the caller passes only twins for which
    /// [`Query::matches`] is true) into rows `{key: value, …}`; see the module docs for the
    /// rules. For a query that does not aggregate, this is simply each twin's projection (or the
    /// twin itself for `SELECT *`). TOP is not applied.
    pub fn aggregate<'a>(&self, twins: impl IntoIterator<Item = &'a Value>) -> Vec<Value> {
        let items = match &self.select {
            Select::Star => return twins.into_iter().cloned().collect(),
            Select::Items(items) => items,
        };
        if !self.is_aggregate() {
            return twins.into_iter().map(|twin| self.project(twin)).collect();
        }
        aggregation::rows(items, self.group_by.as_ref(), twins)
    }
}
