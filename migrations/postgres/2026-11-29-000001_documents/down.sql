DROP TABLE settings;
DROP TABLE authorization_policies;
DROP TABLE ca_certificates;
DROP TABLE registrations;
DROP TABLE enrollment_groups;
DROP TABLE individual_enrollments;
