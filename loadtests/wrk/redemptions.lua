-- Redemption contention: POST /v1/members/{id}/redemptions of 1 point, on KONVERT_BENCH_CONTENTION_MEMBERS members only.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ contention = 1 })
