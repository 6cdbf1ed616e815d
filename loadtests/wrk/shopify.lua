-- Signed Shopify orders/paid deliveries for the webhooks scenario (common.lua's "webhook" kind).
--
-- loadtests/harness/webhooks.py passes the sample order as a template with $name placeholders
-- (KONVERT_BENCH_ORDER_TEMPLATE), the integration's webhook path and secret, and the six digits
-- every order id of this run starts with. Each request fills the template in and signs the body
-- as Shopify does: X-Shopify-Hmac-Sha256 is the base64 HMAC-SHA256 of the raw body, computed
-- with OpenSSL's libcrypto, which wrk is linked with, through LuaJIT's ffi.
--
-- Shopify ids exceed 2^53, more than a Lua number holds exactly, so ids are built as digit
-- strings: customer 10^16 + member, order <prefix><thread, 3 digits><counter, 9 digits>, line
-- item 8<the order id's last 17 digits><line>. webhooks.py reads them back the same way.

local ffi = require("ffi")
local bit = require("bit")

ffi.cdef([[
typedef struct evp_md_st EVP_MD;
const EVP_MD *EVP_sha256(void);
unsigned char *HMAC(const EVP_MD *evp_md, const void *key, int key_len, const unsigned char *d, size_t n,
                    unsigned char *md, unsigned int *md_len);
]])

-- wrk is linked with libcrypto, so its symbols are already loaded; load it by name otherwise.
local crypto = pcall(function() return ffi.C.HMAC end) and ffi.C or ffi.load("crypto")

local function env(name)
  local value = os.getenv(name)
  assert(value ~= nil and value ~= "", name .. " is not set (loadtests/run.py sets it)")
  return value
end

local template = env("KONVERT_BENCH_ORDER_TEMPLATE")
local path = env("KONVERT_BENCH_WEBHOOK_PATH")
local secret = env("KONVERT_BENCH_WEBHOOK_SECRET")
local prefix = env("KONVERT_BENCH_ORDER_PREFIX")
local tag = os.getenv("KONVERT_BENCH_TAG") or "bench"
local processed_at = os.getenv("KONVERT_BENCH_OCCURRED_AT") or "2026-01-01T00:00:00Z"
assert(#prefix == 6, "KONVERT_BENCH_ORDER_PREFIX has six digits")

local sha256 = crypto.EVP_sha256()
local digest = ffi.new("unsigned char[32]")
local digest_length = ffi.new("unsigned int[1]")

local ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
local SYMBOLS = {}
for i = 1, 64 do
  SYMBOLS[i - 1] = ALPHABET:sub(i, i)
end

-- Standard base64 with padding of n bytes at p.
local function base64(p, n)
  local out = {}
  for i = 0, n - 1, 3 do
    local b1, b2, b3 = p[i], i + 1 < n and p[i + 1] or 0, i + 2 < n and p[i + 2] or 0
    local triple = bit.bor(bit.lshift(b1, 16), bit.lshift(b2, 8), b3)
    out[#out + 1] = SYMBOLS[bit.band(bit.rshift(triple, 18), 63)]
    out[#out + 1] = SYMBOLS[bit.band(bit.rshift(triple, 12), 63)]
    out[#out + 1] = i + 1 < n and SYMBOLS[bit.band(bit.rshift(triple, 6), 63)] or "="
    out[#out + 1] = i + 2 < n and SYMBOLS[bit.band(triple, 63)] or "="
  end
  return table.concat(out)
end

local function sign(body)
  crypto.HMAC(sha256, secret, #secret, body, #body, digest, digest_length)
  return base64(digest, digest_length[0])
end

local M = {}

-- The known answer of RFC 4231's test case 2, checked once per thread before any request.
function M.self_test()
  crypto.HMAC(sha256, "Jefe", 4, "what do ya want for nothing?", 28, digest, digest_length)
  assert(base64(digest, digest_length[0]) == "W9zBRr9gdU5qBCQmCJV1x1oAPwidJzmDnexYuWTsOEM=", "HMAC-SHA256 is wrong")
end

local PRICES = { "4.99", "9.90", "12.50", "19.99", "24.00", "29.95", "34.99", "49.00", "59.90" }

-- A paid order of member `member`: the request's path, headers and body.
function M.delivery(thread_id, n, member)
  local digits = string.format("%03d%09d", thread_id, n)
  local values = {
    order_id = prefix .. digits,
    customer_id = string.format("1%016d", member),
    processed_at = processed_at,
  }
  local line_base = "8" .. prefix:sub(2) .. digits
  for k = 1, 3 do
    values["line" .. k .. "_id"] = line_base .. k
    values["sku" .. k] = string.format("SKU-%d-%d", k, math.random(1, 5000))
    values["quantity" .. k] = tostring(math.random(1, 3))
    values["price" .. k] = PRICES[math.random(1, #PRICES)]
  end
  local body = template:gsub("%$([%w_]+)", values)
  local headers = {
    ["Content-Type"] = "application/json",
    ["X-Shopify-Topic"] = "orders/paid",
    ["X-Shopify-Hmac-Sha256"] = sign(body),
    ["X-Shopify-Shop-Domain"] = "loadtests.myshopify.com",
    ["X-Shopify-API-Version"] = "2024-07",
    ["X-Shopify-Webhook-Id"] = string.format("%s-%s", tag, digits),
  }
  return path, headers, body
end

return M
