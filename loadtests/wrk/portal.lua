-- Member portal: GET /portal (the overview page) in sessions run.py opened beforehand, members uniform.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ portal = 1 })
