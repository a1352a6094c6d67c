//! The IoT Hub query language subset (hub-protocol spec §5), evaluated over service-view twin JSON.
//!
//! [`Query::parse`] turns the text of `POST /devices/query` into a [`Query`]: a hand-written
//! tokenizer and a recursive-descent parser. The parser never panics and never recurses without
//! bound: text longer than [`MAX_QUERY_LEN`] characters is [`QueryError::TooLong`], nesting
//! (parentheses, `NOT`, unary minus, function arguments) deeper than [`MAX_DEPTH`] is
//! [`QueryError::TooDeep`], and chains of `AND`, `OR` and arithmetic are flat lists, not nested
//! trees, so evaluating or dropping a parsed query stays shallow too.
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

use std::cmp::Ordering;
use std::collections::HashMap;
use std::fmt;

use serde_json::{Map, Number, Value};

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
        let chars: Vec<char> = text.chars().collect();
        let toks = tokenize(&chars)?;
        let mut parser = Parser {
            toks,
            idx: 0,
            depth: 0,
            end: chars.len(),
        };
        parser.parse_query()
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
        let mut groups: Vec<Group> = Vec::new();
        let mut index: HashMap<String, usize> = HashMap::new();
        if self.group_by.is_none() {
            groups.push(Group::new(None, items));
        }
        for twin in twins {
            let slot = match &self.group_by {
                None => 0,
                Some(path) => {
                    let value = path.lookup(twin);
                    let mut key = String::new();
                    group_key(value, &mut key);
                    match index.get(&key) {
                        Some(&slot) => slot,
                        None => {
                            let slot = groups.len();
                            groups.push(Group::new(value.cloned(), items));
                            index.insert(key, slot);
                            slot
                        }
                    }
                }
            };
            if let Some(group) = groups.get_mut(slot) {
                group.add(items, twin);
            }
        }
        groups
            .into_iter()
            .map(|group| group.finish(items))
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// Syntax tree

#[derive(Debug, Clone, PartialEq)]
enum Select {
    Star,
    Items(Vec<SelectItem>),
}

#[derive(Debug, Clone, PartialEq)]
struct SelectItem {
    kind: ItemKind,
    /// The output key: alias, last path segment or `$n`.
    name: String,
}

