//! `--output table`: the API's JSON as a table for people. A list is one row per item with the
//! columns its verb names (or, for verbs that name none, the item's first plain fields); one
//! item is a two-column table of its fields, nested ones as dotted paths.

use comfy_table::{ContentArrangement, Table, presets::UTF8_FULL_CONDENSED};
use serde_json::Value;

/// A column: its header and where its value is, as JSON pointers tried in order (an
/// enrollment's id is `/registrationId` or `/enrollmentGroupId`).
pub struct Column {
    pub header: &'static str,
    pub pointers: &'static [&'static str],
}

/// Longest cell; longer values are cut with `…` (`--output json` has them whole).
const MAX_CELL: usize = 64;
/// Columns chosen for a list whose verb names none.
const DEFAULT_COLUMNS: usize = 6;

fn cell(value: &Value) -> String {
    let text = match value {
        Value::Null => String::new(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    // One line per cell, whatever the value holds.
    let text: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match text.char_indices().nth(MAX_CELL) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text,
    }
}

fn new_table(headers: Vec<String>) -> Table {
    let mut table = Table::new();
    table
        .load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers);
    table
}

/// Rows of `items` under `columns`; with no columns, the first plain fields of the first item.
pub fn list(items: &[Value], columns: &[Column]) -> String {
    if columns.is_empty() {
        let keys: Vec<String> = items
            .first()
            .and_then(Value::as_object)
            .map(|first| {
                first
                    .iter()
                    .filter(|(_, v)| !v.is_object() && !v.is_array())
                    .map(|(k, _)| k.clone())
                    .take(DEFAULT_COLUMNS)
                    .collect()
            })
            .unwrap_or_default();
        let mut table = new_table(keys.clone());
        for item in items {
            table.add_row(keys.iter().map(|k| cell(&item[k.as_str()])));
        }
        return format!("{table}\n{} item(s)", items.len());
    }
    let mut table = new_table(columns.iter().map(|c| c.header.to_string()).collect());
    for item in items {
        table.add_row(columns.iter().map(|column| {
            column
                .pointers
                .iter()
                .find_map(|p| item.pointer(p).filter(|v| !v.is_null()))
                .map(cell)
                .unwrap_or_default()
        }));
    }
    format!("{table}\n{} item(s)", items.len())
}

/// The fields of one item, nested ones as dotted paths (`attestation.type`).
pub fn item(value: &Value) -> String {
    fn walk(prefix: &str, value: &Value, rows: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (key, inner) in map {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    walk(&path, inner, rows);
                }
            }
            other => rows.push((prefix.to_string(), cell(other))),
        }
    }
    let mut rows = Vec::new();
    walk("", value, &mut rows);
    let mut table = new_table(vec!["FIELD".into(), "VALUE".into()]);
    for (field, value) in rows {
        table.add_row(vec![field, value]);
    }
    table.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lists_take_the_first_pointer_that_has_a_value() {
        let items = [
            json!({"registrationId": "dev-1", "attestation": {"type": "tpm"}}),
            json!({"enrollmentGroupId": "fleet", "attestation": {"type": "x509"}}),
        ];
        let columns = [
            Column {
                header: "ID",
                pointers: &["/registrationId", "/enrollmentGroupId"],
            },
            Column {
                header: "ATTESTATION",
                pointers: &["/attestation/type"],
            },
        ];
        let text = list(&items, &columns);
        for expected in [
            "ID",
            "ATTESTATION",
            "dev-1",
            "tpm",
            "fleet",
            "x509",
            "2 item(s)",
        ] {
            assert!(text.contains(expected), "{expected} in\n{text}");
        }
    }

    #[test]
    fn cells_are_one_line_and_bounded() {
        let long = "x".repeat(200);
        let text = item(&json!({"a": {"b": "line\nbreak"}, "long": long, "n": 3}));
        assert!(
            text.contains("a.b") && text.contains("line break"),
            "{text}"
        );
        assert!(
            text.contains(&format!("{}…", "x".repeat(MAX_CELL))),
            "{text}"
        );
        assert!(!text.contains(&"x".repeat(MAX_CELL + 1)));
    }

    #[test]
    fn lists_without_columns_show_plain_fields() {
        let text = list(&[json!({"name": "root", "nested": {"x": 1}, "n": 2})], &[]);
        assert!(text.contains("name") && text.contains("root") && !text.contains("nested"));
    }
}
