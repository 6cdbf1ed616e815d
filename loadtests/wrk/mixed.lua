-- A checkout day: 70% balance reads, 20% purchases, 5% redemptions, 5% kudos (POST /v1/kudos).
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ balance = 70, purchase = 20, redemption = 5, kudos = 5 })
