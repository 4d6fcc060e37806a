-- BEDS's durable inbox on MariaDB (wiki/14-delivery-guarantees.md).
-- Installed by the DBA beside each domain's script, in every database that
-- templates with writes use, so BEDS's user stays EXECUTE-only: BEDS only
-- CALLs these procedures; claim and finish open and close the transaction
-- of the write they guard.
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

-- Starts a guarded write's transaction (one round trip: BEDS sends no
-- BEGIN). Fresh id: no result set, the transaction stays open with the row
-- locked until beds_inbox_finish, and savepoint beds_op marks where a
-- refused write is rolled back to. Known id: one row, the stored record,
-- and the transaction is over. A second claim of an id whose first claim
-- is not committed waits on its row lock, then gets the committed record
-- (or the id, if the first rolled back).
CREATE OR REPLACE PROCEDURE beds_inbox_claim(IN p_id CHAR(64) CHARACTER SET ascii, IN p_message_id VARCHAR(255))
BEGIN
  DECLARE EXIT HANDLER FOR 1062
  BEGIN
    SELECT record FROM beds_inbox WHERE id = p_id LOCK IN SHARE MODE;
    ROLLBACK;
  END;
  START TRANSACTION;
  INSERT INTO beds_inbox (id, message_id) VALUES (p_id, p_message_id);
  SAVEPOINT beds_op;
END //

-- Ends it: stores the answer and commits it with the write. p_keep = FALSE
-- (the write was refused) first undoes what the write did, so only the
-- answer is kept.
-- If the write's procedure ended the transaction itself (its own COMMIT or
-- ROLLBACK), the claim is gone: nothing is recorded and the call fails
-- loudly instead of committing a half.
CREATE OR REPLACE PROCEDURE beds_inbox_finish(IN p_id CHAR(64) CHARACTER SET ascii, IN p_record MEDIUMTEXT, IN p_keep BOOLEAN)
BEGIN
  IF @@in_transaction = 0 THEN
    SIGNAL SQLSTATE 'HY000' SET MESSAGE_TEXT = 'beds_inbox_finish: the write ended its transaction itself (COMMIT or ROLLBACK in the procedure); nothing recorded';
  END IF;
  IF NOT p_keep THEN
    ROLLBACK TO SAVEPOINT beds_op;
  END IF;
  UPDATE beds_inbox SET record = p_record WHERE id = p_id;
  IF ROW_COUNT() = 0 THEN
    SIGNAL SQLSTATE 'HY000' SET MESSAGE_TEXT = 'beds_inbox_finish: the claim is gone (the write rolled back its transaction); nothing recorded';
  END IF;
  COMMIT;
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
