-- The no-op endpoint through the web framework (GET /health/live?via=router): what routing,
-- guards and the response object cost. Run by loadtests/run.py; see common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ noop_routed = 1 })
