-- Redemptions at the till: POST /v1/members/{id}/redemptions of 1 point, on any member.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ redemption = 1 })
