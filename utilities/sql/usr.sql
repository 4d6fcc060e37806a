-- DBA-owned schema of the `usr` sample domain (CONTRACT §5).
-- BEDS only ever CALLs these procedures; it never writes SQL of its own.
-- Idempotent: safe to load again.

CREATE TABLE IF NOT EXISTS usr (
  id    BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
  name  VARCHAR(64)  NOT NULL,
  email VARCHAR(128) NOT NULL,
  UNIQUE KEY usr_email (email)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

DELIMITER //

CREATE OR REPLACE PROCEDURE usr_create(IN p_name VARCHAR(64), IN p_email VARCHAR(128))
BEGIN
  INSERT INTO usr (name, email) VALUES (p_name, p_email);
  SELECT id, name, email FROM usr WHERE id = LAST_INSERT_ID();
END //

CREATE OR REPLACE PROCEDURE usr_read(IN p_id BIGINT)
BEGIN
  SELECT id, name, email FROM usr WHERE id = p_id;
END //

-- NULL leaves a column unchanged.
CREATE OR REPLACE PROCEDURE usr_update(IN p_id BIGINT, IN p_name VARCHAR(64), IN p_email VARCHAR(128))
BEGIN
  UPDATE usr SET name = COALESCE(p_name, name), email = COALESCE(p_email, email) WHERE id = p_id;
  SELECT id, name, email FROM usr WHERE id = p_id;
END //

CREATE OR REPLACE PROCEDURE usr_delete(IN p_id BIGINT)
BEGIN
  DELETE FROM usr WHERE id = p_id;
END //

CREATE OR REPLACE PROCEDURE usr_list(IN p_limit INT, IN p_offset INT)
BEGIN
  DECLARE v_limit INT DEFAULT COALESCE(p_limit, 100);
  DECLARE v_offset INT DEFAULT COALESCE(p_offset, 0);
  SELECT id, name, email FROM usr ORDER BY id LIMIT v_limit OFFSET v_offset;
END //

DELIMITER ;
