-- tools/lib/rate.lua — a wrk script for a fixed request rate: every
-- connection waits BENCH_INTERVAL_MS (fractional: rounded up or down at
-- random to that mean) after a response before its next request, so N
-- connections offer about N * 1000 / (BENCH_INTERVAL_MS + latency) req/s.
local interval = tonumber(os.getenv("BENCH_INTERVAL_MS")) or 0
local base = math.floor(interval)
local frac = interval - base

function delay()
    if math.random() < frac then
        return base + 1
    end
    return base
end
