//! The syntax tree of a parsed query, and the number model its constants and arithmetic share.
//!
//! Chains of `AND`, `OR` and arithmetic are flat lists (`Expr::And`, `Expr::Arith`), not nested
//! trees, so evaluating or dropping a parsed query stays shallow.

use std::cmp::Ordering;
use std::fmt;

use serde_json::{Number, Value};

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Select {
    Star,
    Items(Vec<SelectItem>),
}

#[derive(Debug, Clone, PartialEq)]
pub(super) struct SelectItem {
    pub(super) kind: ItemKind,
    /// The output key: alias, last path segment or `$n`.
    pub(super) name: String,
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum ItemKind {
    Path(Path),
    Count,
    Agg(AggFn, Path),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum AggFn {
    Avg,
    Sum,
    Min,
    Max,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Segment {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Path {
    pub(super) segments: Vec<Segment>,
}

impl Path {
    pub(super) fn lookup<'v>(&self, twin: &'v Value) -> Option<&'v Value> {
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

    pub(super) fn last_key(&self) -> Option<&str> {
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
pub(super) enum Num {
    Int(i128),
    Float(f64),
}

impl Num {
    pub(super) fn from_json(n: &Number) -> Option<Num> {
        if let Some(i) = n.as_i64() {
            Some(Num::Int(i128::from(i)))
        } else if let Some(u) = n.as_u64() {
            Some(Num::Int(i128::from(u)))
        } else {
            n.as_f64().filter(|f| f.is_finite()).map(Num::Float)
        }
    }

    pub(super) fn to_json(self) -> Option<Value> {
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

    pub(super) fn as_f64(self) -> f64 {
        match self {
            Num::Int(i) => i as f64,
            Num::Float(f) => f,
        }
    }

    pub(super) fn neg(self) -> Num {
        match self {
            Num::Int(i) => i.checked_neg().map_or(Num::Float(-(i as f64)), Num::Int),
            Num::Float(f) => Num::Float(-f),
        }
    }

    pub(super) fn compare(self, other: Num) -> Option<Ordering> {
        match (self, other) {
            (Num::Int(a), Num::Int(b)) => Some(a.cmp(&b)),
            (a, b) => a.as_f64().partial_cmp(&b.as_f64()),
        }
    }

    /// `None` means undefined: division by zero or a non-finite result.
    pub(super) fn arith(self, op: ArithOp, other: Num) -> Option<Num> {
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
pub(super) enum Const {
    Undefined,
    Null,
    Bool(bool),
    Num(Num),
    Str(String),
}

impl Const {
    pub(super) fn keyword(name: &str) -> Option<Const> {
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum CmpOp {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl CmpOp {
    pub(super) fn symbol(self) -> &'static str {
        match self {
            CmpOp::Eq => "=",
            CmpOp::Ne => "!=",
            CmpOp::Lt => "<",
            CmpOp::Le => "<=",
            CmpOp::Gt => ">",
            CmpOp::Ge => ">=",
        }
    }

    pub(super) fn holds(self, ordering: Ordering) -> bool {
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
pub(super) enum ArithOp {
    Add,
    Sub,
    Mul,
    Div,
    Rem,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Func {
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

    pub(super) fn from_name(name: &str) -> Option<Func> {
        Func::ALL
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, f)| *f)
    }

    pub(super) fn name(self) -> &'static str {
        Func::ALL
            .iter()
            .find(|(_, f)| *f == self)
            .map_or("?", |(n, _)| n)
    }

    pub(super) fn arity(self) -> usize {
        match self {
            Func::StartsWith | Func::EndsWith | Func::Contains => 2,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Expr {
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
