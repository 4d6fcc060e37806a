-- BEDS's durable inbox on MariaDB (wiki/14-delivery-guarantees.md).
-- Installed by the DBA beside each domain's script, in every database that
-- templates with writes use, so BEDS's user stays EXECUTE-only: BEDS only
-- CALLs these procedures, inside the transaction of the write they guard.
-- Idempotent: safe to load again.

CREATE TABLE IF NOT EXISTS beds_inbox (
  -- SHA-256 (hex) of caller, message_id and the body's SHA-256: a repeat of
  -- the same request has the same id, another request reusing the id not.
  id         CHAR(64)     CHARACTER SET ascii NOT NULL PRIMARY KEY,
  -- The client's message_id, for operators.
  message_id VARCHAR(255) NOT NULL,
  created_at TIMESTAMP(3) NOT NULL DEFAULT CURRENT_TIMESTAMP(3),
  -- What BEDS answered (reply body and how it was parked), as JSON.
  record     MEDIUMTEXT   NULL,
  KEY beds_inbox_created (created_at)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

DELIMITER //

-- p_id is ascii like the column: with another character set the lookups
-- could not use the primary key, would scan and lock every record, and
-- concurrent writes would deadlock.

-- First statement of a guarded write's transaction. Fresh id: no result
-- set, the row stays locked until COMMIT, and savepoint beds_op marks where
-- a failed write is rolled back to. Known id: one row, the stored record.
-- A second claim of an id whose first claim is not committed waits on its
-- row lock, then gets the committed record (or the id, if it rolled back).
CREATE OR REPLACE PROCEDURE beds_inbox_claim(IN p_id CHAR(64) CHARACTER SET ascii, IN p_message_id VARCHAR(255))
BEGIN
  DECLARE EXIT HANDLER FOR 1062
    SELECT record FROM beds_inbox WHERE id = p_id LOCK IN SHARE MODE;
  INSERT INTO beds_inbox (id, message_id) VALUES (p_id, p_message_id);
  SAVEPOINT beds_op;
END //

-- Last statement before COMMIT: stores the answer with the write.
CREATE OR REPLACE PROCEDURE beds_inbox_finish(IN p_id CHAR(64) CHARACTER SET ascii, IN p_record MEDIUMTEXT)
BEGIN
  UPDATE beds_inbox SET record = p_record WHERE id = p_id;
END //

-- Retention: removes at most p_limit records older than p_age_s seconds and
-- returns how many went, so BEDS purges in small steps off the request path.
CREATE OR REPLACE PROCEDURE beds_inbox_purge(IN p_age_s BIGINT, IN p_limit INT)
BEGIN
  DELETE FROM beds_inbox
   WHERE created_at < NOW(3) - INTERVAL p_age_s SECOND
   LIMIT p_limit;
  SELECT ROW_COUNT() AS purged;
END //

DELIMITER ;
