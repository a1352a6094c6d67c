//! Entity tags: generation and the comparison form.
//!
//! **Invariant:** a stored etag is always `"` + a bare tag + `"` (quotes included, as Azure sends
//! them). A caller's `If-Match` value is reduced to the bare tag and re-quoted, so the database
//! compares with a plain `etag = ?`.

/// The `If-Match` value that means "any version, but it must exist".
pub(crate) const ANY: &str = "*";

/// A fresh etag for a write: a quoted random (version 4) UUID. Its bits come from the thread's
/// generator (ChaCha, seeded from the OS), not from a `getrandom` system call per write as
/// `Uuid::new_v4` does: a batch of writes would otherwise spend more in the kernel than in
/// SQLite.
pub(crate) fn fresh() -> String {
    let uuid = uuid::Builder::from_random_bytes(rand::random()).into_uuid();
    format!("\"{uuid}\"")
}

/// Reduces `abc`, `"abc"`, `W/"abc"` (with surrounding whitespace) to `abc`.
pub(crate) fn bare(tag: &str) -> &str {
    let tag = tag.trim();
    let tag = tag.strip_prefix("W/").unwrap_or(tag);
    tag.strip_prefix('"')
        .and_then(|t| t.strip_suffix('"'))
        .unwrap_or(tag)
}

/// The form stored in the database for a caller-supplied tag.
pub(crate) fn stored_form(tag: &str) -> String {
    format!("\"{}\"", bare(tag))
}

/// True for `*` (after trimming): match any existing version.
/// `*`, also quoted: the Azure service SDKs send `If-Match: "*"` when the caller gives no etag.
pub(crate) fn is_any(tag: &str) -> bool {
    bare(tag) == ANY
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bare_strips_quotes_weak_prefix_and_whitespace() {
        for input in ["abc", "\"abc\"", "W/\"abc\"", "  \"abc\" ", " W/abc"] {
            assert_eq!(bare(input), "abc", "{input:?}");
        }
        // Unbalanced or empty inputs never panic and are compared as they are.
        assert_eq!(bare("\"abc"), "\"abc");
        assert_eq!(bare("\""), "\"");
        assert_eq!(bare(""), "");
        assert_eq!(bare("\"\""), "");
        assert_eq!(bare("W/"), "");
    }

    #[test]
    fn star_matches_quoted_or_not() {
        for any in ["*", " * ", "\"*\"", "W/\"*\""] {
            assert!(is_any(any), "{any:?}");
        }
        assert!(!is_any("\"abc\""));
    }

    #[test]
    fn fresh_tags_are_quoted_and_distinct() {
        let a = fresh();
        let b = fresh();
        assert_ne!(a, b);
        assert!(a.starts_with('"') && a.ends_with('"'), "{a}");
        assert_eq!(stored_form(&a), a);
        assert_eq!(stored_form(&format!("W/{a}")), a);
        assert_eq!(stored_form(bare(&a)), a);
    }

    #[test]
    fn star_means_any() {
        assert!(is_any("*"));
        assert!(is_any(" * "));
        assert!(!is_any("*x"));
    }
}
