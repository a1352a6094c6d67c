//! The tokenizer: query text (as characters, so positions count characters) to tokens. Names,
//! strings with JSON escapes, decimal and hex numbers, punctuation; keywords are recognised by
//! the parser.

use super::QueryError;
use super::ast::{CmpOp, Num};
use super::syntax;

#[derive(Debug, Clone, PartialEq)]
pub(super) enum Tok {
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

pub(super) static EOF: Tok = Tok::Eof;

pub(super) fn describe(tok: &Tok) -> String {
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
pub(super) struct Token {
    pub(super) tok: Tok,
    /// 0-based character offset of the token's first character.
    pub(super) pos: usize,
}

fn is_ident_start(c: char) -> bool {
    c.is_alphabetic() || c == '_' || c == '$'
}

fn is_ident_continue(c: char) -> bool {
    c.is_alphanumeric() || c == '_' || c == '$'
}

pub(super) fn tokenize(chars: &[char]) -> Result<Vec<Token>, QueryError> {
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
