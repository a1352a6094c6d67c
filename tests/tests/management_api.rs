//! The management API through HTTPS, on SQLite and PostgreSQL: enrollments and groups with
//! etags, queries with paging, bulk operations, CA proof of possession, and bad input.

use reqwest::Method;
use serde_json::{Value, json};
use zerotouch_tests::{Backend, TestServer, each_backend, error_code, pki, send};

#[test]
fn individual_enrollment_lifecycle_with_etags() {
    each_backend(|s| {
        let body = json!({"registrationId": "dev-01", "attestation": {"type": "symmetricKey"},
                          "initialTwin": {"tags": {"site": "plant-7"}}});
        let (status, created, _) = send(s.request(Method::PUT, "/enrollments/dev-01").json(&body));
        assert_eq!(status, 200, "{created}");
        let primary = created["attestation"]["symmetricKey"]["primaryKey"]
            .as_str()
            .unwrap();
        assert_eq!(base64_len(primary), 64, "generated keys are 64 bytes");
        let etag1 = created["etag"].as_str().unwrap().to_string();

        // Creating again without If-Match collides.
        let (status, err, headers) =
            send(s.request(Method::PUT, "/enrollments/DEV-01").json(&body));
        assert_eq!((status, error_code(&err)), (409, 409_201), "{err}");
        assert_eq!(headers["x-ms-error-code"], "409201");

        // GET strips secrets; ids are case-insensitive.
        let (status, got, _) = send(s.request(Method::GET, "/enrollments/DEV-01"));
        assert_eq!(status, 200);
        assert_eq!(got["attestation"], json!({"type": "symmetricKey"}));
        assert_eq!(got["etag"], created["etag"]);
        assert_eq!(got["initialTwin"]["tags"]["site"], "plant-7");

        // attestationmechanism returns the keys.
        let (status, mech, _) =
            send(s.request(Method::POST, "/enrollments/dev-01/attestationmechanism"));
        assert_eq!(status, 200);
        assert_eq!(mech["symmetricKey"]["primaryKey"], primary);

        // A stale etag is refused; the right one wins and changes the etag.
        let mut update = got.clone();
        update["provisioningStatus"] = json!("disabled");
        let (status, err, _) = send(
            s.request(Method::PUT, "/enrollments/dev-01")
                .header("If-Match", "\"stale\"")
                .json(&update),
        );
        assert_eq!((status, error_code(&err)), (412, 412_001));
        let (status, updated, _) = send(
            s.request(Method::PUT, "/enrollments/dev-01")
                .header("If-Match", &etag1)
                .json(&update),
        );
        assert_eq!(status, 200, "{updated}");
        assert_eq!(updated["provisioningStatus"], "disabled");
        assert_ne!(updated["etag"], created["etag"]);
        // Keys survive a read-modify-write through the stripped GET view.
        assert_eq!(
            updated["attestation"]["symmetricKey"]["primaryKey"],
            primary
        );

        // Delete with the old etag fails, with the new one succeeds; then it is gone.
        let (status, _, _) = send(
            s.request(Method::DELETE, "/enrollments/dev-01")
                .header("If-Match", &etag1),
        );
        assert_eq!(status, 412);
        let etag2 = updated["etag"].as_str().unwrap();
        let (status, _, _) = send(
            s.request(Method::DELETE, "/enrollments/dev-01")
                .header("If-Match", etag2),
        );
        assert_eq!(status, 204);
        let (status, err, _) = send(s.request(Method::GET, "/enrollments/dev-01"));
        assert_eq!((status, error_code(&err)), (404, 404_201));
    });
}

fn base64_len(b64: &str) -> usize {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap()
        .len()
}

