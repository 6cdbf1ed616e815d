-- The service's own no-op endpoint (GET /health/live): the baseline for reads.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ noop = 1 })
