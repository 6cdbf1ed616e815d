-- Lets one SQL statement refuse to finish: called where a self-committing statement finds that
-- what it was told no longer holds, it aborts the statement (and so its implicit transaction),
-- so nothing of it is written. Used by the purchase batch (konvert.earning.store) when a
-- purchase id it expected to be free was taken by a concurrent request.
create function konvert_abort(message text) returns bigint
language plpgsql as $$
begin
    raise exception using errcode = 'KV001', message = message;
end
$$;