#[test]
fn query_pages_with_continuation_and_bulk_operations() {
    each_backend(|s| {
        let items: Vec<Value> = (0..7)
            .map(|i| json!({"registrationId": format!("bulk-{i}"), "attestation": {"type": "symmetricKey"}}))
            .collect();
        let (status, result, _) = send(
            s.request(Method::POST, "/enrollments")
                .json(&json!({"mode": "create", "enrollments": items})),
        );
        assert_eq!(status, 200);
        assert_eq!(result["isSuccessful"], true, "{result}");

        // Create again: every item fails with its own error, the request itself succeeds.
        let (_, result, _) = send(
            s.request(Method::POST, "/enrollments")
                .json(&json!({"mode": "create", "enrollments": items[..2]})),
        );
        assert_eq!(result["isSuccessful"], false);
        assert_eq!(result["errors"].as_array().unwrap().len(), 2);
        assert_eq!(result["errors"][0]["errorCode"], 409_201);
        assert_eq!(result["errors"][0]["registrationId"], "bulk-0");

        let mut seen = Vec::new();
        let mut continuation: Option<String> = None;
        let mut pages = 0;
        loop {
            let mut request = s
                .request(Method::POST, "/enrollments/query")
                .header("x-ms-max-item-count", "3")
                .json(&json!({"query": "SELECT * FROM enrollments"}));
            if let Some(token) = &continuation {
                request = request.header("x-ms-continuation", token);
            }
            let (status, page, headers) = send(request);
            assert_eq!(status, 200, "{page}");
            assert_eq!(headers["x-ms-item-type"], "Enrollment");
            for item in page.as_array().unwrap() {
                assert!(
                    item["attestation"].get("symmetricKey").is_none(),
                    "query strips keys"
                );
                seen.push(item["registrationId"].as_str().unwrap().to_string());
            }
            pages += 1;
            continuation = headers
                .get("x-ms-continuation")
                .map(|v| v.to_str().unwrap().to_string());
            if continuation.is_none() {
                break;
            }
        }
        assert_eq!(pages, 3);
        let expected: Vec<String> = (0..7).map(|i| format!("bulk-{i}")).collect();
        assert_eq!(seen, expected);

        let (status, err, _) = send(
            s.request(Method::POST, "/enrollments/query")
                .header("x-ms-continuation", "garbage!")
                .json(&json!({"query": "*"})),
        );
        assert_eq!((status, error_code(&err)), (400, 400_008));

        let too_many: Vec<Value> = (0..11)
            .map(|i| json!({"registrationId": format!("x{i}")}))
            .collect();
        let (status, err, _) = send(
            s.request(Method::POST, "/enrollments")
                .json(&json!({"mode": "create", "enrollments": too_many})),
        );
        assert_eq!((status, error_code(&err)), (400, 400_010));

        let deletes: Vec<Value> = (0..7)
            .map(|i| json!({"registrationId": format!("bulk-{i}")}))
            .collect();
        let (_, result, _) = send(
            s.request(Method::POST, "/enrollments")
                .json(&json!({"mode": "delete", "enrollments": deletes})),
        );
        assert_eq!(result["isSuccessful"], true, "{result}");
    });
}

#[test]
fn x509_enrollments_compute_certificate_info() {
    each_backend(|s| {
        let (leaf, _key) = pki::self_signed("x509-dev");
        let body = json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": leaf}}}}});
        let (status, created, _) =
            send(s.request(Method::PUT, "/enrollments/x509-dev").json(&body));
        assert_eq!(status, 200, "{created}");
        let info = &created["attestation"]["x509"]["clientCertificates"]["primary"]["info"];
        assert_eq!(info["subjectName"], "CN=x509-dev");
        assert_eq!(info["sha256Thumbprint"].as_str().unwrap().len(), 64);
        let (_, got, _) = send(s.request(Method::GET, "/enrollments/x509-dev"));
        let slot = &got["attestation"]["x509"]["clientCertificates"]["primary"];
        assert!(slot.get("certificate").is_none(), "{slot}");
        assert_eq!(slot["info"], *info);
    });
}