#[derive(Debug, Clone, PartialEq)]
enum ItemKind {
    Path(Path),
    Count,
    Agg(AggFn, Path),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AggFn {
    Avg,
    Sum,
    Min,
    Max,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Path {
    segments: Vec<Segment>,
}

impl Path {
    fn lookup<'v>(&self, twin: &'v Value) -> Option<&'v Value> {
        let mut current = twin;
        for segment in &self.segments {
            current = match (segment, current) {
                (Segment::Key(key), Value::Object(map)) => map.get(key)?,
                (Segment::Index(i), Value::Array(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(current)
    }

    fn last_key(&self) -> Option<&str> {
        match self.segments.last() {
            Some(Segment::Key(key)) => Some(key),
            _ => None,
        }
    }
}

impl fmt::Display for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, segment) in self.segments.iter().enumerate() {
            match segment {
                Segment::Key(key) if i == 0 => write!(f, "{key}")?,
                Segment::Key(key) => write!(f, ".{key}")?,
                Segment::Index(index) => write!(f, "[{index}]")?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    fn from_json(n: &Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else {
            n.as_f64().filter(|f| f.is_finite()).map(Num::Float)
        }
    }

    fn to_json(self) -> Option<Value> {
        match self {
            Num::Int(i) => {
                if let Ok(i) = i64::try_from(i) {
                    Some(Value::from(i))
                } else if let Ok(u) = u64::try_from(i) {
                    Some(Value::from(u))
                } else {
                    Number::from_f64(i as f64).map(Value::Number)
                }
            }
            Num::Float(f) => Number::from_f64(f).map(Value::Number),
        }
    }

    fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    fn neg(self) -> Num {
        match self {
            Num::Int(i) => i.checked_neg().map_or(Num::Float(-(i as f64)), Num::Int),
            Num::Float(f) => Num::Float(-f),
        }
    }

    fn compare(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    /// `None` means undefined: division by zero or a non-finite result.
    fn arith(self, op: ArithOp, other: Num) -> Option<Num> {
        let divides = matches!(op, ArithOp::Div | ArithOp::Rem);
        if divides && other.as_f64() == 0.0 {
            return None;
        }
        if let (Num::Int(a), Num::Int(b)) = (self, other) {
            let exact = match op {
                ArithOp::Add => a.checked_add(b),
                ArithOp::Sub => a.checked_sub(b),
                ArithOp::Mul => a.checked_mul(b),
                ArithOp::Div => match a.checked_rem(b) {
                    Some(0) => a.checked_div(b),
                    _ => None,
                },
                ArithOp::Rem => a.checked_rem(b),
            };
            if let Some(result) = exact {
                return Some(Num::Int(result));
            }
        }
        let (a, b) = (self.as_f64(), other.as_f64());
        let result = match op {
            ArithOp::Add => a + b,
            ArithOp::Sub => a - b,
            ArithOp::Mul => a * b,
            ArithOp::Div => a / b,
            ArithOp::Rem => a % b,
        };
        result.is_finite().then_some(Num::Float(result))
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Const {
    Undefined,
    Null,
    Bool(bool),
    Num(Num),
    Str(String),
}

impl Const {
    fn keyword(name: &str) -> Option<Const> {
        [
            ("true", Const::Bool(true)),
            ("false", Const::Bool(false)),
            ("null", Const::Null),
            ("undefined", Const::Undefined),
        ]
        .into_iter()
        .find(|(word, _)| word.eq_ignore_ascii_case(name))
        .map(|(_, value)| value)
    }

    fn val(&self) -> Val<'_> {
        match self {
            Const::Undefined => Val::Undefined,
            Const::Null => Val::Null,
            Const::Bool(b) => Val::Bool(*b),
            Const::Num(n) => Val::Num(*n),
            Const::Str(s) => Val::Str(s),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    fn holds(self, ordering: Ordering) -> bool {
        match self {
            CmpOp::Eq => ordering == Ordering::Equal,
            CmpOp::Ne => ordering != Ordering::Equal,
            CmpOp::Lt => ordering == Ordering::Less,
            CmpOp::Le => ordering != Ordering::Greater,
            CmpOp::Gt => ordering == Ordering::Greater,
            CmpOp::Ge => ordering != Ordering::Less,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Func {
    IsDefined,
    IsNull,
    IsBool,
    IsNumber,
    IsString,
    IsObject,
    IsArray,
    IsPrimitive,
    StartsWith,
    EndsWith,
    Contains,
}

impl Func {
    const ALL: [(&'static str, Func); 11] = [
        ("IS_DEFINED", Func::IsDefined),
        ("IS_NULL", Func::IsNull),
        ("IS_BOOL", Func::IsBool),
        ("IS_NUMBER", Func::IsNumber),
        ("IS_STRING", Func::IsString),
        ("IS_OBJECT", Func::IsObject),
        ("IS_ARRAY", Func::IsArray),
        ("IS_PRIMITIVE", Func::IsPrimitive),
        ("STARTSWITH", Func::StartsWith),
        ("ENDSWITH", Func::EndsWith),
        ("CONTAINS", Func::Contains),
    ];

    fn from_name(name: &str) -> Option<Func> {
        Func::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, f)| *f)
    }

    fn name(self) -> &'static str {
        Func::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(n, _)| n)
    }

    fn arity(self) -> usize {
        match self {
            Func::StartsWith | Func::EndsWith | Func::Contains => 2,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Expr {
    Const(Const),
    Path(Path),
    Neg(Box<Expr>),
    /// `first op1 e1 op2 e2 …`, evaluated left to right (one precedence level per node).
    Arith {
        first: Box<Expr>,
        rest: Vec<(ArithOp, Expr)>,
    },
    Compare {
        op: CmpOp,
        left: Box<Expr>,
        right: Box<Expr>,
    },
    In {
        negated: bool,
        value: Box<Expr>,
        list: Vec<Const>,
    },
    Not(Box<Expr>),
    And(Vec<Expr>),
    Or(Vec<Expr>),
    Call {
        func: Func,
        args: Vec<Expr>,
    },
}

// ---------------------------------------------------------------------------------------------
// Evaluation

/// A value during evaluation. Objects and arrays are opaque: no operator looks inside them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    Num(Num),
    Str(&'a str),
    Object,
    Array,
}

impl<'a> Val<'a> {
    fn from_json(value: &'a Value) -> Val<'a> {
        match value {
            Value::Null => Val::Null,
            Value::Bool(b) => Val::Bool(*b),
            Value::Number(n) => Num::from_json(n).map_or(Val::Undefined, Val::Num),
            Value::String(s) => Val::Str(s),
            Value::Array(_) => Val::Array,
            Value::Object(_) => Val::Object,
        }
    }

    fn is_primitive(self) -> bool {
        matches!(self, Val::Null | Val::Bool(_) | Val::Num(_) | Val::Str(_))
    }

    fn truth(self) -> Option<bool> {
        match self {
            Val::Bool(b) => Some(b),
            _ => None,
        }
    }

    fn from_truth(truth: Option<bool>) -> Val<'a> {
        truth.map_or(Val::Undefined, Val::Bool)
    }

    /// `None` when the values are not comparable (undefined, composite, or different types).
    fn compare(self, other: Val<'_>) -> Option<Ordering> {
        match (self, other) {
            (Val::Null, Val::Null) => Some(Ordering::Equal),
            (Val::Bool(a), Val::Bool(b)) => Some(a.cmp(&b)),
            (Val::Num(a), Val::Num(b)) => a.compare(b),
            (Val::Str(a), Val::Str(b)) => Some(a.cmp(b)),
            _ => None,
        }
    }
}

impl Expr {
    fn eval<'a>(&'a self, twin: &'a Value) -> Val<'a> {
        match self {
            Expr::Const(c) => c.val(),
            Expr::Path(path) => path.lookup(twin).map_or(Val::Undefined, Val::from_json),
            Expr::Neg(operand) => match operand.eval(twin) {
                Val::Num(n) => Val::Num(n.neg()),
                _ => Val::Undefined,
            },
            Expr::Arith { first, rest } => {
                let Val::Num(mut acc) = first.eval(twin) else {
                    return Val::Undefined;
                };
                for (op, operand) in rest {
                    let Val::Num(n) = operand.eval(twin) else {
                        return Val::Undefined;
                    };
                    match acc.arith(*op, n) {
                        Some(result) => acc = result,
                        None => return Val::Undefined,
                    }
                }
                Val::Num(acc)
            }
            Expr::Compare { op, left, right } => {
                let ordering = left.eval(twin).compare(right.eval(twin));
                Val::from_truth(ordering.map(|o| op.holds(o)))
            }
            Expr::In {
                negated,
                value,
                list,
            } => {
                let value = value.eval(twin);
                if !value.is_primitive() {
                    return Val::Undefined;
                }
                let found = list
                    .iter()
                    .any(|c| value.compare(c.val()) == Some(Ordering::Equal));
                Val::Bool(found != *negated)
            }
            Expr::Not(operand) => Val::from_truth(operand.eval(twin).truth().map(|b| !b)),
            Expr::And(operands) => {
                let mut unknown = false;
                for operand in operands {
                    match operand.eval(twin).truth() {
                        Some(false) => return Val::Bool(false),
                        Some(true) => {}
                        None => unknown = true,
                    }
                }
                if unknown {
                    Val::Undefined
                } else {
                    Val::Bool(true)
                }
            }
            Expr::Or(operands) => {
                let mut unknown = false;
                for operand in operands {
                    match operand.eval(twin).truth() {
                        Some(true) => return Val::Bool(true),
                        Some(false) => {}
                        None => unknown = true,
                    }
                }
                if unknown {
                    Val::Undefined
                } else {
                    Val::Bool(false)
                }
            }
            Expr::Call { func, args } => {
                let arg = |i: usize| args.get(i).map_or(Val::Undefined, |a| a.eval(twin));
                let first = arg(0);
                match func {
                    Func::IsDefined => Val::Bool(first != Val::Undefined),
                    Func::IsNull => Val::Bool(first == Val::Null),
                    Func::IsBool => Val::Bool(matches!(first, Val::Bool(_))),
                    Func::IsNumber => Val::Bool(matches!(first, Val::Num(_))),
                    Func::IsString => Val::Bool(matches!(first, Val::Str(_))),
                    Func::IsObject => Val::Bool(first == Val::Object),
                    Func::IsArray => Val::Bool(first == Val::Array),
                    Func::IsPrimitive => Val::Bool(first.is_primitive()),
                    Func::StartsWith | Func::EndsWith | Func::Contains => match (first, arg(1)) {
                        (Val::Str(s), Val::Str(part)) => Val::Bool(match func {
                            Func::StartsWith => s.starts_with(part),
                            Func::EndsWith => s.ends_with(part),
                            _ => s.contains(part),
                        }),
                        _ => Val::Undefined,
                    },
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Aggregation

/// A MIN/MAX candidate. Numbers order before strings.
#[derive(Debug, Clone)]
enum Extreme {
    Num(Num),
    Str(String),
}

impl Extreme {
    fn from_json(value: &Value) -> Option<Extreme> {
        match Val::from_json(value) {
            Val::Num(n) => Some(Extreme::Num(n)),
            Val::Str(s) => Some(Extreme::Str(s.to_owned())),
            _ => None,
        }
    }

    fn order(&self, other: &Extreme) -> Ordering {
        match (self, other) {
            (Extreme::Num(a), Extreme::Num(b)) => a.compare(*b).unwrap_or(Ordering::Equal),
            (Extreme::Num(_), Extreme::Str(_)) => Ordering::Less,
            (Extreme::Str(_), Extreme::Num(_)) => Ordering::Greater,
            (Extreme::Str(a), Extreme::Str(b)) => a.cmp(b),
        }
    }

    fn into_json(self) -> Option<Value> {
        match self {
            Extreme::Num(n) => n.to_json(),
            Extreme::Str(s) => Some(Value::String(s)),
        }
    }
}

#[derive(Debug)]
enum Acc {
    /// A plain path item: outputs the group value.
    Key,
    Count(u64),
    /// `total` is `None` once the sum stopped being finite.
    Sum(Option<Num>),
    Avg {
        total: f64,
        count: u64,
    },
    Min(Option<Extreme>),
    Max(Option<Extreme>),
}

#[derive(Debug)]
struct Group {
    key: Option<Value>,
    accs: Vec<Acc>,
}

impl Group {
    fn new(key: Option<Value>, items: &[SelectItem]) -> Group {
        let accs = items
            .iter()
            .map(|item| match &item.kind {
                ItemKind::Path(_) => Acc::Key,
                ItemKind::Count => Acc::Count(0),
                ItemKind::Agg(AggFn::Sum, _) => Acc::Sum(Some(Num::Int(0))),
                ItemKind::Agg(AggFn::Avg, _) => Acc::Avg {
                    total: 0.0,
                    count: 0,
                },
                ItemKind::Agg(AggFn::Min, _) => Acc::Min(None),
                ItemKind::Agg(AggFn::Max, _) => Acc::Max(None),
            })
            .collect();
        Group { key, accs }
    }

    fn add(&mut self, items: &[SelectItem], twin: &Value) {
        for (acc, item) in self.accs.iter_mut().zip(items) {
            let value = match &item.kind {
                ItemKind::Agg(_, path) => path.lookup(twin),
                ItemKind::Path(_) | ItemKind::Count => None,
            };
            let number = value.and_then(|v| match Val::from_json(v) {
                Val::Num(n) => Some(n),
                _ => None,
            });
            match acc {
                Acc::Key => {}
                Acc::Count(n) => *n = n.saturating_add(1),
                Acc::Sum(total) => {
                    if let (Some(sum), Some(n)) = (*total, number) {
                        *total = sum.arith(ArithOp::Add, n);
                    }
                }
                Acc::Avg { total, count } => {
                    if let Some(n) = number {
                        *total += n.as_f64();
                        *count = count.saturating_add(1);
                    }
                }
                Acc::Min(best) | Acc::Max(best) => {
                    let want = if matches!(item.kind, ItemKind::Agg(AggFn::Min, _)) {
                        Ordering::Less
                    } else {
                        Ordering::Greater
                    };
                    if let Some(candidate) = value.and_then(Extreme::from_json) {
                        let better = best.as_ref().is_none_or(|b| candidate.order(b) == want);
                        if better {
                            *best = Some(candidate);
                        }
                    }
                }
            }
        }
    }

    fn finish(self, items: &[SelectItem]) -> Value {
        let mut row = Map::new();
        let key = self.key;
        for (acc, item) in self.accs.into_iter().zip(items) {
            let value = match acc {
                Acc::Key => key.clone(),
                Acc::Count(n) => Some(Value::from(n)),
                Acc::Sum(total) => total.and_then(Num::to_json),
                Acc::Avg { total, count } => {
                    if count == 0 {
                        None
                    } else {
                        Number::from_f64(total / count as f64).map(Value::Number)
                    }
                }
                Acc::Min(best) | Acc::Max(best) => best.and_then(Extreme::into_json),
            };
            if let Some(value) = value {
                row.insert(item.name.clone(), value);
            }
        }
        Value::Object(row)
    }
}

/// Writes an unambiguous key for a group value. Numerically equal numbers get the same key.
fn group_key(value: Option<&Value>, out: &mut String) {
    use std::fmt::Write as _;
    let Some(value) = value else {
        out.push('u');
        return;
    };
    // Writing to a String cannot fail.
    let _ = match value {
        Value::Null => write!(out, "n"),
        Value::Bool(b) => write!(out, "b{b}"),
        Value::Number(n) => match Num::from_json(n) {
            Some(Num::Int(i)) => write!(out, "i{i}"),
            Some(Num::Float(f)) if f.fract() == 0.0 && f.abs() < 1e38 => {
                write!(out, "i{}", f as i128)
            }
            Some(Num::Float(f)) => write!(out, "f{f:?}"),
            None => write!(out, "x{n}"),
        },
        Value::String(s) => write!(out, "s{}:{s}", s.len()),
        Value::Array(items) => {
            out.push('[');
            for item in items {
                group_key(Some(item), out);
                out.push(',');
            }
            write!(out, "]")
        }
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for key in keys {
                let _ = write!(out, "{}:{key}=", key.len());
                group_key(map.get(key.as_str()), out);
                out.push(',');
            }
            write!(out, "}}")
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Tokenizer

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    /// A name: keyword, function, path segment or alias (keywords are recognised by the parser).
    Ident(String),
    Str(String),
    Num(Num),
    LParen,
    RParen,
    LBracket,
    RBracket,
    Comma,
    Dot,
    Star,
    Plus,
    Minus,
    Slash,
    Percent,
    Cmp(CmpOp),
    Eof,
}

static EOF: Tok = Tok::Eof;

fn describe(tok: &Tok) -> String {
    match tok {
        Tok::Ident(name) => format!("'{name}'"),
        Tok::Str(_) => "a string".to_owned(),
        Tok::Num(_) => "a number".to_owned(),
        Tok::LParen => "'('".to_owned(),
        Tok::RParen => "')'".to_owned(),
        Tok::LBracket => "'['".to_owned(),
        Tok::RBracket => "']'".to_owned(),
        Tok::Comma => "','".to_owned(),
        Tok::Dot => "'.'".to_owned(),
        Tok::Star => "'*'".to_owned(),
        Tok::Plus => "'+'".to_owned(),
        Tok::Minus => "'-'".to_owned(),
        Tok::Slash => "'/'".to_owned(),
        Tok::Percent => "'%'".to_owned(),
        Tok::Cmp(op) => format!("'{}'", op.symbol()),
        Tok::Eof => "the end of the query".to_owned(),
    }
}

#[derive(Debug)]
struct Token {
    tok: Tok,
    /// 0-based character offset of the token's first character.
    pos: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

fn tokenize(chars: &[char]) -> Result<Vec<Token>, QueryError> {
    let mut lexer = Lexer { chars, pos: 0 };
    let mut tokens = Vec::new();
    let mut after_dot = false;
    while let Some(c) = lexer.at(0) {
        if c.is_whitespace() {
            lexer.pos += 1;
            continue;
        }
        let start = lexer.pos;
        // After a '.', a segment may start with a digit (`tags.2fa`): twin keys can.
        let tok = if is_ident_start(c) || (after_dot && is_ident_continue(c)) {
            Tok::Ident(lexer.take_while(is_ident_continue))
        } else if c.is_ascii_digit() {
            lexer.number()?
        } else if c == '\'' || c == '"' {
            lexer.string(c)?
        } else {
            lexer.punctuation(c)?
        };
        after_dot = tok == Tok::Dot;
        tokens.push(Token { tok, pos: start });
    }
    tokens.push(Token {
        tok: Tok::Eof,
        pos: chars.len(),
    });
    Ok(tokens)
}

struct Lexer<'t> {
    chars: &'t [char],
    pos: usize,
}

impl Lexer<'_> {
    fn at(&self, ahead: usize) -> Option<char> {
        self.chars.get(self.pos.saturating_add(ahead)).copied()
    }

    fn take_while(&mut self, pred: impl Fn(char) -> bool) -> String {
        let mut out = String::new();
        while let Some(c) = self.at(0).filter(|c| pred(*c)) {
            out.push(c);
            self.pos += 1;
        }
        out
    }

    fn punctuation(&mut self, c: char) -> Result<Tok, QueryError> {
        let start = self.pos;
        let (tok, len) = match (c, self.at(1)) {
            ('(', _) => (Tok::LParen, 1),
            (')', _) => (Tok::RParen, 1),
            ('[', _) => (Tok::LBracket, 1),
            (']', _) => (Tok::RBracket, 1),
            (',', _) => (Tok::Comma, 1),
            ('.', _) => (Tok::Dot, 1),
            ('*', _) => (Tok::Star, 1),
            ('+', _) => (Tok::Plus, 1),
            ('-', _) => (Tok::Minus, 1),
            ('/', _) => (Tok::Slash, 1),
            ('%', _) => (Tok::Percent, 1),
            ('=', Some('=')) => return Err(syntax(start, "use '=' to compare for equality")),
            ('=', _) => (Tok::Cmp(CmpOp::Eq), 1),
            ('!', Some('=')) => (Tok::Cmp(CmpOp::Ne), 2),
            ('<', Some('=')) => (Tok::Cmp(CmpOp::Le), 2),
            ('<', Some('>')) => (Tok::Cmp(CmpOp::Ne), 2),
            ('<', _) => (Tok::Cmp(CmpOp::Lt), 1),
            ('>', Some('=')) => (Tok::Cmp(CmpOp::Ge), 2),
            ('>', _) => (Tok::Cmp(CmpOp::Gt), 1),
            ('!', _) => return Err(syntax(start, "use NOT for negation")),
            _ => return Err(syntax(start, format!("unexpected character {c:?}"))),
        };
        self.pos += len;
        Ok(tok)
    }

    fn number(&mut self) -> Result<Tok, QueryError> {
        let start = self.pos;
        let num = if self.at(0) == Some('0') && matches!(self.at(1), Some('x' | 'X')) {
            self.pos += 2;
            let digits = self.take_while(|c| c.is_ascii_hexdigit());
            if digits.is_empty() {
                return Err(syntax(start, "expected hex digits after 0x"));
            }
            let value = u64::from_str_radix(&digits, 16)
                .map_err(|_| syntax(start, "hex number does not fit in 64 bits"))?;
            Num::Int(i128::from(value))
        } else {
            let mut text = self.take_while(|c| c.is_ascii_digit());
            let mut is_float = false;
            if self.at(0) == Some('.') && self.at(1).is_some_and(|c| c.is_ascii_digit()) {
                self.pos += 1;
                text.push('.');
                text.push_str(&self.take_while(|c| c.is_ascii_digit()));
                is_float = true;
            }
            if matches!(self.at(0), Some('e' | 'E')) {
                let sign = usize::from(matches!(self.at(1), Some('+' | '-')));
                if self.at(1 + sign).is_some_and(|c| c.is_ascii_digit()) {
                    for _ in 0..=sign {
                        if let Some(c) = self.at(0) {
                            text.push(c);
                        }
                        self.pos += 1;
                    }
                    text.push_str(&self.take_while(|c| c.is_ascii_digit()));
                    is_float = true;
                }
            }
            let int = if is_float {
                None
            } else {
                text.parse::<i128>().ok()
            };
            match int {
                Some(i) => Num::Int(i),
                None => {
                    let f: f64 = text.parse().map_err(|_| syntax(start, "invalid number"))?;
                    if !f.is_finite() {
                        return Err(syntax(start, "number out of range"));
                    }
                    Num::Float(f)
                }
            }
        };
        if self.at(0).is_some_and(is_ident_continue) {
            return Err(syntax(start, "invalid number"));
        }
        Ok(Tok::Num(num))
    }

    fn string(&mut self, quote: char) -> Result<Tok, QueryError> {
        let start = self.pos;
        self.pos += 1;
        let mut out = String::new();
        loop {
            let Some(c) = self.at(0) else {
                return Err(syntax(start, "unterminated string"));
            };
            let here = self.pos;
            self.pos += 1;
            if c == quote {
                return Ok(Tok::Str(out));
            }
            if c != '\\' {
                out.push(c);
                continue;
            }
            let Some(escaped) = self.at(0) else {
                return Err(syntax(start, "unterminated string"));
            };
            self.pos += 1;
            let c = match escaped {
                '\'' | '"' | '\\' | '/' => escaped,
                'b' => '\u{8}',
                'f' => '\u{c}',
                'n' => '\n',
                'r' => '\r',
                't' => '\t',
                'u' => self.unicode_escape(here)?,
                other => {
                    return Err(syntax(here, format!("unknown escape sequence '\\{other}'")));
                }
            };
            out.push(c);
        }
    }

    /// Reads the four hex digits of a `\u` escape that started at `at`.
    fn hex4(&mut self, at: usize) -> Result<u32, QueryError> {
        let mut value = 0u32;
        for _ in 0..4 {
            let digit = self
                .at(0)
                .and_then(|c| c.to_digit(16))
                .ok_or_else(|| syntax(at, "\\u must be followed by four hex digits"))?;
            value = value * 16 + digit;
            self.pos += 1;
        }
        Ok(value)
    }

    fn unicode_escape(&mut self, at: usize) -> Result<char, QueryError> {
        let first = self.hex4(at)?;
        let code = if (0xD800..0xDC00).contains(&first) {
            let low_at = self.pos;
            if self.at(0) != Some('\\') || self.at(1) != Some('u') {
                return Err(syntax(at, "unpaired surrogate in \\u escape"));
            }
            self.pos += 2;
            let low = self.hex4(low_at)?;
            if !(0xDC00..0xE000).contains(&low) {
                return Err(syntax(low_at, "expected a low surrogate \\u escape"));
            }
            0x10000 + ((first - 0xD800) << 10) + (low - 0xDC00)
        } else {
            first
        };
        char::from_u32(code).ok_or_else(|| syntax(at, "unpaired surrogate in \\u escape"))
    }
}

// ---------------------------------------------------------------------------------------------
// Parser

const RESERVED: [&str; 17] = [
    "SELECT",
    "TOP",
    "FROM",
    "WHERE",
    "GROUP",
    "BY",
    "ORDER",
    "AS",
    "AND",
    "OR",
    "NOT",
    "IN",
    "NIN",
    "TRUE",
    "FALSE",
    "NULL",
    "UNDEFINED",
];

fn is_reserved(name: &str) -> bool {
    RESERVED.iter().any(|word| word.eq_ignore_ascii_case(name))
}

const AGGREGATES: [&str; 5] = ["COUNT", "AVG", "SUM", "MIN", "MAX"];

/// Twin root names (spec §3.1), matched case-insensitively.
const ROOT_NAMES: [&str; 19] = [
    "deviceId",
    "moduleId",
    "etag",
    "deviceEtag",
    "status",
    "statusReason",
    "statusUpdateTime",
    "connectionState",
    "lastActivityTime",
    "cloudToDeviceMessageCount",
    "authenticationType",
    "x509Thumbprint",
    "modelId",
    "version",
    "tags",
    "properties",
    "capabilities",
    "deviceScope",
    "parentScopes",
];

/// The canonical spelling of `name` as a child of `parent`: system names are case-insensitive,
/// user keys (under tags, desired, reported) are taken as written.
fn canonical_name(parent: &[Segment], name: &str) -> String {
    let table: &[&str] = match parent {
        [] => &ROOT_NAMES,
        [Segment::Key(key)] if key == "properties" => &["desired", "reported"],
        [Segment::Key(key)] if key == "capabilities" => &["iotEdge"],
        [Segment::Key(key)] if key == "x509Thumbprint" => {
            &["primaryThumbprint", "secondaryThumbprint"]
        }
        _ => &[],
    };
    table
        .iter()
        .find(|known| known.eq_ignore_ascii_case(name))
        .map_or_else(|| name.to_owned(), |known| (*known).to_owned())
}

fn routing_function_hint(upper: &str) -> Option<String> {
    let twin_name = match upper {
        "STARTS_WITH" => "STARTSWITH",
        "ENDS_WITH" => "ENDSWITH",
        _ => return None,
    };
    Some(format!(
        "{upper} is routing-query syntax; twin queries use {twin_name}(value, 'text')"
    ))
}

struct Parser {
    toks: Vec<Token>,
    idx: usize,
    depth: usize,
    /// Character length of the text: the position of the end.
    end: usize,
}

impl Parser {
    fn peek(&self) -> &Tok {
        self.peek_at(0)
    }

    fn peek_at(&self, ahead: usize) -> &Tok {
        self.toks
            .get(self.idx.saturating_add(ahead))
            .map_or(&EOF, |t| &t.tok)
    }

    fn pos(&self) -> usize {
        self.toks.get(self.idx).map_or(self.end, |t| t.pos)
    }

    /// Consumes the current token and returns it. Consumed tokens are never looked at again.
    fn advance(&mut self) -> Tok {
        match self.toks.get_mut(self.idx) {
            Some(token) if token.tok != Tok::Eof => {
                self.idx += 1;
                std::mem::replace(&mut token.tok, Tok::Eof)
            }
            _ => Tok::Eof,
        }
    }

    fn is_kw(&self, kw: &str) -> bool {
        matches!(self.peek(), Tok::Ident(name) if name.eq_ignore_ascii_case(kw))
    }

    fn eat_kw(&mut self, kw: &str) -> bool {
        let found = self.is_kw(kw);
        if found {
            self.advance();
        }
        found
    }

    fn expect_kw(&mut self, kw: &str) -> Result<(), QueryError> {
        if self.eat_kw(kw) {
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected {kw}")))
        }
    }

    fn expect(&mut self, tok: &Tok) -> Result<(), QueryError> {
        if self.peek() == tok {
            self.advance();
            Ok(())
        } else {
            Err(self.unexpected(&format!("expected {}", describe(tok))))
        }
    }

    fn unexpected(&self, expected: &str) -> QueryError {
        syntax(
            self.pos(),
            format!("{expected}, found {}", describe(self.peek())),
        )
    }

    /// Runs `f` one nesting level deeper, failing with `TooDeep` beyond [`MAX_DEPTH`].
    fn nested<T>(
        &mut self,
        f: impl FnOnce(&mut Self) -> Result<T, QueryError>,
    ) -> Result<T, QueryError> {
        if self.depth >= MAX_DEPTH {
            return Err(QueryError::TooDeep {
                position: self.pos(),
            });
        }
        self.depth += 1;
        let result = f(self);
        self.depth -= 1;
        result
    }

    fn parse_query(&mut self) -> Result<Query, QueryError> {
        self.expect_kw("SELECT")?;
        let top = if self.eat_kw("TOP") {
            Some(self.parse_top()?)
        } else {
            None
        };
        let (select, item_positions) = self.parse_select()?;
        self.expect_kw("FROM")?;
        let source = self.parse_source()?;
        let filter = if self.eat_kw("WHERE") {
            Some(self.parse_or()?)
        } else {
            None
        };
        let group_pos = self.pos();
        let group_by = if self.eat_kw("GROUP") {
            self.expect_kw("BY")?;
            Some(self.parse_path()?)
        } else {
            None
        };
        if self.is_kw("ORDER") {
            return Err(syntax(
                self.pos(),
                "ORDER BY is not supported in IoT Hub queries",
            ));
        }
        if *self.peek() != Tok::Eof {
            return Err(syntax(
                self.pos(),
                format!(
                    "unexpected {} after the end of the query",
                    describe(self.peek())
                ),
            ));
        }
        let query = Query {
            top,
            select,
            source,
            filter,
            group_by,
        };
        query.validate(group_pos, &item_positions)?;
        Ok(query)
    }

    fn parse_top(&mut self) -> Result<u64, QueryError> {
        let pos = self.pos();
        match self.peek() {
            Tok::Num(Num::Int(n)) => {
                let n = u64::try_from(*n)
                    .map_err(|_| syntax(pos, "TOP expects a non-negative integer"))?;
                self.advance();
                Ok(n)
            }
            _ => Err(self.unexpected("TOP expects a non-negative integer")),
        }
    }

    /// The SELECT list, and the position of each item (for validation messages).
    fn parse_select(&mut self) -> Result<(Select, Vec<usize>), QueryError> {
        if *self.peek() == Tok::Star {
            self.advance();
            return Ok((Select::Star, Vec::new()));
        }
        let mut items = Vec::new();
        let mut positions = Vec::new();
        let mut unnamed = 0usize;
        loop {
            positions.push(self.pos());
            let kind = self.parse_select_item()?;
            let name = if self.eat_kw("AS") {
                match self.peek() {
                    Tok::Ident(alias) if !is_reserved(alias) => {
                        let alias = alias.clone();
                        self.advance();
                        alias
                    }
                    _ => return Err(self.unexpected("expected a name after AS")),
                }
            } else if let ItemKind::Path(path) = &kind
                && let Some(key) = path.last_key()
            {
                key.to_owned()
            } else {
                unnamed += 1;
                format!("${unnamed}")
            };
            items.push(SelectItem { kind, name });
            if *self.peek() == Tok::Comma {
                self.advance();
            } else {
                break;
            }
        }
        Ok((Select::Items(items), positions))
    }

    fn parse_select_item(&mut self) -> Result<ItemKind, QueryError> {
        let pos = self.pos();
        let name = match self.peek() {
            Tok::Ident(name) if *self.peek_at(1) == Tok::LParen => name.clone(),
            Tok::Ident(name) if !is_reserved(name) => {
                return Ok(ItemKind::Path(self.parse_path()?));
            }
            _ => return Err(self.unexpected("expected '*', a path or an aggregate function")),
        };
        let upper = name.to_ascii_uppercase();
        let agg = match upper.as_str() {
            "COUNT" => None,
            "AVG" => Some(AggFn::Avg),
            "SUM" => Some(AggFn::Sum),
            "MIN" => Some(AggFn::Min),
            "MAX" => Some(AggFn::Max),
            _ => {
                let message = if let Some(hint) = routing_function_hint(&upper) {
                    hint
                } else if Func::from_name(&upper).is_some() {
                    format!(
                        "{upper} cannot be selected; select paths or aggregates ({})",
                        AGGREGATES.join(", ")
                    )
                } else {
                    format!("unknown function '{name}'")
                };
                return Err(syntax(pos, message));
            }
        };
        self.advance(); // name
        self.advance(); // '('
        let kind = match agg {
            None => {
                if *self.peek() != Tok::RParen {
                    return Err(self.unexpected("COUNT() takes no arguments: expected ')'"));
                }
                ItemKind::Count
            }
            Some(f) => ItemKind::Agg(f, self.parse_path()?),
        };
        self.expect(&Tok::RParen)?;
        Ok(kind)
    }

    fn parse_source(&mut self) -> Result<Source, QueryError> {
        let mut name = match self.peek() {
            Tok::Ident(name) => name.clone(),
            _ => return Err(self.unexpected("expected devices or devices.modules")),
        };
        self.advance();
        if *self.peek() == Tok::Dot {
            self.advance();
            match self.peek() {
                Tok::Ident(child) => {
                    name.push('.');
                    name.push_str(child);
                    self.advance();
                }
                _ => return Err(self.unexpected("expected a name after '.'")),
            }
        }
        if name.eq_ignore_ascii_case("devices") {
            Ok(Source::Devices)
        } else if name.eq_ignore_ascii_case("devices.modules") {
            Ok(Source::DeviceModules)
        } else {
            Err(QueryError::UnsupportedSource(name))
        }
    }

    /// `path := ident ('.' ident | '[' (string | int) ']')*`
    fn parse_path(&mut self) -> Result<Path, QueryError> {
        let first = match self.peek() {
            Tok::Ident(name) if !is_reserved(name) => name.clone(),
            _ => return Err(self.unexpected("expected a path")),
        };
        self.advance();
        let mut segments = vec![Segment::Key(canonical_name(&[], &first))];
        loop {
            match self.peek() {
                Tok::Dot => {
                    self.advance();
                    let segment = match self.peek() {
                        Tok::Ident(name) => Segment::Key(canonical_name(&segments, name)),
                        _ => return Err(self.unexpected("expected a property name after '.'")),
                    };
                    self.advance();
                    segments.push(segment);
                }
                Tok::LBracket => {
                    self.advance();
                    let segment = match self.peek() {
                        Tok::Str(name) => Segment::Key(canonical_name(&segments, name)),
                        Tok::Num(Num::Int(i)) => match usize::try_from(*i) {
                            Ok(i) => Segment::Index(i),
                            Err(_) => return Err(self.unexpected("expected an array index")),
                        },
                        _ => return Err(self.unexpected("expected a quoted key or an index")),
                    };
                    self.advance();
                    self.expect(&Tok::RBracket)?;
                    segments.push(segment);
                }
                _ => return Ok(Path { segments }),
            }
        }
    }

    /// `cond := and_c (OR and_c)*`; every entry is one nesting level.
    fn parse_or(&mut self) -> Result<Expr, QueryError> {
        self.nested(|p| {
            let first = p.parse_and()?;
            if !p.is_kw("OR") {
                return Ok(first);
            }
            let mut operands = vec![first];
            while p.eat_kw("OR") {
                operands.push(p.parse_and()?);
            }
            Ok(Expr::Or(operands))
        })
    }

    fn parse_and(&mut self) -> Result<Expr, QueryError> {
        let first = self.parse_not()?;
        if !self.is_kw("AND") {
            return Ok(first);
        }
        let mut operands = vec![first];
        while self.eat_kw("AND") {
            operands.push(self.parse_not()?);
        }
        Ok(Expr::And(operands))
    }

    fn parse_not(&mut self) -> Result<Expr, QueryError> {
        if self.eat_kw("NOT") {
            let operand = self.nested(Self::parse_not)?;
            Ok(Expr::Not(Box::new(operand)))
        } else {
            self.parse_comparison()
        }
    }

    fn parse_comparison(&mut self) -> Result<Expr, QueryError> {
        let left = self.parse_additive()?;
        let negated = if self.is_kw("IN") {
            false
        } else if self.is_kw("NIN") {
            true
        } else if self.is_kw("NOT")
            && matches!(self.peek_at(1), Tok::Ident(kw) if kw.eq_ignore_ascii_case("IN"))
        {
            self.advance(); // NOT; IN is consumed below
            true
        } else if let Tok::Cmp(op) = *self.peek() {
            self.advance();
            let right = self.parse_additive()?;
            if matches!(self.peek(), Tok::Cmp(_)) {
                return Err(self.unexpected("comparisons cannot be chained; use AND"));
            }
            return Ok(Expr::Compare {
                op,
                left: Box::new(left),
                right: Box::new(right),
            });
        } else {
            return Ok(left);
        };
        self.advance(); // IN or NIN
        let list = self.parse_const_list()?;
        Ok(Expr::In {
            negated,
            value: Box::new(left),
            list,
        })
    }

    /// `'[' const (',' const)* ']'`; `( … )` is accepted too.
    fn parse_const_list(&mut self) -> Result<Vec<Const>, QueryError> {
        let close = match self.peek() {
            Tok::LBracket => Tok::RBracket,
            Tok::LParen => Tok::RParen,
            _ => return Err(self.unexpected("expected '[' to start the IN list")),
        };
        self.advance();
        let mut list = Vec::new();
        loop {
            list.push(self.parse_const()?);
            if *self.peek() == Tok::Comma {
                self.advance();
            } else {
                self.expect(&close)?;
                return Ok(list);
            }
        }
    }

    fn parse_const(&mut self) -> Result<Const, QueryError> {
        let negative = *self.peek() == Tok::Minus;
        if negative {
            self.advance();
        }
        let constant = match self.peek() {
            Tok::Num(n) if negative => Some(Const::Num(n.neg())),
            Tok::Num(n) => Some(Const::Num(*n)),
            Tok::Str(s) if !negative => Some(Const::Str(s.clone())),
            Tok::Ident(name) if !negative => Const::keyword(name),
            _ => None,
        };
        match constant {
            Some(constant) => {
                self.advance();
                Ok(constant)
            }
            None => Err(self.unexpected(
                "expected a constant (string, number, true, false, null or undefined)",
            )),
        }
    }

    fn parse_additive(&mut self) -> Result<Expr, QueryError> {
        let first = self.parse_multiplicative()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek() {
                Tok::Plus => ArithOp::Add,
                Tok::Minus => ArithOp::Sub,
                _ => break,
            };
            self.advance();
            rest.push((op, self.parse_multiplicative()?));
        }
        Ok(arith(first, rest))
    }

    fn parse_multiplicative(&mut self) -> Result<Expr, QueryError> {
        let first = self.parse_unary()?;
        let mut rest = Vec::new();
        loop {
            let op = match self.peek() {
                Tok::Star => ArithOp::Mul,
                Tok::Slash => ArithOp::Div,
                Tok::Percent => ArithOp::Rem,
                _ => break,
            };
            self.advance();
            rest.push((op, self.parse_unary()?));
        }
        Ok(arith(first, rest))
    }

    fn parse_unary(&mut self) -> Result<Expr, QueryError> {
        if *self.peek() != Tok::Minus {
            return self.parse_primary();
        }
        self.advance();
        let operand = self.nested(Self::parse_unary)?;
        Ok(match operand {
            Expr::Const(Const::Num(n)) => Expr::Const(Const::Num(n.neg())),
            other => Expr::Neg(Box::new(other)),
        })
    }

    fn parse_primary(&mut self) -> Result<Expr, QueryError> {
        match self.peek() {
            Tok::LParen => {
                self.advance();
                let inner = self.parse_or()?;
                self.expect(&Tok::RParen)?;
                Ok(inner)
            }
            Tok::Str(s) => {
                let constant = Const::Str(s.clone());
                self.advance();
                Ok(Expr::Const(constant))
            }
            Tok::Num(n) => {
                let constant = Const::Num(*n);
                self.advance();
                Ok(Expr::Const(constant))
            }
            Tok::Ident(name) => {
                if let Some(constant) = Const::keyword(name) {
                    self.advance();
                    return Ok(Expr::Const(constant));
                }
                if is_reserved(name) {
                    return Err(self.unexpected("expected an expression"));
                }
                if *self.peek_at(1) == Tok::LParen {
                    return self.parse_call();
                }
                Ok(Expr::Path(self.parse_path()?))
            }
            _ => Err(self.unexpected("expected an expression")),
        }
    }

    /// A function call in a condition; the current token is its name, followed by '('.
    fn parse_call(&mut self) -> Result<Expr, QueryError> {
        let pos = self.pos();
        let name = match self.peek() {
            Tok::Ident(name) => name.clone(),
            _ => return Err(self.unexpected("expected a function name")),
        };
        let upper = name.to_ascii_uppercase();
        if let Some(hint) = routing_function_hint(&upper) {
            return Err(syntax(pos, hint));
        }
        if AGGREGATES.contains(&upper.as_str()) {
            return Err(syntax(
                pos,
                format!("aggregate function {upper} is only allowed in the SELECT list"),
            ));
        }
        let func = Func::from_name(&upper)
            .ok_or_else(|| syntax(pos, format!("unknown function '{name}'")))?;
        self.advance(); // name
        self.advance(); // '('
        let mut args = Vec::new();
        if *self.peek() != Tok::RParen {
            loop {
                args.push(self.parse_or()?);
                if *self.peek() == Tok::Comma {
                    self.advance();
                } else {
                    break;
                }
            }
        }
        self.expect(&Tok::RParen)?;
        if args.len() != func.arity() {
            return Err(syntax(
                pos,
                format!(
                    "{} takes {} argument(s), found {}",
                    func.name(),
                    func.arity(),
                    args.len()
                ),
            ));
        }
        Ok(Expr::Call { func, args })
    }
}

fn arith(first: Expr, rest: Vec<(ArithOp, Expr)>) -> Expr {
    if rest.is_empty() {
        first
    } else {
        Expr::Arith {
            first: Box::new(first),
            rest,
        }
    }
}

impl Query {
    /// Checks what the grammar alone cannot: plain paths in an aggregate SELECT must be the
    /// GROUP BY path, and `SELECT *` cannot be grouped.
    fn validate(&self, group_pos: usize, item_positions: &[usize]) -> Result<(), QueryError> {
        let items = match &self.select {
            Select::Star if self.group_by.is_some() => {
                return Err(syntax(
                    group_pos,
                    "SELECT * cannot be combined with GROUP BY",
                ));
            }
            Select::Star => return Ok(()),
            Select::Items(items) => items,
        };
        if !self.is_aggregate() {
            return Ok(());
        }
        for (item, pos) in items.iter().zip(item_positions) {
            let ItemKind::Path(path) = &item.kind else {
                continue;
            };
            match &self.group_by {
                Some(group) if group == path => {}
                Some(group) => {
                    return Err(syntax(
                        *pos,
                        format!("'{path}' is not the GROUP BY path '{group}'"),
                    ));
                }
                None => {
                    return Err(syntax(
                        *pos,
                        format!(
                            "'{path}' must be inside an aggregate function or be the GROUP BY path"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn twins() -> Vec<Value> {
        vec![
            json!({
                "deviceId": "dev1", "etag": "AAAAAAAAAAM=", "status": "enabled",
                "statusReason": null, "connectionState": "Connected",
                "lastActivityTime": "2024-05-01T10:00:03.1234567Z", "authenticationType": "sas",
                "version": 7, "capabilities": {"iotEdge": false},
                "tags": {"site": {"building": "B1"}, "location": {"region": "US"}, "floor": 2,
                         "owner": "alice", "maybe": null, "Mixed": "upper", "list": [1, 2]},
                "properties": {
                    "desired": {"fanSpeed": 3, "telemetryConfig": {"sendFrequency": "5m"},
                                "$version": 2},
                    "reported": {"temp": 21, "telemetryConfig": {"status": "Success"},
                                 "firmware": "1.2.0", "online": true, "$version": 4}
                }
            }),
            json!({
                "deviceId": "dev2", "status": "disabled", "statusReason": "maintenance",
                "connectionState": "Disconnected", "authenticationType": "selfSigned",
                "version": 3, "capabilities": {"iotEdge": true},
                "tags": {"location": {"region": "EU"}, "floor": 5, "owner": "bob"},
                "properties": {
                    "desired": {"fanSpeed": 1, "$version": 5},
                    "reported": {"temp": 30.5, "telemetryConfig": {"status": "Pending"},
                                 "firmware": "2.0.1", "online": false, "$version": 9}
                }
            }),
            json!({
                "deviceId": "gateway-3", "status": "enabled", "statusReason": null,
                "connectionState": "Connected", "authenticationType": "certificateAuthority",
                "version": 2, "capabilities": {"iotEdge": false}, "tags": {},
                "properties": {
                    "desired": {"$version": 1},
                    "reported": {"temp": "hot", "telemetryConfig": {"status": "Success"},
                                 "$version": 1}
                }
            }),
            json!({
                "deviceId": "dev4", "status": "enabled", "connectionState": "Connected",
                "version": 2, "tags": {"location": {"region": "US"}, "floor": "2"},
                "properties": {
                    "desired": {},
                    "reported": {"temp": 15, "telemetryConfig": {"status": "Success"}}
                }
            }),
        ]
    }

    fn matching(query: &Query, twins: &[Value]) -> Vec<String> {
        twins
            .iter()
            .filter(|t| query.matches(t))
            .map(|t| t["deviceId"].as_str().unwrap().to_owned())
            .collect()
    }

    #[test]
    fn query_where_table() {
        let cases: &[(&str, &[&str])] = &[
            // Equality on tags, nested desired, reported comparisons.
            ("tags.location.region = 'US'", &["dev1", "dev4"]),
            ("tags.location.region = \"US\"", &["dev1", "dev4"]),
            ("tags.location.region != 'US'", &["dev2"]),
            ("tags.location.region <> 'US'", &["dev2"]),
            ("tags.site.building = 'B1'", &["dev1"]),
            (
                "properties.desired.telemetryConfig.sendFrequency = '5m'",
                &["dev1"],
            ),
            ("properties.desired.fanSpeed = 3", &["dev1"]),
            ("properties.reported.temp > 20", &["dev1", "dev2"]),
            ("properties.reported.temp >= 21", &["dev1", "dev2"]),
            ("properties.reported.temp < 21", &["dev4"]),
            ("properties.reported.temp <= 21", &["dev1", "dev4"]),
            ("properties.reported.temp > 'a'", &["gateway-3"]),
            ("properties.reported.temp = 30.5", &["dev2"]),
            ("properties.desired.$version > 1", &["dev1", "dev2"]),
            // Types must match: 2 and '2' are different.
            ("tags.floor = 2", &["dev1"]),
            ("tags.floor = '2'", &["dev4"]),
            ("tags.floor = 2.0", &["dev1"]),
            ("tags.floor = 0x5", &["dev2"]),
            ("tags.floor > -1.5e0", &["dev1", "dev2"]),
            // IN / NIN / NOT IN.
            ("tags.floor IN [2, 5]", &["dev1", "dev2"]),
            ("tags.floor IN (2, 5)", &["dev1", "dev2"]),
            ("tags.floor NIN [2, 5]", &["dev4"]),
            ("tags.floor NOT IN [2]", &["dev2", "dev4"]),
            ("NOT tags.floor IN [2]", &["dev2", "dev4"]),
            ("deviceId IN ['dev1', 'dev2']", &["dev1", "dev2"]),
            ("tags.floor IN [-5, 'x', null, undefined, true]", &[]),
            ("statusReason IN [null]", &["dev1", "gateway-3"]),
            // IS_DEFINED and null.
            ("IS_DEFINED(tags.maybe)", &["dev1"]),
            ("tags.maybe = null", &["dev1"]),
            ("statusReason = null", &["dev1", "gateway-3"]),
            ("statusReason != null", &[]),
            ("IS_DEFINED(statusReason)", &["dev1", "dev2", "gateway-3"]),
            (
                "IS_DEFINED(properties.reported.firmware)",
                &["dev1", "dev2"],
            ),
            ("NOT IS_DEFINED(tags.location)", &["gateway-3"]),
            ("IS_NULL(statusReason)", &["dev1", "gateway-3"]),
            ("IS_NUMBER(tags.floor)", &["dev1", "dev2"]),
            ("IS_STRING(tags.floor)", &["dev4"]),
            ("IS_OBJECT(tags.location)", &["dev1", "dev2", "dev4"]),
            ("IS_ARRAY(tags.list)", &["dev1"]),
            ("IS_BOOL(properties.reported.online)", &["dev1", "dev2"]),
            ("IS_PRIMITIVE(tags.floor)", &["dev1", "dev2", "dev4"]),
            // String functions, case-sensitive.
            ("STARTSWITH(deviceId, 'dev')", &["dev1", "dev2", "dev4"]),
            ("startswith(deviceId, 'DEV')", &[]),
            ("ENDSWITH(deviceId, '-3')", &["gateway-3"]),
            ("STARTSWITH(properties.reported.firmware, '1.')", &["dev1"]),
            ("STARTSWITH(tags.floor, '2')", &["dev4"]),
            ("CONTAINS(deviceId, 'way')", &["gateway-3"]),
            // AND binds tighter than OR; NOT binds tighter than AND.
            (
                "tags.owner = 'alice' OR tags.owner = 'bob' AND tags.floor = 99",
                &["dev1"],
            ),
            (
                "(tags.owner = 'alice' OR tags.owner = 'bob') AND tags.floor = 99",
                &[],
            ),
            ("NOT tags.owner = 'alice' AND tags.floor = 5", &["dev2"]),
            (
                "NOT (tags.owner = 'alice' AND tags.floor = 5)",
                &["dev1", "dev2"],
            ),
            ("NOT (tags.owner = 'alice')", &["dev2"]),
            ("NOT NOT tags.owner = 'alice'", &["dev1"]),
            (
                "((tags.floor = 2)) OR ((tags.floor = 5))",
                &["dev1", "dev2"],
            ),
            // Undefined: every comparison is false, and NOT does not rescue it.
            ("tags.nothing = 1", &[]),
            ("tags.nothing != 1", &[]),
            ("tags.nothing < 1", &[]),
            ("tags.nothing = undefined", &[]),
            ("tags.nothing NIN [1]", &[]),
            ("NOT tags.nothing = 1", &[]),
            ("tags.nothing = 1 OR deviceId = 'dev2'", &["dev2"]),
            ("tags.location = tags.location", &[]),
            ("tags.list = tags.list", &[]),
            // Case-insensitive roots and keywords, case-sensitive user keys.
            ("DEVICEID = 'dev1'", &["dev1"]),
            ("Tags.location.region = 'EU'", &["dev2"]),
            ("PROPERTIES.Reported.temp > 25", &["dev2"]),
            ("capabilities.IOTEDGE = true", &["dev2"]),
            ("ConnectionState = 'Disconnected'", &["dev2"]),
            ("lastactivitytime > '2024'", &["dev1"]),
            ("tags.mixed = 'upper'", &[]),
            ("tags.Mixed = 'upper'", &["dev1"]),
            ("tags.floor in [5] and not deviceid = 'x'", &["dev2"]),
            // Arithmetic.
            ("properties.reported.temp * 2 > 50", &["dev2"]),
            ("tags.floor + 1 = 3", &["dev1"]),
            ("tags.floor % 2 = 1", &["dev2"]),
            ("tags.floor / 0 = 1", &[]),
            ("NOT (tags.floor / 0 = 1)", &[]),
            ("(tags.floor - 1) * 2 = 2", &["dev1"]),
            ("tags.floor - 1 * 2 = 0", &["dev1"]),
            ("properties.desired.fanSpeed - 1 = 0", &["dev2"]),
            ("-tags.floor = -5", &["dev2"]),
            ("tags.floor = 10 / 2", &["dev2"]),
            ("tags.floor * 1.5 = 3", &["dev1"]),
            ("tags.floor - -3 = 5", &["dev1"]),
            ("tags.floor + 'a' = 2", &[]),
            // Booleans and bare expressions.
            ("properties.reported.online = true", &["dev1"]),
            ("properties.reported.online", &["dev1"]),
            ("properties.reported.online = 'true'", &[]),
            ("properties.reported.online != true", &["dev2"]),
            ("true", &["dev1", "dev2", "gateway-3", "dev4"]),
            ("false", &[]),
            ("tags.owner", &[]),
            // Escapes and bracket segments.
            ("tags.owner = '\\u0061lice'", &["dev1"]),
            ("tags.owner = \"al\\u0069ce\"", &["dev1"]),
            ("tags['location'].region = 'EU'", &["dev2"]),
            ("tags.list[1] = 2", &["dev1"]),
            (
                "tags.location.region IN ['US'] AND properties.reported.temp < 20",
                &["dev4"],
            ),
            (
                "status = 'enabled' AND connectionState = 'Connected'",
                &["dev1", "gateway-3", "dev4"],
            ),
        ];
        let twins = twins();
        for (condition, expected) in cases {
            let text = format!("SELECT * FROM devices WHERE {condition}");
            let query = Query::parse(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(matching(&query, &twins), *expected, "{text}");
        }
    }

    #[test]
    fn query_without_where_matches_everything() {
        let query = Query::parse("select * from devices").unwrap();
        assert_eq!(matching(&query, &twins()).len(), 4);
        assert!(query.is_select_star());
        assert!(!query.is_aggregate());
        assert_eq!(query.source(), Source::Devices);
        assert_eq!(query.top(), None);
        assert_eq!(query.project(&twins()[0]), twins()[0]);
    }

    #[test]
    fn query_string_escapes() {
        let twin = json!({"tags": {"s": "it's \"q\" \\ é 😀 /\n"}});
        let query = Query::parse(
            r#"SELECT * FROM devices WHERE tags.s = 'it\'s \"q\" \\ \u00e9 \ud83d\ude00 \/\n'"#,
        )
        .unwrap();
        assert!(query.matches(&twin));
    }

    #[test]
    fn query_parse_errors_name_the_position() {
        // (query, text at the error position or "" for the end, part of the message)
        let cases: &[(&str, &str, &str)] = &[
            (
                "SELECT * FROM devices WHERE STARTS_WITH(deviceId, 'a')",
                "STARTS_WITH",
                "STARTSWITH",
            ),
            (
                "SELECT * FROM devices WHERE ends_with(deviceId, 'a')",
                "ends_with",
                "ENDSWITH",
            ),
            (
                "SELECT STARTS_WITH(deviceId, 'a') FROM devices",
                "STARTS_WITH",
                "STARTSWITH",
            ),
            (
                "SELECT * FROM devices ORDER BY deviceId",
                "ORDER",
                "ORDER BY",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 'a' order by deviceId",
                "order",
                "ORDER BY",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 'a' garbage",
                "garbage",
                "after the end",
            ),
            ("SELECT * FROM devices alias", "alias", "after the end"),
            (
                "SELECT * FROM devices WHERE FOO(deviceId)",
                "FOO",
                "unknown function",
            ),
            (
                "SELECT LOWER(deviceId) FROM devices",
                "LOWER",
                "unknown function",
            ),
            (
                "SELECT IS_DEFINED(deviceId) FROM devices",
                "IS_DEFINED",
                "cannot be selected",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 'a",
                "'a",
                "unterminated",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = = 'a'",
                "= 'a'",
                "expected an expression",
            ),
            (
                "SELECT * FROM devices WHERE tags.a = 1 = 2",
                "= 2",
                "chained",
            ),
            ("SELECT * FROM devices WHERE", "", "expected an expression"),
            (
                "SELECT * FROM devices WHERE (tags.a = 1",
                "",
                "expected ')'",
            ),
            ("SELECT TOP -1 * FROM devices", "-1", "TOP"),
            ("SELECT TOP 1.5 * FROM devices", "1.5", "TOP"),
            ("SELECT FROM devices", "FROM", "expected '*'"),
            ("SELECT * devices", "devices", "expected FROM"),
            ("SELECT *", "", "expected FROM"),
            ("", "", "expected SELECT"),
            ("DELETE FROM devices", "DELETE", "expected SELECT"),
            (
                "SELECT * FROM devices WHERE COUNT() > 1",
                "COUNT",
                "only allowed in the SELECT",
            ),
            (
                "SELECT deviceId, COUNT() FROM devices",
                "deviceId",
                "aggregate",
            ),
            (
                "SELECT tags.x, COUNT() FROM devices GROUP BY tags.y",
                "tags.x",
                "GROUP BY path",
            ),
            ("SELECT * FROM devices GROUP BY tags.x", "GROUP", "SELECT *"),
            (
                "SELECT COUNT(deviceId) FROM devices",
                "deviceId",
                "no arguments",
            ),
            ("SELECT SUM() FROM devices", ")", "expected a path"),
            ("SELECT * FROM devices WHERE deviceId == 'a'", "==", "'='"),
            ("SELECT * FROM devices WHERE deviceId ! 'a'", "!", "NOT"),
            (
                "SELECT * FROM devices WHERE deviceId = 'a\\q'",
                "\\q",
                "escape",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = '\\u12'",
                "\\u12",
                "four hex digits",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = '\\ud800'",
                "\\ud800",
                "surrogate",
            ),
            (
                "SELECT * FROM devices WHERE tags.x IN []",
                "]",
                "expected a constant",
            ),
            (
                "SELECT * FROM devices WHERE tags.x IN [tags.y]",
                "tags.y",
                "expected a constant",
            ),
            ("SELECT * FROM devices WHERE tags.x IN 1", "1", "'['"),
            (
                "SELECT * FROM devices WHERE tags.x IN [1, 2",
                "",
                "expected ']'",
            ),
            (
                "SELECT * FROM devices WHERE IS_DEFINED(deviceId, tags)",
                "IS_DEFINED",
                "argument",
            ),
            (
                "SELECT * FROM devices WHERE STARTSWITH(deviceId)",
                "STARTSWITH",
                "argument",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 5abc",
                "5abc",
                "invalid number",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 0x",
                "0x",
                "hex digits",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 0x10000000000000000",
                "0x1",
                "64 bits",
            ),
            (
                "SELECT * FROM devices WHERE deviceId = 1e999",
                "1e999",
                "out of range",
            ),
            (
                "SELECT * FROM devices WHERE tags.x = 1 #",
                "#",
                "unexpected character",
            ),
            (
                "SELECT * FROM devices WHERE tags. = 1",
                "= 1",
                "property name",
            ),
            (
                "SELECT * FROM devices WHERE tags[x] = 1",
                "x]",
                "quoted key",
            ),
            (
                "SELECT * FROM devices WHERE AND = 1",
                "AND",
                "expected an expression",
            ),
            (
                "SELECT deviceId AS FROM FROM devices",
                "FROM FROM",
                "name after AS",
            ),
            ("SELECT * FROM devices.", "", "name after '.'"),
            ("SELECT * FROM 'devices'", "'devices'", "devices"),
        ];
        for (text, at, message) in cases {
            let expected_position = if at.is_empty() {
                text.chars().count()
            } else {
                text.find(at).unwrap()
            };
            match Query::parse(text) {
                Err(QueryError::Syntax {
                    position,
                    message: m,
                }) => {
                    assert_eq!(position, expected_position, "{text}: {m}");
                    assert!(m.contains(message), "{text}: {m:?} lacks {message:?}");
                }
                other => panic!("{text}: expected a syntax error, got {other:?}"),
            }
        }
    }

    #[test]
    fn query_positions_count_characters() {
        let text = "SELECT * FROM devices WHERE tags.é = 'ü' #";
        let err = Query::parse(text).unwrap_err();
        let expected = text.chars().position(|c| c == '#').unwrap();
        assert!(matches!(err, QueryError::Syntax { position, .. } if position == expected));
    }

    #[test]
    fn query_sources() {
        let q = Query::parse("SELECT * FROM devices.modules WHERE moduleId = 'm1'").unwrap();
        assert_eq!(q.source(), Source::DeviceModules);
        assert!(q.matches(&json!({"deviceId": "d", "moduleId": "m1"})));
        assert!(!q.matches(&json!({"deviceId": "d", "moduleId": "m2"})));
        assert_eq!(
            Query::parse("select * from DEVICES").unwrap().source(),
            Source::Devices
        );
        assert_eq!(
            Query::parse("SELECT * FROM devices.jobs"),
            Err(QueryError::UnsupportedSource("devices.jobs".into()))
        );
        assert_eq!(
            Query::parse("SELECT * FROM foo WHERE x = 1"),
            Err(QueryError::UnsupportedSource("foo".into()))
        );
    }

    #[test]
    fn query_top() {
        assert_eq!(
            Query::parse("SELECT TOP 3 * FROM devices").unwrap().top(),
            Some(3)
        );
        assert_eq!(
            Query::parse("select top 0 deviceId from devices")
                .unwrap()
                .top(),
            Some(0)
        );
        assert_eq!(
            Query::parse("SELECT TOP 0x10 COUNT() FROM devices")
                .unwrap()
                .top(),
            Some(16)
        );
        assert_eq!(
            Query::parse("SELECT deviceId FROM devices").unwrap().top(),
            None
        );
    }

    #[test]
    fn query_projection_uses_aliases_and_canonical_names() {
        let query = Query::parse(
            "SELECT DeviceId, LastActivityTime, tags.location.region AS region, \
             properties.reported.temp, capabilities.IoTEdge, statusReason, tags.list[0] \
             FROM devices",
        )
        .unwrap();
        assert!(!query.is_select_star());
        assert!(!query.is_aggregate());
        let twins = twins();
        assert_eq!(
            query.project(&twins[0]),
            json!({"deviceId": "dev1", "lastActivityTime": "2024-05-01T10:00:03.1234567Z",
                   "region": "US", "temp": 21, "iotEdge": false, "statusReason": null, "$1": 1})
        );
        // Undefined paths are omitted.
        assert_eq!(
            query.project(&twins[3]),
            json!({"deviceId": "dev4", "region": "US", "temp": 15})
        );
        // Objects project whole.
        let query = Query::parse("SELECT tags.location AS loc FROM devices").unwrap();
        assert_eq!(query.project(&twins[1]), json!({"loc": {"region": "EU"}}));
        // A non-aggregate query "aggregates" to its projections.
        assert_eq!(
            query.aggregate(&twins),
            vec![
                json!({"loc": {"region": "US"}}),
                json!({"loc": {"region": "EU"}}),
                json!({}),
                json!({"loc": {"region": "US"}})
            ]
        );
    }

    #[test]
    fn query_count_without_group_by() {
        let twins = twins();
        let query = Query::parse("SELECT COUNT() AS n FROM devices").unwrap();
        assert!(query.is_aggregate());
        assert!(!query.is_select_star());
        assert_eq!(query.aggregate(&twins), vec![json!({"n": 4})]);
        assert_eq!(query.aggregate(&[]), vec![json!({"n": 0})]);
        let query = Query::parse("SELECT COUNT() FROM devices WHERE tags.floor = 2").unwrap();
        let matched: Vec<&Value> = twins.iter().filter(|t| query.matches(t)).collect();
        assert_eq!(query.aggregate(matched), vec![json!({"$1": 1})]);
    }

    #[test]
    fn query_aggregate_functions() {
        let twins = twins();
        let query = Query::parse(
            "SELECT SUM(tags.floor) AS s, AVG(properties.reported.temp) AS a, \
             MIN(properties.reported.temp) AS lo, MAX(properties.reported.temp) AS hi, \
             MAX(deviceId) AS last, MIN(deviceId), AVG(tags.nothing) AS none, \
             SUM(tags.nothing) AS zero, MIN(tags.nothing) AS nothing FROM devices",
        )
        .unwrap();
        let rows = query.aggregate(&twins);
        assert_eq!(rows.len(), 1);
        let row = &rows[0];
        assert_eq!(row["s"], json!(7)); // "2" is a string: skipped
        assert!((row["a"].as_f64().unwrap() - (21.0 + 30.5 + 15.0) / 3.0).abs() < 1e-9);
        assert_eq!(row["lo"], json!(15));
        assert_eq!(row["hi"], json!("hot")); // strings order after numbers
        assert_eq!(row["last"], json!("gateway-3"));
        assert_eq!(row["$1"], json!("dev1"));
        assert_eq!(row["zero"], json!(0));
        assert!(row.get("none").is_none());
        assert!(row.get("nothing").is_none());
        let floats = [json!({"v": 1.5}), json!({"v": 2}), json!({"v": u64::MAX})];
        let query = Query::parse("SELECT SUM(v) AS s, MAX(v) AS m FROM devices").unwrap();
        let rows = query.aggregate(&floats);
        assert_eq!(rows[0]["m"], json!(u64::MAX));
        assert!(rows[0]["s"].as_f64().unwrap() > 1.8e19);
    }

    #[test]
    fn query_group_by_spec_example() {
        let mut twins = twins();
        twins.push(json!({"deviceId": "bare", "properties": {"reported": {}}}));
        let query = Query::parse(
            "SELECT properties.reported.telemetryConfig.status AS status, \
             COUNT() AS numberOfDevices FROM devices \
             GROUP BY properties.reported.telemetryConfig.status",
        )
        .unwrap();
        assert!(query.is_aggregate());
        assert_eq!(
            query.aggregate(&twins),
            vec![
                json!({"numberOfDevices": 3, "status": "Success"}),
                json!({"numberOfDevices": 1, "status": "Pending"}),
                json!({"numberOfDevices": 1}),
            ]
        );
        assert!(query.aggregate(&[]).is_empty());
    }

    #[test]
    fn query_group_by_numbers_and_case() {
        let twins = [
            json!({"tags": {"floor": 2}, "version": 1}),
            json!({"tags": {"floor": 2.0}, "version": 2}),
            json!({"tags": {"floor": "2"}, "version": 3}),
            json!({"tags": {"floor": {"a": 1, "b": [1, "x"]}}, "version": 4}),
            json!({"tags": {"floor": {"b": [1, "x"], "a": 1}}, "version": 5}),
        ];
        let query = Query::parse(
            "select Tags.floor, count() as n, sum(VERSION) as v from devices group by tags.floor",
        )
        .unwrap();
        assert_eq!(
            query.aggregate(&twins),
            vec![
                json!({"floor": 2, "n": 2, "v": 3}),
                json!({"floor": "2", "n": 1, "v": 3}),
                json!({"floor": {"a": 1, "b": [1, "x"]}, "n": 2, "v": 9}),
            ]
        );
        // GROUP BY alone lists the distinct values.
        let query = Query::parse("SELECT tags.floor FROM devices GROUP BY tags.floor").unwrap();
        assert!(query.is_aggregate());
        assert_eq!(query.aggregate(&twins).len(), 3);
    }

    #[test]
    fn query_nesting_is_bounded() {
        let twins = twins();
        // WHERE itself is one level, so 63 parentheses are the most that fit.
        let ok = format!(
            "SELECT * FROM devices WHERE {}tags.floor = 2{}",
            "(".repeat(MAX_DEPTH - 1),
            ")".repeat(MAX_DEPTH - 1)
        );
        let query = Query::parse(&ok).unwrap();
        assert_eq!(matching(&query, &twins), ["dev1"]);
        let too_deep = format!(
            "SELECT * FROM devices WHERE {}tags.floor = 2{}",
            "(".repeat(MAX_DEPTH),
            ")".repeat(MAX_DEPTH)
        );
        assert!(matches!(
            Query::parse(&too_deep),
            Err(QueryError::TooDeep { .. })
        ));
        for deep in [
            format!("SELECT * FROM devices WHERE {}", "(".repeat(8000)),
            format!("SELECT * FROM devices WHERE {}true", "NOT ".repeat(2000)),
            format!("SELECT * FROM devices WHERE {}1 = 1", "-".repeat(8000)),
            format!("SELECT * FROM devices WHERE {}", "IS_NULL(".repeat(1000)),
        ] {
            assert!(
                matches!(Query::parse(&deep), Err(QueryError::TooDeep { .. })),
                "{}",
                &deep[..40]
            );
        }
        // Long flat chains are not nesting.
        let chain = format!(
            "SELECT * FROM devices WHERE tags.floor{} = 1502",
            " + 1".repeat(1500)
        );
        assert_eq!(matching(&Query::parse(&chain).unwrap(), &twins), ["dev1"]);
        let ors = format!(
            "SELECT * FROM devices WHERE {}deviceId = 'dev2'",
            "deviceId = 'x' OR ".repeat(400)
        );
        assert_eq!(matching(&Query::parse(&ors).unwrap(), &twins), ["dev2"]);
    }

    #[test]
    fn query_max_nesting_fits_a_small_stack() {
        // Parsing, evaluating and dropping the deepest accepted query on a 512 KiB stack.
        let text = format!(
            "SELECT * FROM devices WHERE NOT {}-(NOT IS_NULL(tags.floor) AND tags.floor IN [2]){}",
            "(NOT ".repeat(MAX_DEPTH / 2 - 3),
            ")".repeat(MAX_DEPTH / 2 - 3)
        );
        let handle = std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(move || {
                // One level more is too deep: this is the limit exactly.
                let deeper = text.replacen("NOT ", "NOT NOT ", 1);
                assert!(matches!(
                    Query::parse(&deeper),
                    Err(QueryError::TooDeep { .. })
                ));
                let query = Query::parse(&text).unwrap();
                twins().iter().filter(|t| query.matches(t)).count()
            })
            .unwrap();
        assert_eq!(handle.join().unwrap(), 0);
    }

    #[test]
    fn query_length_is_bounded() {
        let prefix = "SELECT * FROM devices WHERE tags.s = '";
        let fill = MAX_QUERY_LEN - prefix.len() - 1;
        // Exactly the limit, in characters, even though it is longer in bytes.
        let at_limit = format!("{prefix}{}'", "é".repeat(fill));
        assert_eq!(at_limit.chars().count(), MAX_QUERY_LEN);
        assert!(Query::parse(&at_limit).is_ok());
        let over = format!("{prefix}{}'", "a".repeat(fill + 1));
        assert_eq!(
            Query::parse(&over),
            Err(QueryError::TooLong {
                len: MAX_QUERY_LEN + 1
            })
        );
        let huge = "x".repeat(1 << 20);
        assert_eq!(
            Query::parse(&huge),
            Err(QueryError::TooLong { len: 1 << 20 })
        );
    }

    #[test]
    fn query_errors_display() {
        assert_eq!(
            QueryError::TooLong { len: 9000 }.to_string(),
            "query is 9000 characters long; the limit is 8192"
        );
        assert_eq!(
            QueryError::TooDeep { position: 3 }.to_string(),
            "query nests deeper than 64 levels (at position 3)"
        );
    }

    const VALID: &[&str] = &[
        "SELECT * FROM devices WHERE tags.location.region = 'US' AND (properties.reported.temp \
         > 20.5 OR NOT IS_DEFINED(tags.floor)) AND deviceId NIN ['a', \"b\\u0041\"]",
        "SELECT TOP 10 deviceId AS id, COUNT() AS n FROM devices.modules WHERE \
         STARTSWITH(deviceId, 'dev') AND tags['site'].building = 'B1' GROUP BY deviceId",
        "select properties.reported.telemetryConfig.status as status, count() as numberOfDevices \
         from devices group by properties.reported.telemetryConfig.status",
        "SELECT AVG(tags.floor), MIN(x), MAX(y), SUM(z) FROM devices WHERE -tags.floor * 0x1F \
         % 3 <= 1e3 - (2 / tags.x) AND tags.list[1] NOT IN [-1, null, true, undefined]",
    ];

    fn exercise(text: &str, twins: &[Value]) {
        if let Ok(query) = Query::parse(text) {
            let matched: Vec<&Value> = twins.iter().filter(|t| query.matches(t)).collect();
            for twin in &matched {
                let _ = query.project(twin);
            }
            let _ = query.aggregate(matched);
        }
    }

    #[test]
    fn query_every_prefix_parses_or_fails_cleanly() {
        let twins = twins();
        for text in VALID {
            assert!(Query::parse(text).is_ok(), "{text}");
            for (i, _) in text.char_indices() {
                exercise(&text[..i], &twins);
            }
        }
    }

    #[test]
    fn query_mutations_never_panic() {
        let twins = twins();
        let alphabet: Vec<char> = "()[]'\"\\,.=<>!+-*/%0123456789xeE $_aNOTINAND OR u\u{e9}"
            .chars()
            .collect();
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move |bound: usize| {
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            usize::try_from(state >> 33).unwrap() % bound.max(1)
        };
        for round in 0..20_000 {
            let mut chars: Vec<char> = VALID[round % VALID.len()].chars().collect();
            for _ in 0..1 + next(4) {
                let at = next(chars.len() + 1);
                let c = alphabet[next(alphabet.len())];
                match next(3) {
                    0 if at < chars.len() => chars[at] = c,
                    1 if at < chars.len() => {
                        chars.remove(at);
                    }
                    _ => chars.insert(at, c),
                }
            }
            let text: String = chars.into_iter().collect();
            exercise(&text, &twins);
        }
    }

    #[test]
    fn query_parse_is_deterministic() {
        for text in VALID {
            assert_eq!(Query::parse(text).unwrap(), Query::parse(text).unwrap());
        }
    }
}
