DROP TABLE pki_state;
DROP TABLE audit_events;
DROP TABLE issued_certificates;
