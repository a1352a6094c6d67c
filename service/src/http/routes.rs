//! Every path the HTTPS API serves, in one table, and the path normalization built from it.
//!
//! Each resource file registers its routes with these constants, and [`ALL`] lists them in the
//! order `http::configure` registers them (a test checks that the router sends each template
//! to itself, and another that no route is registered with a path written elsewhere).
//!
//! Azure matches the fixed words of its paths case-insensitively and accepts a trailing
//! slash: the Node provisioning service client calls `POST /enrollmentgroups/{id}/…` and the
//! Node registry `GET /devices/?…`. actix-web matches exactly, so [`normalize`] runs before
//! routing (in `http::observe`) and rewrites a path that no template matches as written into
//! the spelling of the first template it matches with the fixed words compared
//! case-insensitively, then without one trailing slash. Only fixed words change: ids keep
//! their case (hub device ids are case-sensitive), and a path that already routes is left
//! alone, so an id that happens to spell a fixed word differently is still an id.

// Health and metrics.
pub const HEALTHZ: &str = "/healthz";
pub const TLS_CLIENT_CERTIFICATE: &str = "/tls/client-certificate";
pub const METRICS: &str = "/metrics";
/// The OpenAPI description of everything below (`http::openapi`).
pub const OPENAPI: &str = "/openapi.json";

// Management API: enrollments, groups, registration states (dps-protocol §4.2).
pub const ENROLLMENTS_QUERY: &str = "/enrollments/query";
pub const ENROLLMENTS: &str = "/enrollments";
pub const ENROLLMENT_ATTESTATION: &str = "/enrollments/{id}/attestationmechanism";
pub const ENROLLMENT: &str = "/enrollments/{id}";
pub const GROUPS_QUERY: &str = "/enrollmentGroups/query";
pub const GROUPS: &str = "/enrollmentGroups";
pub const GROUP_ATTESTATION: &str = "/enrollmentGroups/{id}/attestationmechanism";
pub const GROUP: &str = "/enrollmentGroups/{id}";
pub const REGISTRATIONS_QUERY: &str = "/registrations/{id}/query";
pub const REGISTRATION: &str = "/registrations/{id}";

// PKI.
pub const ISSUED_CERTIFICATES: &str = "/certificates/issued";
pub const ISSUED_CERTIFICATE_REVOKE: &str = "/certificates/issued/{serial}/revoke";
pub const ISSUED_CERTIFICATE: &str = "/certificates/issued/{serial}";
pub const REGISTRATION_REVOKE: &str = "/registrations/{id}/revokeCertificates";
pub const GROUP_REVOKE: &str = "/enrollmentGroups/{id}/revokeCertificates";
pub const AUDIT: &str = "/audit";
pub const CRL: &str = "/crl";
pub const OCSP: &str = "/ocsp";
pub const OCSP_GET: &str = "/ocsp/{request:.*}";

// EST (RFC 7030), with and without a label.
pub const EST_CACERTS: &str = "/.well-known/est/cacerts";
pub const EST_CSRATTRS: &str = "/.well-known/est/csrattrs";
pub const EST_SIMPLEENROLL: &str = "/.well-known/est/simpleenroll";
pub const EST_SIMPLEREENROLL: &str = "/.well-known/est/simplereenroll";
pub const EST_LABEL_CACERTS: &str = "/.well-known/est/{label}/cacerts";
pub const EST_LABEL_CSRATTRS: &str = "/.well-known/est/{label}/csrattrs";
pub const EST_LABEL_SIMPLEENROLL: &str = "/.well-known/est/{label}/simpleenroll";
pub const EST_LABEL_SIMPLEREENROLL: &str = "/.well-known/est/{label}/simplereenroll";

// CA certificates and authorization policies.
pub const CERTIFICATES: &str = "/certificates";
pub const CERTIFICATE_VERIFICATION_CODE: &str = "/certificates/{name}/generateVerificationCode";
pub const CERTIFICATE_VERIFY: &str = "/certificates/{name}/verify";
pub const CERTIFICATE: &str = "/certificates/{name}";
pub const POLICIES: &str = "/authorizationPolicies";
pub const POLICY_REGENERATE_KEY: &str = "/authorizationPolicies/{name}/regenerateKey";
pub const POLICY: &str = "/authorizationPolicies/{name}";

