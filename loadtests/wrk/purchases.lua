-- Checkout: POST /v1/purchases with three lines and a unique purchase_id each.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ purchase = 1 })
