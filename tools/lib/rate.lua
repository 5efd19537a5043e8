-- tools/lib/rate.lua — a wrk script for a fixed request rate: every
-- connection sends a request every BENCH_INTERVAL_MS on a schedule of its
-- own (the wait after a response is what is left of the period: rounded up
-- or down at random to whole milliseconds, wrk's unit, so the mean is
-- right), so N connections offer N * 1000 / BENCH_INTERVAL_MS req/s as
-- long as an answer takes less than a period. A connection that falls
-- more than a period behind starts its schedule again (no burst to catch
-- up: the offered rate is a ceiling).
--
-- It also times every answer itself and keeps two latency histograms,
-- admitted (any status but 429 and 503) and refused (429, 503), because
-- wrk's own percentiles mix them: under overload the fast refusals would
-- hide the latency of the requests that were served. Timing a request
-- needs its response to be the next one seen after it, so run one
-- connection per thread (wrk -tN -cN); done() prints one line,
--   split: admitted N P50_MS P99_MS refused N P50_MS P99_MS
-- (the percentiles of empty classes are 0).
local interval_us = (tonumber(os.getenv("BENCH_INTERVAL_MS")) or 0) * 1000

local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } rate_lua_timespec;
int clock_gettime(int clock, rate_lua_timespec *ts);
]]
local ts = ffi.new("rate_lua_timespec")
local CLOCK_MONOTONIC = 1
local function now_us()
    ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
    return tonumber(ts.tv_sec) * 1000000 + tonumber(ts.tv_nsec) / 1000
end

-- Histograms: bucket (10 µs wide) -> count. Globals, so that done() can
-- read each thread's through thread:get().
BUCKET_US = 10
admitted = {}
refused = {}
local sent = nil

local threads = {}
function setup(thread)
    table.insert(threads, thread)
end

-- When this connection's next request is due (µs, CLOCK_MONOTONIC).
local due = nil

function delay()
    local now = now_us()
    if due == nil or due < now - interval_us then
        due = now
    end
    due = due + interval_us
    local ms = (due - now) / 1000
    if ms <= 0 then
        return 0
    end
    local whole = math.floor(ms)
    if math.random() < ms - whole then
        return whole + 1
    end
    return whole
end

function request()
    sent = now_us()
    return wrk.request()
end

function response(status, headers, body)
    if sent == nil then
        return
    end
    local b = math.floor((now_us() - sent) / BUCKET_US)
    sent = nil
    local h = (status == 503 or status == 429) and refused or admitted
    h[b] = (h[b] or 0) + 1
end

-- Total count, and the p50 and p99 in ms, of the merged histograms `hs`.
local function percentiles(hs)
    local merged, n = {}, 0
    for _, h in ipairs(hs) do
        for b, c in pairs(h) do
            merged[b] = (merged[b] or 0) + c
            n = n + c
        end
    end
    if n == 0 then
        return 0, 0, 0
    end
    local keys = {}
    for b in pairs(merged) do
        table.insert(keys, b)
    end
    table.sort(keys)
    local function at(q)
        local want, seen = math.ceil(q * n), 0
        for _, b in ipairs(keys) do
            seen = seen + merged[b]
            if seen >= want then
                return (b + 0.5) * BUCKET_US / 1000
            end
        end
        return (keys[#keys] + 0.5) * BUCKET_US / 1000
    end
    return n, at(0.50), at(0.99)
end

function done(summary, latency, requests)
    local a, r = {}, {}
    for _, t in ipairs(threads) do
        table.insert(a, t:get("admitted"))
        table.insert(r, t:get("refused"))
    end
    local an, a50, a99 = percentiles(a)
    local rn, r50, r99 = percentiles(r)
    io.write(string.format("split: admitted %d %.3f %.3f refused %d %.3f %.3f\n", an, a50, a99, rn, r50, r99))
end
