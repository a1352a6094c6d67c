DROP TABLE stale_identities;
