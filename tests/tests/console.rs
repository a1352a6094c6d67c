//! The web console's session through HTTPS, on SQLite and PostgreSQL: the page and its
//! headers, sign-in errors, the sealed cookie standing in for `Authorization`, CSRF, adding a
//! hub credential, and sessions that end when their credential does. The pages themselves are
//! driven in Chromium by tests/python/test_console.py.

use reqwest::Method;
use reqwest::blocking::RequestBuilder;
use serde_json::{Value, json};
use zerotouch_tests::{TestServer, each_backend, error_code, send};

/// A request to `path` (no api-version added) carrying the console cookie, if any.
fn console(s: &TestServer, method: Method, path: &str, cookie: Option<&str>) -> RequestBuilder {
    let url = format!("https://localhost:{}{path}", s.https_port());
    let request = s.client.request(method, url);
    match cookie {
        Some(value) => request.header("Cookie", format!("zerotouch_console={value}")),
        None => request,
    }
}

/// Signs in (or adds a credential): the answer and the new cookie value.
fn sign_in(
    s: &TestServer,
    credential: &str,
    session: Option<(&str, &str)>,
) -> (u16, Value, Option<String>) {
    let mut request = console(s, Method::POST, "/console/session", session.map(|(c, _)| c))
        .json(&json!({ "credential": credential }));
    if let Some((_, csrf)) = session {
        request = request.header("X-CSRF-Token", csrf);
    }
    let (status, body, headers) = send(request);
    let cookie = headers
        .get_all("set-cookie")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find_map(|v| v.strip_prefix("zerotouch_console="))
        .map(|v| v.split(';').next().unwrap_or_default().to_string());
    (status, body, cookie)
}

#[test]
fn the_page_is_served_with_a_strict_policy() {
    let s = TestServer::start(zerotouch_tests::Backend::Sqlite);
    let response = console(&s, Method::GET, "/console", None).send().unwrap();
    assert_eq!(response.status(), 200);
    let csp = response.headers()["content-security-policy"]
        .to_str()
        .unwrap();
    assert!(
        csp.contains("default-src 'self'") && csp.contains("script-src 'self'"),
        "{csp}"
    );
    assert_eq!(response.headers()["x-frame-options"], "DENY");
    assert!(response.text().unwrap().contains("/console/assets/app.js"));
    let (status, _, _) = send(console(&s, Method::GET, "/console/assets/app.js", None));
    assert_eq!(status, 200);
    let (status, err, _) = send(console(&s, Method::GET, "/console/assets/secret.txt", None));
    assert_eq!(status, 404, "{err}");
    let client = reqwest::blocking::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let root = client
        .get(format!("https://localhost:{}/", s.https_port()))
        .send()
        .unwrap();
    assert_eq!(root.status(), 302);
    assert_eq!(root.headers()["location"], "/console");
}

#[test]
fn sign_in_refusals_have_typed_codes() {
    each_backend(|s| {
        let (status, err, _) = send(
            console(s, Method::POST, "/console/session", None)
                .header("Content-Type", "application/json")
                .body("{not json"),
        );
        assert_eq!((status, error_code(&err)), (400, 400_000), "{err}");
        for garbage in ["", "hello", "HostName=x;SharedAccessKey=abc"] {
            let (status, err, cookie) = sign_in(s, garbage, None);
            assert_eq!(
                (status, error_code(&err)),
                (400, 400_007),
                "{garbage:?}: {err}"
            );
            assert_eq!(cookie, None);
        }
        let wrong =
            "HostName=x;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=d3Jvbmc=";
        let (status, err, _) = sign_in(s, wrong, None);
        assert_eq!((status, error_code(&err)), (401, 401_002), "{err}");
        let unknown = "HostName=x;SharedAccessKeyName=nobody;SharedAccessKey=d3Jvbmc=";
        let (status, err, _) = sign_in(s, unknown, None);
        assert_eq!((status, error_code(&err)), (401, 401_002), "{err}");
        let (status, err, _) = sign_in(s, "a.b.c", None);
        assert_eq!(status, 401, "a token that is not ours: {err}");
        // No session: the console endpoints and the APIs answer 401.
        for path in ["/console/session", "/console/rates", "/console/pki"] {
            let (status, err, _) = send(console(s, Method::GET, path, None));
            assert_eq!((status, error_code(&err)), (401, 401_000), "{path}: {err}");
        }
    });
}

