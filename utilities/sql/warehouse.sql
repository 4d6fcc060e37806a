-- DBA-owned schema of segundo's sample domains: `wh_sales` (warehouse
-- facts, loaded in bulk, read by reports) and `wh_cool` (moving aged facts
-- to cool storage). BEDS only ever CALLs these procedures.
-- Idempotent: safe to load again. Runs on the warehouse database.

CREATE TABLE IF NOT EXISTS wh_sales (
  sale_id BIGINT         NOT NULL PRIMARY KEY,   -- the source system's id: reloading a row replaces it
  day     DATE           NOT NULL,
  region  VARCHAR(32)    NOT NULL,
  product VARCHAR(64)    NOT NULL,
  qty     INT            NOT NULL,
  amount  DECIMAL(14, 2) NOT NULL,
  KEY wh_sales_day (day, region)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4;

-- Cool storage: the same facts, compressed, read rarely.
CREATE TABLE IF NOT EXISTS wh_sales_cool (
  sale_id BIGINT         NOT NULL PRIMARY KEY,
  day     DATE           NOT NULL,
  region  VARCHAR(32)    NOT NULL,
  product VARCHAR(64)    NOT NULL,
  qty     INT            NOT NULL,
  amount  DECIMAL(14, 2) NOT NULL,
  moved   DATETIME       NOT NULL DEFAULT CURRENT_TIMESTAMP
) ENGINE = InnoDB ROW_FORMAT = COMPRESSED DEFAULT CHARSET = utf8mb4;

DELIMITER //

-- Bulk load: p_rows is a JSON array of {sale_id, day, region, product, qty,
-- amount}. A row already loaded is replaced, so a repeated load changes
-- nothing. Returns the number of rows in the array.
CREATE OR REPLACE PROCEDURE wh_sales_load(IN p_rows LONGTEXT)
BEGIN
  INSERT INTO wh_sales (sale_id, day, region, product, qty, amount)
  SELECT j.sale_id, j.day, j.region, j.product, j.qty, j.amount
  FROM JSON_TABLE(p_rows, '$[*]' COLUMNS (
    sale_id BIGINT         PATH '$.sale_id' ERROR ON EMPTY,
    day     DATE           PATH '$.day' ERROR ON EMPTY,
    region  VARCHAR(32)    PATH '$.region' ERROR ON EMPTY,
    product VARCHAR(64)    PATH '$.product' ERROR ON EMPTY,
    qty     INT            PATH '$.qty' ERROR ON EMPTY,
    amount  DECIMAL(14, 2) PATH '$.amount' ERROR ON EMPTY
  )) AS j
  ON DUPLICATE KEY UPDATE day = VALUES(day), region = VALUES(region),
    product = VALUES(product), qty = VALUES(qty), amount = VALUES(amount);
  SELECT JSON_LENGTH(p_rows) AS loaded;
END //

-- Reporting read: totals per region over [p_from, p_to], hot rows only.
CREATE OR REPLACE PROCEDURE wh_sales_by_region(IN p_from DATETIME, IN p_to DATETIME)
BEGIN
  SELECT region, CAST(SUM(qty) AS SIGNED) AS qty, CAST(SUM(amount) AS CHAR) AS amount, COUNT(*) AS sales
  FROM wh_sales WHERE day BETWEEN DATE(p_from) AND DATE(p_to)
  GROUP BY region ORDER BY region;
END //

-- Moves up to p_max facts older than p_before to cool storage. Safe to
-- repeat, and safe after a crash between its two statements: copying a
-- fact again overwrites its cool copy with the hot one (a fact corrected
-- by a later load wins), and the hot copy of every fact in cool storage is
-- deleted. Returns how many hot rows went.
CREATE OR REPLACE PROCEDURE wh_cool_move(IN p_before DATETIME, IN p_max INT)
BEGIN
  DECLARE v_max INT DEFAULT COALESCE(p_max, 10000);
  INSERT INTO wh_sales_cool (sale_id, day, region, product, qty, amount)
  SELECT sale_id, day, region, product, qty, amount FROM wh_sales
  WHERE day < DATE(p_before) ORDER BY day, sale_id LIMIT v_max
  ON DUPLICATE KEY UPDATE day = VALUES(day), region = VALUES(region),
    product = VALUES(product), qty = VALUES(qty), amount = VALUES(amount), moved = CURRENT_TIMESTAMP;
  DELETE h FROM wh_sales h JOIN wh_sales_cool c ON c.sale_id = h.sale_id
  WHERE h.day < DATE(p_before);
  SELECT ROW_COUNT() AS moved;
END //

-- How much is hot and how much cool, and the oldest hot day.
CREATE OR REPLACE PROCEDURE wh_cool_stats()
BEGIN
  SELECT (SELECT COUNT(*) FROM wh_sales) AS hot,
         (SELECT COUNT(*) FROM wh_sales_cool) AS cool,
         (SELECT CAST(MIN(day) AS CHAR) FROM wh_sales) AS oldest_hot;
END //

DELIMITER ;