#[test]
fn ca_proof_of_possession_and_groups() {
    each_backend(|s| {
        let ca = pki::TestCa::new("Fleet Root");
        let (status, uploaded, _) = send(
            s.request(Method::PUT, "/certificates/fleet-root")
                .json(&json!({"certificate": ca.cert_pem})),
        );
        assert_eq!(status, 200, "{uploaded}");
        assert_eq!(uploaded["properties"]["isVerified"], false);

        // A leaf is not a CA.
        let (leaf, _) = pki::self_signed("not-a-ca");
        let (status, err, _) = send(
            s.request(Method::PUT, "/certificates/leaf")
                .json(&json!({"certificate": leaf})),
        );
        assert_eq!((status, error_code(&err)), (400, 400_004));

        // generateVerificationCode needs If-Match.
        let (status, err, _) = send(s.request(
            Method::POST,
            "/certificates/fleet-root/generateVerificationCode",
        ));
        assert_eq!((status, error_code(&err)), (400, 400_015));
        let (status, pending, _) = send(
            s.request(
                Method::POST,
                "/certificates/fleet-root/generateVerificationCode",
            )
            .header("If-Match", uploaded["etag"].as_str().unwrap()),
        );
        assert_eq!(status, 200, "{pending}");
        let code = pending["properties"]["verificationCode"]
            .as_str()
            .unwrap()
            .to_string();
        let etag = pending["etag"].as_str().unwrap().to_string();

        // Wrong CN, and the right CN signed by another CA: both refused.
        let (wrong_cn, _) = ca.issue("not-the-code");
        let (forged, _) = pki::TestCa::new("Impostor").issue(&code);
        for proof in [wrong_cn, forged] {
            let (status, err, _) = send(
                s.request(Method::POST, "/certificates/fleet-root/verify")
                    .header("If-Match", &etag)
                    .json(&json!({"certificate": proof})),
            );
            assert_eq!((status, error_code(&err)), (400, 400_012), "{err}");
        }
        let (proof, _) = ca.issue(&code);
        let (status, verified, _) = send(
            s.request(Method::POST, "/certificates/fleet-root/verify")
                .header("If-Match", &etag)
                .json(&json!({"certificate": proof})),
        );
        assert_eq!(status, 200, "{verified}");
        assert_eq!(verified["properties"]["isVerified"], true);
        assert!(verified["properties"].get("verificationCode").is_none());

        // A group referencing it, and one referencing a CA that does not exist.
        let group = json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "fleet-root"}}}});
        let (status, created, _) = send(
            s.request(Method::PUT, "/enrollmentGroups/fleet")
                .json(&group),
        );
        assert_eq!(status, 200, "{created}");
        let missing =
            json!({"attestation": {"type": "x509", "x509": {"caReferences": {"primary": "nope"}}}});
        let (status, err, _) = send(
            s.request(Method::PUT, "/enrollmentGroups/other")
                .json(&missing),
        );
        assert_eq!((status, error_code(&err)), (400, 400_004));
        assert_eq!(
            err["info"]["field"],
            "attestation.x509.caReferences.primary"
        );

        // The CA cannot be deleted while a group references it.
        let (status, err, _) = send(s.request(Method::DELETE, "/certificates/fleet-root"));
        assert_eq!((status, error_code(&err)), (409, 409_203), "{err}");

        // Symmetric-key group and the group query.
        let (status, _, _) = send(
            s.request(Method::PUT, "/enrollmentGroups/sk")
                .json(&json!({"attestation": {"type": "symmetricKey"}})),
        );
        assert_eq!(status, 200);
        let (status, groups, headers) = send(
            s.request(Method::POST, "/enrollmentGroups/query")
                .json(&json!({"query": "*"})),
        );
        assert_eq!(status, 200);
        assert_eq!(headers["x-ms-item-type"], "EnrollmentGroup");
        assert_eq!(groups.as_array().unwrap().len(), 2);

        // No registrations yet.
        let (status, regs, _) = send(s.request(Method::POST, "/registrations/fleet/query"));
        assert_eq!((status, regs), (200, json!([])));
        let (status, err, _) = send(s.request(Method::GET, "/registrations/nobody"));
        assert_eq!((status, error_code(&err)), (404, 404_202));
    });
}

#[test]
fn expired_enrollment_certificates_are_refused() {
    let s = TestServer::start(Backend::Sqlite);
    let expired = pki::expired_self_signed("old-dev");
    let body = json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": expired}}}}});
    let (status, err, _) = send(s.request(Method::PUT, "/enrollments/old-dev").json(&body));
    assert_eq!((status, error_code(&err)), (400, 400_004), "{err}");
    assert!(
        err["message"].as_str().unwrap().contains("expired"),
        "{err}"
    );
}

