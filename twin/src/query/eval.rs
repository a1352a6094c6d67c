//! Evaluation of conditions over one twin, with three-valued logic: a missing property is
//! undefined, and WHERE keeps a twin only when its condition is exactly `true` (module docs of
//! `query`).

use std::cmp::Ordering;

use serde_json::Value;

use super::ast::{Const, Expr, Func, Num};

/// A value during evaluation. Objects and arrays are opaque: no operator looks inside them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Val<'a> {
    Undefined,
    Null,
    Bool(bool),
    Num(Num),
    Str(&'a str),
    Object,
    Array,
}

impl<'a> Val<'a> {
    pub(super) fn from_json(value: &'a Value) -> Val<'a> {
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

impl Const {
    pub(super) fn val(&self) -> Val<'_> {
        match self {
            Const::Undefined => Val::Undefined,
            Const::Null => Val::Null,
            Const::Bool(b) => Val::Bool(*b),
            Const::Num(n) => Val::Num(*n),
            Const::Str(s) => Val::Str(s),
        }
    }
}

impl Expr {
    /// Evaluates the expression against one twin (service-view JSON).
    pub(super) fn eval<'a>(&'a self, twin: &'a Value) -> Val<'a> {
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
