//! The recursive-descent parser: tokens to a [`Query`]. Every level that can recurse goes
//! through `Parser::nested`, which bounds the depth at [`MAX_DEPTH`].

use super::ast::{
    AggFn, ArithOp, Const, Expr, Func, ItemKind, Num, Path, Segment, Select, SelectItem,
};
use super::lexer::{EOF, Tok, Token, describe, tokenize};
use super::{MAX_DEPTH, Query, QueryError, Source, syntax};

/// Parses query text already checked against [`super::MAX_QUERY_LEN`].
pub(super) fn parse(text: &str) -> Result<Query, QueryError> {
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