#[test]
fn the_cookie_stands_in_for_the_credential_with_csrf_on_changes() {
    each_backend(|s| {
        let (status, me, cookie) = sign_in(s, &s.owner_connection_string(), None);
        assert_eq!(status, 200, "{me}");
        let cookie = cookie.expect("a session cookie");
        assert!(!cookie.contains(&s.owner_connection_string()[40..60]));
        assert_eq!(me["principal"], "console:policy:provisioningserviceowner");
        let csrf = me["csrfToken"].as_str().unwrap().to_string();
        assert!(
            me["rights"]
                .as_array()
                .unwrap()
                .contains(&json!("EnrollmentWrite"))
        );

        let (status, again, _) = send(console(s, Method::GET, "/console/session", Some(&cookie)));
        assert_eq!((status, &again["csrfToken"]), (200, &me["csrfToken"]));

        // Reads need only the cookie; changes need the CSRF token as well.
        let path = "/enrollments/console-dev?api-version=2021-10-01";
        let body =
            json!({"registrationId": "console-dev", "attestation": {"type": "symmetricKey"}});
        let (status, err, _) = send(console(s, Method::PUT, path, Some(&cookie)).json(&body));
        assert_eq!((status, error_code(&err)), (403, 403_003), "{err}");
        let (status, err, _) = send(
            console(s, Method::PUT, path, Some(&cookie))
                .header("X-CSRF-Token", "not-the-token")
                .json(&body),
        );
        assert_eq!((status, error_code(&err)), (403, 403_003), "{err}");
        let (status, created, _) = send(
            console(s, Method::PUT, path, Some(&cookie))
                .header("X-CSRF-Token", &csrf)
                .json(&body),
        );
        assert_eq!(status, 200, "{created}");
        let (status, got, _) = send(console(s, Method::GET, path, Some(&cookie)));
        assert_eq!(
            (status, &got["registrationId"]),
            (200, &json!("console-dev"))
        );

        // An Authorization header wins over the cookie.
        let (status, _, _) = send(
            console(s, Method::GET, path, Some(&cookie)).header("Authorization", "Bearer x.y.z"),
        );
        assert_eq!(status, 401);

        // A provisioning policy holds no hub rights; adding the hub's credential gives them.
        let devices = "/devices?api-version=2021-04-12";
        let (status, _, _) = send(console(s, Method::GET, devices, Some(&cookie)));
        assert_eq!(status, 403);
        let (status, both, joined) = sign_in(s, &s.hub_connection_string(), Some((&cookie, &csrf)));
        assert_eq!(status, 200, "{both}");
        assert_eq!(
            both["principal"],
            "console:policy:provisioningserviceowner+hub-policy:iothubowner"
        );
        assert_eq!(both["csrfToken"], me["csrfToken"], "the same session");
        let joined = joined.unwrap();
        let (status, list, _) = send(console(s, Method::GET, devices, Some(&joined)));
        assert_eq!(status, 200, "{list}");

        // An altered cookie is no session.
        let mut altered = joined.clone().into_bytes();
        let middle = altered.len() / 2;
        altered[middle] = if altered[middle] == b'A' { b'B' } else { b'A' };
        let altered = String::from_utf8(altered).unwrap();
        let (status, err, _) = send(console(s, Method::GET, "/console/session", Some(&altered)));
        assert_eq!((status, error_code(&err)), (401, 401_007), "{err}");
        let (status, err, _) = send(console(s, Method::GET, path, Some(&altered)));
        assert_eq!((status, error_code(&err)), (401, 401_007), "{err}");

        // Signing out clears the cookie.
        let (status, _, headers) = send(console(
            s,
            Method::DELETE,
            "/console/session",
            Some(&joined),
        ));
        assert_eq!(status, 204);
        let cleared = headers["set-cookie"].to_str().unwrap();
        assert!(
            cleared.starts_with("zerotouch_console=;") && cleared.contains("Max-Age=0"),
            "{cleared}"
        );
    });
}

#[test]
fn a_session_ends_with_its_credential_and_keeps_its_rights() {
    each_backend(|s| {
        let (status, policy, _) = send(
            s.request(Method::PUT, "/authorizationPolicies/console-reader")
                .json(&json!({"rights": "EnrollmentRead"})),
        );
        assert_eq!(status, 200, "{policy}");
        let key = policy["primaryKey"].as_str().unwrap();
        let (status, me, cookie) = sign_in(
            s,
            &format!("HostName=x;SharedAccessKeyName=console-reader;SharedAccessKey={key}"),
            None,
        );
        assert_eq!(status, 200, "{me}");
        let cookie = cookie.unwrap();
        let csrf = me["csrfToken"].as_str().unwrap();
        assert_eq!(me["rights"], json!(["EnrollmentRead"]));

        // Read-only: reads work, a write with a good CSRF token is still 403 for lack of rights.
        let path = "/enrollments/reader-try?api-version=2021-10-01";
        let (status, _, _) = send(console(s, Method::GET, path, Some(&cookie)));
        assert_eq!(status, 404, "a read, of nothing");
        let (status, err, _) = send(
            console(s, Method::PUT, path, Some(&cookie))
                .header("X-CSRF-Token", csrf)
                .json(&json!({"attestation": {"type": "symmetricKey"}})),
        );
        assert_eq!((status, error_code(&err)), (403, 403_001), "{err}");
        let (status, err, _) = send(console(
            s,
            Method::GET,
            "/hubs?api-version=2021-10-01",
            Some(&cookie),
        ));
        assert_eq!((status, error_code(&err)), (403, 403_001), "{err}");

        // New keys end the session.
        let (status, _, _) = send(
            s.request(
                Method::POST,
                "/authorizationPolicies/console-reader/regenerateKey",
            )
            .json(&json!({"keyType": "primary"})),
        );
        assert_eq!(status, 200);
        let (status, err, _) = send(console(s, Method::GET, path, Some(&cookie)));
        assert_eq!((status, error_code(&err)), (401, 401_002), "{err}");
        let (status, err, _) = send(console(s, Method::GET, "/console/session", Some(&cookie)));
        assert_eq!((status, error_code(&err)), (401, 401_002), "{err}");
    });
}