// Linked hubs.
pub const HUBS: &str = "/hubs";
pub const HUB_JOIN_TOKENS: &str = "/hubs/joinTokens";
pub const HUB_JOIN: &str = "/hubs/join";
pub const HUB_TRUST_BUNDLE: &str = "/hubs/trustBundle";
pub const HUB_HEARTBEAT: &str = "/hubs/{name}/heartbeat";
pub const HUB_DRAIN: &str = "/hubs/{name}/drain";
pub const HUB_ACTIVATE: &str = "/hubs/{name}/activate";
pub const HUB: &str = "/hubs/{name}";

// The hub (hub-protocol §4, §6).
pub const DEVICES_QUERY: &str = "/devices/query";
pub const DEVICE_EVENTS: &str = "/devices/{id}/messages/events";
pub const DEVICE_BOUND: &str = "/devices/{id}/messages/deviceBound";
pub const DEVICE_BOUND_LOCK: &str = "/devices/{id}/messages/deviceBound/{lock_token}";
pub const DEVICE_BOUND_ABANDON: &str = "/devices/{id}/messages/deviceBound/{lock_token}/abandon";
pub const MESSAGES_EVENTS: &str = "/messages/events";
pub const TWIN_METHODS: &str = "/twins/{id}/methods";
pub const TWIN: &str = "/twins/{id}";
pub const DEVICES: &str = "/devices";
pub const DEVICE: &str = "/devices/{id}";
pub const STATISTICS_DEVICES: &str = "/statistics/devices";
pub const STATISTICS_SERVICE: &str = "/statistics/service";

// The web console (docs/console.md).
pub const ROOT: &str = "/";
pub const CONSOLE: &str = "/console";
pub const CONSOLE_ASSET: &str = "/console/assets/{file}";
pub const CONSOLE_SESSION: &str = "/console/session";
pub const CONSOLE_RATES: &str = "/console/rates";
pub const CONSOLE_PKI: &str = "/console/pki";

// The DPS device API (dps-protocol §1.1). Last: its first segment is a parameter.
pub const DPS_REGISTER: &str = "/{id_scope}/registrations/{registration_id}/register";
pub const DPS_OPERATION: &str =
    "/{id_scope}/registrations/{registration_id}/operations/{operation_id}";
pub const DPS_STATUS: &str = "/{id_scope}/registrations/{registration_id}";

/// Every template, in registration order.
pub const ALL: &[&str] = &[
    HEALTHZ,
    TLS_CLIENT_CERTIFICATE,
    METRICS,
    OPENAPI,
    ENROLLMENTS_QUERY,
    ENROLLMENTS,
    ENROLLMENT_ATTESTATION,
    ENROLLMENT,
    GROUPS_QUERY,
    GROUPS,
    GROUP_ATTESTATION,
    GROUP,
    REGISTRATIONS_QUERY,
    REGISTRATION,
    ISSUED_CERTIFICATES,
    ISSUED_CERTIFICATE_REVOKE,
    ISSUED_CERTIFICATE,
    REGISTRATION_REVOKE,
    GROUP_REVOKE,
    AUDIT,
    CRL,
    OCSP,
    OCSP_GET,
    EST_CACERTS,
    EST_CSRATTRS,
    EST_SIMPLEENROLL,
    EST_SIMPLEREENROLL,
    EST_LABEL_CACERTS,
    EST_LABEL_CSRATTRS,
    EST_LABEL_SIMPLEENROLL,
    EST_LABEL_SIMPLEREENROLL,
    CERTIFICATES,
    CERTIFICATE_VERIFICATION_CODE,
    CERTIFICATE_VERIFY,
    CERTIFICATE,
    POLICIES,
    POLICY_REGENERATE_KEY,
    POLICY,
    HUBS,
    HUB_JOIN_TOKENS,
    HUB_JOIN,
    HUB_TRUST_BUNDLE,
    HUB_HEARTBEAT,
    HUB_DRAIN,
    HUB_ACTIVATE,
    HUB,
    DEVICES_QUERY,
    DEVICE_EVENTS,
    DEVICE_BOUND,
    DEVICE_BOUND_LOCK,
    DEVICE_BOUND_ABANDON,
    MESSAGES_EVENTS,
    TWIN_METHODS,
    TWIN,
    DEVICES,
    DEVICE,
    STATISTICS_DEVICES,
    STATISTICS_SERVICE,
    ROOT,
    CONSOLE,
    CONSOLE_ASSET,
    CONSOLE_SESSION,
    CONSOLE_RATES,
    CONSOLE_PKI,
    DPS_REGISTER,
    DPS_OPERATION,
    DPS_STATUS,
];

