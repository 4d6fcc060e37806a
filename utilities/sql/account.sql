-- DBA-owned schema of tercero's `account` sample domain (user accounts,
-- served by uBroker). BEDS only ever CALLs these procedures.
-- Idempotent: safe to load again.

CREATE TABLE IF NOT EXISTS account (
  id       BIGINT       NOT NULL AUTO_INCREMENT PRIMARY KEY,
  username VARCHAR(32)  NOT NULL,
  email    VARCHAR(128) NOT NULL,
  status   ENUM('active', 'disabled') NOT NULL DEFAULT 'active',
  created  DATETIME     NOT NULL DEFAULT CURRENT_TIMESTAMP,
  UNIQUE KEY account_username (username)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

DELIMITER //

CREATE OR REPLACE PROCEDURE account_create(IN p_username VARCHAR(32), IN p_email VARCHAR(128))
BEGIN
  INSERT INTO account (username, email) VALUES (p_username, p_email);
  SELECT id, username, email, status, CAST(created AS CHAR) AS created FROM account WHERE id = LAST_INSERT_ID();
END //

CREATE OR REPLACE PROCEDURE account_read(IN p_id BIGINT)
BEGIN
  SELECT id, username, email, status, CAST(created AS CHAR) AS created FROM account WHERE id = p_id;
END //

CREATE OR REPLACE PROCEDURE account_by_name(IN p_username VARCHAR(32))
BEGIN
  SELECT id, username, email, status, CAST(created AS CHAR) AS created FROM account WHERE username = p_username;
END //

-- Disabling twice is the same as once.
CREATE OR REPLACE PROCEDURE account_disable(IN p_id BIGINT)
BEGIN
  UPDATE account SET status = 'disabled' WHERE id = p_id;
  SELECT id, username, email, status, CAST(created AS CHAR) AS created FROM account WHERE id = p_id;
END //

DELIMITER ;
