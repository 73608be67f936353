-- Runs once, as the image's superuser, when the data volume is created.
-- The database belongs to a login that may create roles and is no superuser, as on a
-- managed service: `sfdb migrate` runs as it (DATABASE_MIGRATION_URL) and creates the
-- layer's roles; `sfdb create-login` then makes the runtime login (DATABASE_URL).
CREATE ROLE slack_fathom_db_migrator LOGIN CREATEROLE PASSWORD 'change-me-migrator';
CREATE DATABASE slack_fathom_db OWNER slack_fathom_db_migrator;
