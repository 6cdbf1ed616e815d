-- Shared by every scenario script (loadtests/wrk/*.lua): configuration, request bodies, the
-- per-thread response log and the JSON summary that loadtests/run.py reads.
--
-- Configuration comes from KONVERT_BENCH_* environment variables, which loadtests/run.py sets
-- (konvert itself ignores that prefix). wrk runs one Lua state per thread plus one for setup()
-- and done(), and os.getenv works in all of them, unlike script arguments.
--
-- How requests are told apart: every request carries an X-Request-Id such as p003-000000042
-- (kind, thread, per-thread counter), which konvert echoes on every response, 404s included.
-- response() writes "<request id> <status>" to a per-thread log file; run.py reads the logs to
-- count statuses per kind and to know exactly which writes were accepted. The ids of written
-- things (purchase_id, redemption_id, kudos_id) are "<tag>-<thread>-<counter>" (Shopify orders:
-- digits, see shopify.lua), so run.py can compare the accepted ones with the rows in the
-- database one by one.

local M = {}

local function env(name, default)
  local value = os.getenv(name)
  if value == nil or value == "" then
    return default
  end
  return value
end

local members = tonumber(env("KONVERT_BENCH_MEMBERS", "1000"))
local tag = env("KONVERT_BENCH_TAG", "bench")
local auth = "Bearer " .. env("KONVERT_BENCH_API_KEY", "")
local partner = env("KONVERT_BENCH_PARTNER", "webshop")
local currency = env("KONVERT_BENCH_CURRENCY", "EUR")
local occurred_at = env("KONVERT_BENCH_OCCURRED_AT", "2026-01-01T00:00:00Z")
-- Hot skew: this share of member picks goes to members 1..hot_members (0 turns skew off).
local hot_members = tonumber(env("KONVERT_BENCH_HOT_MEMBERS", "0"))
local hot_share = tonumber(env("KONVERT_BENCH_HOT_SHARE", "0.9"))
-- Contention: redemptions (and kudos_hot's kudos) go to members 1..contention_members only.
local contention_members = tonumber(env("KONVERT_BENCH_CONTENTION_MEMBERS", "8"))
-- Mean pause (ms) after each response on a connection, to run below peak load. 0: no pause.
local delay_ms = tonumber(env("KONVERT_BENCH_DELAY_MS", "0"))
local log_dir = env("KONVERT_BENCH_LOG_DIR", "")
local seed = tonumber(env("KONVERT_BENCH_SEED", "1"))
-- Portal sessions (a Cookie header per line: the session's and the CSRF cookie) for portal overview pages.
local portal_sessions_file = env("KONVERT_BENCH_PORTAL_SESSIONS", "")

local KINDS = { "n", "b", "p", "r", "k", "w", "o" }
local json_headers = { ["Content-Type"] = "application/json", ["Authorization"] = auth }
local read_headers = { ["Authorization"] = auth }

-- Main state: number the threads so their ids, and so the ids they write, never collide.
local threads = {}

function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

-- Thread state --------------------------------------------------------------------------------

local log_file = nil
local portal_sessions = {}

function init(args)
  math.randomseed(seed * 1000 + thread_id)
  if portal_sessions_file ~= "" then
    for line in io.lines(portal_sessions_file) do
      table.insert(portal_sessions, line)
    end
  end
  for _, kind in ipairs(KINDS) do
    _G["sent_" .. kind] = 0
  end
  if log_dir ~= "" then
    log_file = assert(io.open(string.format("%s/thread-%03d.log", log_dir, thread_id), "w"))
    -- Flushed when wrk exits; run.py reads the files only after that.
    log_file:setvbuf("full", 1048576)
  end
end

local function next_number(kind)
  local name = "sent_" .. kind
  local n = _G[name] + 1
  _G[name] = n
  return n
end

local function request_id(kind, n)
  return string.format("%s%03d-%09d", kind, thread_id, n)
end

local function member(uniform_only)
  if not uniform_only and hot_members > 0 and math.random() < hot_share then
    return math.random(1, hot_members)
  end
  return math.random(1, members)
end

local function with_id(headers, kind, n)
  headers["X-Request-Id"] = request_id(kind, n)
  return headers
end

local builders = {}

function builders.noop()
  local n = next_number("n")
  return wrk.format("GET", "/health/live", with_id(read_headers, "n", n))
end

function builders.balance()
  local n = next_number("b")
  return wrk.format("GET", string.format("/v1/members/m%d/balance", member(false)), with_id(read_headers, "b", n))
end

-- A member looks at the portal's overview, in one of the sessions run.py opened.
function builders.portal()
  local n = next_number("o")
  local headers = { ["Cookie"] = portal_sessions[math.random(1, #portal_sessions)] }
  return wrk.format("GET", "/portal", with_id(headers, "o", n))
end

-- A checkout posts a purchase of three lines: a book (double points in the example program),
-- something else and groceries; prices are 5 to 60 EUR, quantities 1 to 3.
function builders.purchase()
  local n = next_number("p")
  local body = string.format(
    '{"purchase_id":"%s-%d-%d","member_id":"m%d","partner":"%s","currency":"%s","occurred_at":"%s",'
      .. '"lines":[{"line_id":"1","sku":"BOOK-%d","category":"books","quantity":%d,"unit_price":%d},'
      .. '{"line_id":"2","sku":"ELEC-%d","category":"electronics","quantity":%d,"unit_price":%d},'
      .. '{"line_id":"3","sku":"FOOD-%d","category":"grocery","quantity":%d,"unit_price":%d}]}',
    tag, thread_id, n, member(true), partner, currency, occurred_at,
    math.random(1, 5000), math.random(1, 3), math.random(500, 6000),
    math.random(1, 5000), math.random(1, 3), math.random(500, 6000),
    math.random(1, 5000), math.random(1, 3), math.random(500, 6000)
  )
  return wrk.format("POST", "/v1/purchases", with_id(json_headers, "p", n), body)
end

local function redemption(member_number)
  local n = next_number("r")
  local body = string.format('{"redemption_id":"%s-%d-%d","points":1}', tag, thread_id, n)
  local path = string.format("/v1/members/m%d/redemptions", member_number)
  return wrk.format("POST", path, with_id(json_headers, "r", n), body)
end

-- At the till: one point off a random member.
function builders.redemption()
  return redemption(member(true))
end

-- Many tills, few members: every redemption locks one of a handful of member rows.
function builders.contention()
  return redemption(math.random(1, contention_members))
end

-- A shop's checkout arriving as a signed Shopify orders/paid delivery (shopify.lua), for a
-- customer linked to a uniformly picked member. Loaded only by scenarios that send one.
local shopify = nil

function builders.webhook()
  if shopify == nil then
    shopify = require("shopify")
    shopify.self_test()
  end
  local n = next_number("w")
  local path, headers, body = shopify.delivery(thread_id, n, member(true))
  return wrk.format("POST", path, with_id(headers, "w", n), body)
end

local KUDOS_KINDS = { "like", "like", "like", "like", "like", "like", "like", "like", "helpful", "helpful",
  "helpful", "accepted_answer" }

local function kudos(author)
  local n = next_number("k")
  local giver = member(true)
  if giver == author then
    giver = author % members + 1
  end
  local body = string.format(
    '{"kudos_id":"%s-%d-%d","source":"forum","post_id":"post-%s-%d-%d","thread_id":"thread-%s-%d-%d",'
      .. '"author_id":"m%d","giver_id":"m%d","kind":"%s","occurred_at":"%s"}',
    tag, thread_id, n, tag, thread_id, n, tag, thread_id, n, author, giver,
    KUDOS_KINDS[math.random(1, #KUDOS_KINDS)], occurred_at
  )
  return wrk.format("POST", "/v1/kudos", with_id(json_headers, "k", n), body)
end

-- A kudos between two members of the forum.
function builders.kudos()
  return kudos(member(true))
end

-- A few members write the answers everyone likes.
function builders.kudos_hot()
  return kudos(math.random(1, contention_members))
end

-- Defines wrk's request/response/done (and delay, when pacing) for a mix such as
-- { balance = 70, purchase = 20, redemption = 5, kudos = 5 }.
function M.scenario(weights)
  local names, cumulative, total = {}, {}, 0
  for name, weight in pairs(weights) do
    assert(builders[name], "unknown request kind " .. name)
    total = total + weight
    table.insert(names, name)
    table.insert(cumulative, total)
  end

  if #names == 1 then
    request = builders[names[1]]
  else
    request = function()
      local pick = math.random() * total
      for i = 1, #names do
        if pick < cumulative[i] then
          return builders[names[i]]()
        end
      end
      return builders[names[#names]]()
    end
  end

  response = function(status, headers, body)
    if log_file ~= nil then
      log_file:write(headers["x-request-id"] or headers["X-Request-Id"] or "?", " ", status, "\n")
    end
  end

  if delay_ms > 0 then
    -- Uniform between 0.5 and 1.5 times the mean, so connections do not fall into lockstep.
    delay = function()
      return math.floor(delay_ms * (0.5 + math.random()) + 0.5)
    end
  end

  done = M.done
end

local function json_number(value)
  if value == nil then
    return "null"
  end
  return string.format("%.17g", value)
end

function M.done(summary, latency, requests)
  local sent = {}
  for i, thread in ipairs(threads) do
    local counts = {}
    for _, kind in ipairs(KINDS) do
      table.insert(counts, string.format('"%s":%s', kind, json_number(thread:get("sent_" .. kind) or 0)))
    end
    table.insert(sent, string.format('"%d":{%s}', i, table.concat(counts, ",")))
  end
  local percentiles = {}
  for _, p in ipairs({ 50, 90, 95, 99, 99.9 }) do
    table.insert(percentiles, string.format('"%s":%s', tostring(p), json_number(latency:percentile(p))))
  end
  local errors = summary.errors
  io.write(
    "KONVERT_BENCH_RESULT ",
    string.format(
      '{"duration_us":%s,"requests":%s,"bytes":%s,'
        .. '"errors":{"connect":%s,"read":%s,"write":%s,"status":%s,"timeout":%s},'
        .. '"latency_us":{"min":%s,"max":%s,"mean":%s,"stdev":%s,"percentiles":{%s}},"sent":{%s}}',
      json_number(summary.duration), json_number(summary.requests), json_number(summary.bytes),
      json_number(errors.connect), json_number(errors.read), json_number(errors.write),
      json_number(errors.status), json_number(errors.timeout),
      json_number(latency.min), json_number(latency.max), json_number(latency.mean), json_number(latency.stdev),
      table.concat(percentiles, ","), table.concat(sent, ",")
    ),
    "\n"
  )
end

return M
