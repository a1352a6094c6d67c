//! The query language through its public API: parse, filter, project, aggregate, bounds.

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
