//! MQTT 3.1.1 topic names and filters (section 4.7): validity and matching.

/// A topic name a client may publish to: non-empty, no wildcards, no NUL.
pub(crate) fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter a client may subscribe to: non-empty, no NUL, `#` only as the whole last
/// level, `+` only as a whole level.
pub(crate) fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        let last = levels.peek().is_none();
        match level {
            "#" if last => {}
            "+" => {}
            _ if level.contains(['+', '#']) => return false,
            _ => {}
        }
    }
    true
}

/// Whether `filter` matches the topic name `topic`.
///
/// `+` matches exactly one level (possibly empty), `#` the parent level and any number of
/// levels below it. A filter starting with a wildcard never matches a topic starting with `$`
/// (`#` does not match `$iothub/…`; `$iothub/#` does).
pub(crate) fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && filter.starts_with(['+', '#']) {
        return false;
    }
    let mut filter_levels = filter.split('/');
    let mut topic_levels = topic.split('/');
    loop {
        match (filter_levels.next(), topic_levels.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(f), Some(t)) if f == t => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters() {
        for good in [
            "#",
            "+",
            "a/#",
            "a/+/c",
            "+/+",
            "/",
            "$iothub/twin/res/#",
            "é/ü",
        ] {
            assert!(valid_filter(good), "{good}");
        }
        for bad in ["", "a/#/b", "a#", "a/b#", "a+/b", "#/a", "a\0b"] {
            assert!(!valid_filter(bad), "{bad:?}");
        }
    }

    #[test]
    fn topics() {
        assert!(valid_topic("devices/d1/messages/events/"));
        assert!(valid_topic("$iothub/twin/GET/?$rid=1"));
        for bad in ["", "a/+", "a/#", "x\0"] {
            assert!(!valid_topic(bad), "{bad:?}");
        }
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/b", "a/c", false),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/+", "a/", true),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("a/#", "ab", false),
            ("#", "a/b", true),
            ("#", "$iothub/x", false),
            ("+/x", "$sys/x", false),
            ("$iothub/#", "$iothub/twin/res/200/?$rid=1", true),
            ("$iothub/+/res/#", "$iothub/twin/res/200", true),
            ("+/+", "/finance", true),
            ("a/b/c", "a/b", false),
            ("é/+", "é/ü", true),
        ];
        for (filter, topic, expected) in cases {
            assert_eq!(matches(filter, topic), expected, "{filter} vs {topic}");
        }
    }
}