#[test]
fn malformed_input_is_a_400_with_a_code_never_a_500() {
    let s = TestServer::start(Backend::Sqlite);
    let cases: Vec<(&str, Value, u64, &str)> = vec![
        (
            "/enrollments/d1",
            json!({"attestation": {"type": "x509", "x509": {"clientCertificates": {"primary": {"certificate": "-----BEGIN CERTIFICATE-----\nMIIBroken\n-----END CERTIFICATE-----"}}}}}),
            400_004,
            "attestation.x509.clientCertificates.primary.certificate",
        ),
        (
            "/enrollments/d1",
            json!({"attestation": {"type": "symmetricKey", "symmetricKey": {"primaryKey": "c2hvcnQ="}}}),
            400_005,
            "attestation.symmetricKey.primaryKey",
        ),
        (
            "/enrollments/d1",
            json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": "AAEAAQ=="}}}),
            400_006,
            "attestation.tpm.endorsementKey",
        ),
        (
            "/enrollments/d1",
            json!({"attestation": {"type": "tpm", "tpm": {"endorsementKey": "%%%"}}}),
            400_006,
            "attestation.tpm.endorsementKey",
        ),
        (
            "/enrollments/bad_",
            json!({"attestation": {"type": "symmetricKey"}}),
            400_001,
            "registrationId",
        ),
        (
            "/enrollments/d1",
            json!({"attestation": {"type": "symmetricKey"}, "iotHubs": "hub"}),
            400_007,
            "iotHubs",
        ),
        ("/enrollments/d1", json!([1, 2]), 400_007, ""),
        (
            "/enrollmentGroups/g1",
            json!({"attestation": {"type": "x509", "x509": {"signingCertificates": {"primary": {"certificate": pki::self_signed("leaf").0}}}}}),
            400_004,
            "attestation.x509.signingCertificates.primary.certificate",
        ),
    ];
    for (path, body, code, field) in cases {
        let (status, err, _) = send(s.request(Method::PUT, path).json(&body));
        assert_eq!(
            (status, error_code(&err)),
            (400, code),
            "{path} {body}: {err}"
        );
        if !field.is_empty() {
            assert_eq!(err["info"]["field"], field, "{err}");
        }
        assert!(err["trackingId"].as_str().is_some_and(|t| !t.is_empty()));
    }
    // Not JSON at all, and an oversized body.
    let (status, err, _) = send(
        s.request(Method::PUT, "/enrollments/d1")
            .header("content-type", "application/json")
            .body("{\"attestation\":"),
    );
    assert_eq!((status, error_code(&err)), (400, 400_000));
    let huge = format!("{{\"x\":\"{}\"}}", "a".repeat(300 * 1024));
    let (status, err, _) = send(
        s.request(Method::PUT, "/enrollments/d1")
            .header("content-type", "application/json")
            .body(huge),
    );
    assert_eq!((status, error_code(&err)), (413, 413_001));
    // api-version is required.
    let (status, err, _) = send(
        s.client
            .get(format!(
                "https://localhost:{}/enrollments/d1",
                s.https_port()
            ))
            .header("Authorization", s.owner_sas()),
    );
    assert_eq!((status, error_code(&err)), (400, 400_013));
    // Unknown route.
    let (status, err, _) = send(s.request(Method::GET, "/nowhere"));
    assert_eq!((status, error_code(&err)), (404, 404_000));
}

#[test]
fn concurrent_updates_of_one_enrollment_exactly_one_wins() {
    each_backend(|s| {
        let (status, created, _) = send(
            s.request(Method::PUT, "/enrollments/race")
                .json(&json!({"attestation": {"type": "symmetricKey"}})),
        );
        assert_eq!(status, 200);
        let etag = created["etag"].as_str().unwrap().to_string();
        let statuses: Vec<u16> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8)
                .map(|i| {
                    let etag = etag.clone();
                    scope.spawn(move || {
                        let body = json!({"attestation": {"type": "symmetricKey"}, "initialTwin": {"tags": {"writer": i}}});
                        send(s.request(Method::PUT, "/enrollments/race").header("If-Match", etag).json(&body)).0
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(
            statuses.iter().filter(|s| **s == 200).count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| **s == 412).count(),
            7,
            "{statuses:?}"
        );
    });
}
