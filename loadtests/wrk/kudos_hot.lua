-- Forum kudos to a few popular authors: POST /v1/kudos to KONVERT_BENCH_CONTENTION_MEMBERS authors
-- from uniformly picked givers (the authors' rows and daily caps are contended).
-- Run by loadtests/run.py; configuration and the response log are described in common.lua.
local here = debug.getinfo(1, "S").source:match("^@(.*/)") or "./"
package.path = here .. "?.lua;" .. package.path
require("common").scenario({ kudos_hot = 1 })
