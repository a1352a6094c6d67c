//! Aggregation: COUNT, SUM, AVG, MIN and MAX over the matching twins, with or without GROUP BY.

use std::cmp::Ordering;
use std::collections::HashMap;

use serde_json::{Map, Number, Value};

use super::ast::{AggFn, ArithOp, ItemKind, Num, Path, SelectItem};
use super::eval::Val;

/// The rows of an aggregate SELECT over `twins` (already filtered): one row without GROUP BY,
/// else one per group in order of each group's first twin.
pub(super) fn rows<'a>(
    items: &[SelectItem],
    group_by: Option<&Path>,
    twins: impl IntoIterator<Item = &'a Value>,
) -> Vec<Value> {
    let mut groups: Vec<Group> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    if group_by.is_none() {
        groups.push(Group::new(None, items));
    }
    for twin in twins {
        let slot = match group_by {
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
