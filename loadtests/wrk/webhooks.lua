-- A shop's checkouts as signed Shopify orders/paid deliveries to POST /v1/integrations/{name}/webhooks.
-- Run by loadtests/run.py; configuration and the response log are described in common.lua and shopify.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ webhook = 1 })
