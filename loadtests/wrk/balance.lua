-- Member app: GET /v1/members/{id}/balance; uniform over all members, or hot-skewed with KONVERT_BENCH_HOT_MEMBERS.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ balance = 1 })
