DROP TABLE join_tokens;
DROP TABLE linked_hubs;