/// How one template segment matches a request segment.
#[derive(Clone, Copy)]
enum Segment {
    /// A fixed word.
    Literal(&'static str),
    /// `{name}`: one non-empty segment, as actix matches it.
    Param,
    /// `{name:.*}` at the end: everything that is left.
    Tail,
}

fn segments(template: &'static str) -> impl Iterator<Item = Segment> {
    template.trim_start_matches('/').split('/').map(|s| {
        if s.starts_with('{') && s.ends_with(":.*}") {
            Segment::Tail
        } else if s.starts_with('{') {
            Segment::Param
        } else {
            Segment::Literal(s)
        }
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Case {
    Exact,
    Insensitive,
}

/// Whether `path` (its segments) matches `template`.
fn matches(template: &'static str, path: &[&str], case: Case) -> bool {
    let mut rest = path;
    for segment in segments(template) {
        match segment {
            Segment::Tail => return true,
            _ if rest.is_empty() => return false,
            Segment::Param if rest[0].is_empty() => return false,
            Segment::Param => {}
            Segment::Literal(word) => {
                let same = match case {
                    Case::Exact => rest[0] == word,
                    Case::Insensitive => rest[0].eq_ignore_ascii_case(word),
                };
                if !same {
                    return false;
                }
            }
        }
        rest = &rest[1..];
    }
    rest.is_empty()
}

/// `path` with the fixed words spelled as in `template` (which it matches).
fn respell(template: &'static str, path: &[&str]) -> String {
    let mut words = segments(template);
    let mut tail = false;
    let spelled: Vec<&str> = path
        .iter()
        .map(|segment| {
            if !tail {
                match words.next() {
                    Some(Segment::Literal(word)) => return word,
                    Some(Segment::Tail) => tail = true,
                    _ => {}
                }
            }
            *segment
        })
        .collect();
    format!("/{}", spelled.join("/"))
}

/// The path (without the query) that `path` routes as, when that differs from `path`: the
/// fixed words respelled, or a trailing slash removed. `None` when `path` routes as written
/// or matches no template at all (then it is a 404 as it stands).
pub fn normalize(path: &str) -> Option<String> {
    let all: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let trimmed = match all.split_last() {
        Some((&"", rest)) if !rest.is_empty() => Some(rest),
        _ => None,
    };
    for (candidate, as_written) in [(Some(all.as_slice()), true), (trimmed, false)] {
        let Some(candidate) = candidate else {
            continue;
        };
        if ALL.iter().any(|t| matches(t, candidate, Case::Exact)) {
            return (!as_written).then(|| format!("/{}", candidate.join("/")));
        }
        if let Some(template) = ALL
            .iter()
            .find(|t| matches(t, candidate, Case::Insensitive))
        {
            return Some(respell(template, candidate));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_words_take_the_template_spelling_and_ids_keep_theirs() {
        assert_eq!(
            normalize("/enrollmentgroups/My-Group/attestationmechanism").as_deref(),
            Some("/enrollmentGroups/My-Group/attestationmechanism")
        );
        assert_eq!(
            normalize("/TWINS/Dev%201/Methods").as_deref(),
            Some("/twins/Dev%201/methods")
        );
        assert_eq!(
            normalize("/devices/Dev1/messages/devicebound").as_deref(),
            Some("/devices/Dev1/messages/deviceBound")
        );
        assert_eq!(
            normalize("/DEVICES/Dev%201/Messages/DeviceBound/AbC-1/ABANDON").as_deref(),
            Some("/devices/Dev%201/messages/deviceBound/AbC-1/abandon")
        );
        assert_eq!(
            normalize("/0NE00AB12/Registrations/Dev-1/Register").as_deref(),
            Some("/0NE00AB12/registrations/Dev-1/register")
        );
    }

    #[test]
    fn a_trailing_slash_is_dropped_where_a_template_matches_without_it() {
        assert_eq!(normalize("/devices/").as_deref(), Some("/devices"));
        assert_eq!(normalize("/enrollments/").as_deref(), Some("/enrollments"));
        assert_eq!(normalize("/Twins/dev1/").as_deref(), Some("/twins/dev1"));
        assert_eq!(
            normalize("/enrollmentGroups/g1/").as_deref(),
            Some("/enrollmentGroups/g1")
        );
    }

    #[test]
    fn paths_that_route_as_written_are_left_alone() {
        for path in [
            "/devices",
            "/devices/dev1",
            // A device whose id spells a fixed word differently is still a device.
            "/devices/Query",
            "/enrollmentGroups/g1/attestationmechanism",
            "/ocsp/MEow%2FAB/",
            "/0ne00AB12/registrations/dev/register",
        ] {
            assert_eq!(normalize(path), None, "{path}");
        }
    }

    #[test]
    fn unknown_paths_stay_unknown() {
        for path in ["", "/nothing", "/devices/a/b/c/d/e/f/g", "/devices//"] {
            assert_eq!(normalize(path), None, "{path}");
        }
    }

    #[test]
    fn the_root_is_the_console_redirect() {
        assert_eq!(normalize("/"), None);
        assert_eq!(normalize("//").as_deref(), Some("/"));
        assert_eq!(normalize("/Console/").as_deref(), Some("/console"));
    }

    #[test]
    fn every_template_is_well_formed() {
        for template in ALL {
            assert!(template.starts_with('/'), "{template}");
            assert!(!template.ends_with('/') || *template == ROOT, "{template}");
            let tails = segments(template)
                .filter(|s| matches!(s, Segment::Tail))
                .count();
            assert!(tails == 0 || template.ends_with(":.*}"), "{template}");
        }
    }

    /// Every route registration in `http/` uses a constant of this table: a path written
    /// anywhere else would be a route that [`normalize`] does not know.
    #[test]
    fn no_route_is_registered_with_a_path_written_elsewhere() {
        fn visit(dir: &std::path::Path, found: &mut Vec<String>) {
            for entry in std::fs::read_dir(dir).expect("read src/http") {
                let path = entry.expect("dir entry").path();
                if path.is_dir() {
                    visit(&path, found);
                } else if path.extension().is_some_and(|e| e == "rs")
                    && path.file_name().is_some_and(|n| n != "routes.rs")
                {
                    let text = std::fs::read_to_string(&path).expect("read source");
                    let flat: String = text.split_whitespace().collect();
                    for pattern in ["resource(\"", "resource(format!", "scope(\"", ".route(\""] {
                        if flat.contains(pattern) {
                            found.push(format!("{}: {pattern}", path.display()));
                        }
                    }
                }
            }
        }
        let mut found = Vec::new();
        visit(
            &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http"),
            &mut found,
        );
        assert!(
            found.is_empty(),
            "register routes with http::routes constants: {found:?}"
        );
    }

    /// A request path for `template`: parameters become `x`, fixed words go through `word`.
    fn sample(template: &'static str, word: fn(&str) -> String) -> String {
        let parts: Vec<String> = segments(template)
            .map(|s| match s {
                Segment::Literal(w) => word(w),
                Segment::Param | Segment::Tail => "x".to_string(),
            })
            .collect();
        format!("/{}", parts.join("/"))
    }

    /// The router (`http::configure`) sends every template of the table to itself, so the
    /// table is in registration order and covers what is registered; and a path with its fixed
    /// words in another case and a trailing slash routes the same once normalized.
    #[test]
    fn the_router_sends_every_template_to_itself_and_normalized_odd_spellings_too() {
        use actix_web::dev::Service;
        let routed = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(async {
                let app = actix_web::test::init_service(
                    actix_web::App::new()
                        .configure(crate::http::configure)
                        .wrap_fn(|req, _srv| {
                            let pattern = req.resource_map().match_pattern(req.path());
                            let body = pattern.unwrap_or_else(|| "none".to_string());
                            std::future::ready(Ok(
                                req.into_response(actix_web::HttpResponse::Ok().body(body))
                            ))
                        }),
                )
                .await;
                let mut routed = Vec::new();
                for template in ALL {
                    let exact = sample(template, str::to_string);
                    // `/ocsp/` is the GET form with an empty request, not `/ocsp` with a slash.
                    let slash = if *template == OCSP { "" } else { "/" };
                    let odd = format!("{}{slash}", sample(template, str::to_ascii_uppercase));
                    let odd = normalize(&odd).unwrap_or(odd);
                    for path in [exact, odd] {
                        let req = actix_web::test::TestRequest::get().uri(&path).to_request();
                        let res = app.call(req).await.expect("call");
                        let body = actix_web::body::to_bytes(res.into_body())
                            .await
                            .expect("body");
                        routed.push((
                            template.to_string(),
                            path,
                            String::from_utf8_lossy(&body).into_owned(),
                        ));
                    }
                }
                routed
            });
        let wrong: Vec<_> = routed.iter().filter(|(t, _, got)| t != got).collect();
        assert!(wrong.is_empty(), "routed elsewhere: {wrong:#?}");
    }
}
