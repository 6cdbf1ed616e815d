-- The raw equivalent of one purchase posting: insert one ledger row and update one member's
-- balance, in one transaction with a durable commit (synchronous_commit is left at its default,
-- on). loadtests/run.py creates bench_ledger and bench_balances (one row per member) and runs
-- this with the same client count as the HTTP scenarios: pgbench -M prepared -c C -j 2 -T D
-- -D members=N -f loadtests/pgbench/ledger.sql
\set member random(1, :members)
\set amount random(1, 500)
BEGIN;
INSERT INTO bench_ledger (member, amount) VALUES (:member, :amount);
UPDATE bench_balances SET balance = balance + :amount, version = version + 1 WHERE member = :member;
END;
